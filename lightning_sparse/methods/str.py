"""STR: Soft Threshold Reparameterization (Kusupati et al., ICML 2020)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class STR(nn.Module):
    """Soft threshold with one learnable threshold per layer: `sign(w) * relu(|w| - sigmoid(s))`.

    Gradients are plain autograd, so weights under the threshold get none and `s` is trained by
    the surviving weights and by weight decay, which is what makes the layer sparse.

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
        # w - clamp(w, -g, g) equals sign(w) * relu(|w| - g) with the same gradients, in two
        # passes instead of four; a 0-dim threshold does not promote a bf16 weight.
        g = self.threshold()
        return weight - weight.clamp(-g, g)

    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive the threshold."""
        return weight.detach().abs() > self.threshold().detach()
