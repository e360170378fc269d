"""ST-3: soft thresholding with straight-through gradients (Vanderschueren & De Vleeschouwer, WACV 2023)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.thresholds import global_magnitude_threshold


class _SoftThresholdStraightThrough(torch.autograd.Function):
    """Forward: soft threshold and channel rescale. Backward: the identity, to every weight."""

    @staticmethod
    def forward(weight: Tensor, threshold: Tensor, scale: Tensor) -> Tensor:
        shrunk = weight - weight.clamp(-threshold, threshold)
        return shrunk.mul_(scale.to(weight.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Pruned weights keep receiving the full gradient, so they can come back at the next threshold.
        return grad, None, None


class ST3(nn.Module):
    """ST-3 reparameterization of one weight: `sign(w) * relu(|w| - t) * c`, straight-through.

    `t` (the layer's threshold), the keep mask and the per-output-channel rescale `c` are buffers
    set by `update_st3` after each optimizer step. Once frozen, the forward is `w * mask` with
    the true gradient, so only surviving weights train.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> st3 = ST3(layer.weight)
        >>> _ = parametrize.register_parametrization(layer, "weight", st3)
        >>> _ = update_st3([st3], [layer.parametrizations.weight.original], sparsity=0.5)
        >>> int((layer.weight == 0).sum())
        4
    """

    def __init__(self, weight: Tensor, rescale: bool = True) -> None:
        super().__init__()
        self.rescale = rescale
        self.frozen = False
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=weight.device))
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool))
        scale_shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32, device=weight.device))

    def forward(self, weight: Tensor) -> Tensor:
        if self.frozen:
            return weight * self.mask
        return _SoftThresholdStraightThrough.apply(weight, self.threshold, self.scale)

    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive (the mask of the last update)."""
        return self.mask

    @torch.no_grad()
    def set_threshold(self, magnitude: Tensor, threshold: float) -> None:
        """Prune `magnitude` (= |w|, float32) at `threshold` and recompute the channel rescale."""
        self.threshold.fill_(threshold)
        torch.gt(magnitude, threshold, out=self.mask)
        if self.rescale:
            dims = tuple(range(1, magnitude.dim()))
            total = magnitude.sum(dims, keepdim=True)
            kept = (magnitude * self.mask).sum(dims, keepdim=True)
            # The paper code's 1.01 / (r + 0.01): about 1/r, bounded when a channel is fully pruned.
            kept_fraction = torch.where(total > 0, kept / total, torch.ones_like(total))
            torch.div(1.01, kept_fraction + 0.01, out=self.scale)

    @torch.no_grad()
    def freeze(self, weight: Tensor) -> None:
        """Bake the current effective weight into `weight` and fix the mask from now on."""
        weight.copy_(self(weight))
        self.frozen = True

    def get_extra_state(self) -> dict[str, bool]:
        return {"frozen": self.frozen}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.frozen = state["frozen"]


def sigma_scale(weight: Tensor) -> float:
    """ST-3σ's width normalisation: magnitudes are compared as `|w| * sqrt(sum(weight.shape))`.

    Example:
        >>> sigma_scale(torch.zeros(16, 8, 6, 6))
        6.0
    """
    return math.sqrt(sum(weight.shape))


@torch.no_grad()
def update_st3(
    layers: Sequence[ST3], weights: Sequence[Tensor], sparsity: float, sigma: bool = False
) -> float:
    """Set every layer's threshold from one global magnitude quantile at `sparsity`.

    `weights` are the raw (original) weights, in the order of `layers`. With `sigma`, each layer's
    magnitudes are width-normalised first (ST-3σ), which spreads the budget more evenly.
    Returns the global threshold (in normalised units under `sigma`).

    Example:
        >>> w = torch.arange(1.0, 11.0).reshape(2, 5)
        >>> st3 = ST3(w, rescale=False)
        >>> update_st3([st3], [w], sparsity=0.3)
        3.0
        >>> st3.mask.sum().item()
        7
    """
    magnitudes = [w.detach().float().abs() for w in weights]
    scales = [sigma_scale(w) if sigma else 1.0 for w in weights]
    tau = global_magnitude_threshold(magnitudes, sparsity, scales)
    for layer, magnitude, scale in zip(layers, magnitudes, scales):
        layer.set_threshold(magnitude, tau / scale)
    return tau
