"""STR: Soft Threshold Reparameterization (Kusupati et al., ICML 2020)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import Self, override

from lightning_sparse.arguments import check_real
from lightning_sparse.methods.base import SparseLayers, SparseParametrization, SparsityMethod
from lightning_sparse.optim import add_beside, decay_instead

__all__ = ["STR", "LearnedSoftThreshold"]


class _SoftThreshold(torch.autograd.Function):
    """`w - clamp(w, -g, g)`, i.e. `sign(w) * relu(|w| - g)`, with its gradients written out.

    Autograd's backward of a clamp with tensor bounds builds several masks and `where`s for each
    bound, about ten times the cost of the forward on ResNet-18's weights; the same gradients need
    one comparison, one `where` and one dot product.
    """

    @staticmethod
    @override
    def forward(weight: Tensor, g: Tensor) -> Tensor:
        # Two passes instead of four; a 0-dim threshold does not promote a bf16 weight.
        return weight - weight.clamp(-g, g)

    @staticmethod
    @override
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    @override
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        weight, g = ctx.saved_tensors
        # Survivors (|w| > g) pass the gradient through unchanged and give g a gradient of -sign(w);
        # the others give nothing to either, ties included as relu'(0) = 0 (torch's clamp would
        # split the gradient at a tie, which bf16 weights often hit).
        kept = torch.where(weight.abs() > g, grad, 0.0)
        return kept, -torch.dot(kept.flatten(), weight.sign().flatten())


class LearnedSoftThreshold(SparseParametrization):
    """Soft threshold with one learnable threshold per layer: `sign(w) * relu(|w| - sigmoid(s))`.

    Gradients are those of that expression (as in the paper's code, here with a hand-written
    backward): weights under the threshold get none and `s` is trained by the surviving weights and
    by weight decay, which is what makes the layer sparse.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> bool((layer.weight.abs() <= layer.weight.detach().abs().max()).all())
        True
    """

    def __init__(self, s_init: float, device: torch.device | None = None) -> None:
        super().__init__()
        # float32 whatever the weight's dtype: bf16 cannot hold the small decay steps of `s`.
        self.s = torch.nn.Parameter(torch.tensor(float(s_init), dtype=torch.float32, device=device))

    def threshold(self) -> Tensor:
        """The current magnitude threshold `sigmoid(s)`."""
        return torch.sigmoid(self.s)

    @override
    def forward(self, weight: Tensor) -> Tensor:
        return cast(Tensor, _SoftThreshold.apply(weight, self.threshold()))

    @override
    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive the threshold."""
        return weight.detach().abs() > self.threshold().detach()

    @classmethod
    @override
    def from_state_dict(cls, original: Tensor, state: Mapping[str, Any]) -> Self | None:
        if set(state) != {"s"}:
            return None
        candidate = cls(s_init=0.0)
        # `assign`: keep the saved dtype (a bf16 threshold after `bf16-true`), to compute as training did.
        candidate.load_state_dict(state, assign=True)
        return candidate


@dataclass(frozen=True)
class STR(SparsityMethod):
    """STR: one learnable threshold per layer, trained by your optimizer; no target sparsity.

    Sparsity comes from weight decay pulling the negative `s` towards 0 against the loss: the decay
    sets how sparse the model gets, `s_init` mostly when pruning starts.

    Args:
        s_init: Initial threshold parameter; `sigmoid(s_init)` is the initial threshold. Default -100.
        threshold_decay: Weight decay of the thresholds, in their own param group of your optimizer
            (learning rate, momentum and LR schedulers stay yours). Default: whatever your optimizer
            applies to the weights around them.

    Example:
        >>> STR(s_init=-5.0, threshold_decay=2e-2).name
        'str'
        >>> STR(threshold_decay=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: `threshold_decay` must be a finite number in [0, inf], got nan
    """

    s_init: float = -100.0
    threshold_decay: float | None = None

    parametrization_class = LearnedSoftThreshold

    def __post_init__(self) -> None:
        object.__setattr__(self, "s_init", check_real("s_init", self.s_init))
        if self.threshold_decay is not None:
            object.__setattr__(self, "threshold_decay", check_real("threshold_decay", self.threshold_decay, low=0.0))

    @property
    @override
    def name(self) -> str:
        return "str"

    @override
    def parametrization(self, weight: Tensor) -> LearnedSoftThreshold:
        return LearnedSoftThreshold(self.s_init, device=weight.device)

    @override
    def on_fit_start(
        self, weights: Sequence[tuple[SparseParametrization, Tensor]], optimizers: Sequence[Optimizer]
    ) -> list[str]:
        """Put each threshold in the param group of its weight, so your optimizer and LR schedule train it.

        Raises if `threshold_decay` is set and that optimizer has no weight decay. Warns when nothing
        decays the thresholds (the model would stay dense), when a weight is in no optimizer, and when
        the thresholds already prune every weight.
        """
        pairs = [(p, w) for p, w in weights if isinstance(p, LearnedSoftThreshold)]
        groups: list[tuple[Optimizer, dict[str, Any]]] = []
        unplaced = 0
        for p, weight in pairs:
            placed = [(o, g) for o in optimizers if (g := add_beside(o, p.s, weight)) is not None]
            unplaced += not placed
            groups += placed
        for optimizer, group in groups:
            if self.threshold_decay is not None and "weight_decay" not in group:
                raise ValueError(
                    f"`threshold_decay` needs an optimizer with weight decay, and {type(optimizer).__name__} has "
                    "none; use one that has (SGD, Adam, AdamW, ...), or leave `threshold_decay` unset"
                )
        warnings = []
        decays = [g.get("weight_decay", 0) for _, g in groups]
        if groups and self.threshold_decay is None and not any(decays):
            warnings.append(
                "STR's sparsity comes from weight decay on its thresholds, and your optimizer applies none "
                "to them: the model will stay dense. Pass `threshold_decay=` to STR / SparsityCallback."
            )
        if unplaced:
            warnings.append(
                f"{unplaced} sparsified weight(s) are in no optimizer, so their STR thresholds stay at "
                f"s_init={self.s_init:g}; exclude those layers with `exclude=` if they are frozen on purpose."
            )
        with torch.no_grad():
            if pairs and not any(bool(p.keep_mask(w).any()) for p, w in pairs):
                warnings.append(
                    f"Every sparsified weight is at or under its STR threshold (sigmoid(s_init={self.s_init:g}) = "
                    f"{torch.sigmoid(torch.tensor(self.s_init)).item():.3g}): the whole model is pruned and its "
                    "weights get no gradient. Use a much lower `s_init`, e.g. -5 for short runs or -100 (the default)."
                )
        return warnings

    @override
    def before_optimizer_step(self, optimizer: Optimizer, layers: SparseLayers) -> None:
        """Apply `threshold_decay` to the thresholds in place of their param group's decay."""
        if self.threshold_decay is None:
            return
        thresholds = {id(p.s) for _, p in layers.values() if isinstance(p, LearnedSoftThreshold)}
        for group in optimizer.param_groups:
            held = [q for q in group["params"] if id(q) in thresholds]
            if held:
                decay_instead(optimizer, group, held, self.threshold_decay)

    @override
    def metrics(self, step: int, layers: SparseLayers) -> dict[str, float]:
        """``threshold/<layer name>``: each layer's threshold `sigmoid(s)`."""
        named = {name: p for name, (_, p) in layers.items() if isinstance(p, LearnedSoftThreshold)}
        if not named:
            return {}
        values = torch.stack([p.threshold().detach().float() for p in named.values()]).tolist()
        return {f"threshold/{name}": value for name, value in zip(named, values, strict=True)}
