"""STR: Soft Threshold Reparameterization (Kusupati et al., ICML 2020)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _SoftThreshold(torch.autograd.Function):
    """`w - clamp(w, -g, g)`, i.e. `sign(w) * relu(|w| - g)`, with its gradients written out.

    Autograd's backward of a clamp with tensor bounds builds several masks and `where`s for each
    bound, about ten times the cost of the forward on ResNet-18's weights; the same gradients need
    one comparison, one `where` and one dot product.
    """

    @staticmethod
    def forward(weight: Tensor, g: Tensor) -> Tensor:
        # Two passes instead of four; a 0-dim threshold does not promote a bf16 weight.
        return weight - weight.clamp(-g, g)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        weight, g = ctx.saved_tensors
        # Survivors (|w| > g) pass the gradient through unchanged and give g a gradient of -sign(w);
        # the others give nothing to either, ties included as relu'(0) = 0 (torch's clamp would
        # split the gradient at a tie, which bf16 weights often hit).
        kept = torch.where(weight.abs() > g, grad, 0.0)
        return kept, -torch.dot(kept.flatten(), weight.sign().flatten())


class STR(nn.Module):
    """Soft threshold with one learnable threshold per layer: `sign(w) * relu(|w| - sigmoid(s))`.

    Gradients are those of that expression (as in the paper's code): weights under the threshold
    get none and `s` is trained by the surviving weights and by weight decay, which is what makes
    the layer sparse.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", STR(s_init=0.0))
        >>> bool((layer.weight.abs() <= layer.weight.detach().abs().max()).all())
        True
    """

    def __init__(self, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def threshold(self) -> Tensor:
        """The current magnitude threshold `sigmoid(s)`."""
        return torch.sigmoid(self.s)

    def forward(self, weight: Tensor) -> Tensor:
        return _SoftThreshold.apply(weight, self.threshold())

    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive the threshold."""
        return weight.detach().abs() > self.threshold().detach()
