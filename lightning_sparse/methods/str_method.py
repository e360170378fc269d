"""STR: Soft Threshold Reparameterization (Kusupati et al., ICML 2020)."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_sparse.arguments import check_real
from lightning_sparse.methods.base import SparseLayers, SparseParametrization, SparsityMethod
from lightning_sparse.optim import StepHooks, add_beside, decay_at_each_step, weight_decay_style

__all__ = ["STR", "LearnedSoftThreshold"]

# The `threshold_decay` hook of each optimizer STR decays thresholds in (see `STR.on_fit_start`).
_DECAY_HOOKS: weakref.WeakKeyDictionary[Optimizer, StepHooks] = weakref.WeakKeyDictionary()


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
        threshold_decay: Weight decay of the thresholds, applied by your optimizer in place of the one
            of their param group, its way: added to the gradient (SGD, Adam, RMSprop, ...) or
            multiplying them by `1 - lr * threshold_decay` (AdamW, `decoupled_weight_decay=True`). The
            thresholds stay in their weight's param group, so its learning rate, momentum and LR
            schedule are theirs. Needs an optimizer with weight decay. Default: whatever your
            optimizer applies to the weights around them.

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

        A threshold some optimizer already holds (`configure_optimizers` saw it among the model's
        parameters) stays where it is; the others join their weight's group, and no group is added. With
        `threshold_decay`, each optimizer holding thresholds decays them by it at each of its steps from
        now on (`decay_at_each_step`: after gradient clipping, right before the update).

        Raises, before changing anything, if `threshold_decay` is set and the optimizer of a threshold has
        no weight decay or one of unknown kind, or if a threshold would have to join Muon's (which trains
        only 2-D parameters). Warns when nothing decays the thresholds (the model would stay dense), when a
        weight is in no optimizer, and when the thresholds already prune every weight.
        """
        pairs = [(p, w) for p, w in weights if isinstance(p, LearnedSoftThreshold)]
        holders: dict[int, tuple[Optimizer, dict[str, Any]]] = {}
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    holders.setdefault(id(param), (optimizer, group))
        groups: dict[int, tuple[Optimizer, dict[str, Any]]] = {}  # those holding thresholds, by id
        additions: list[tuple[Optimizer, Tensor, Tensor]] = []
        unplaced = 0
        for p, weight in pairs:
            holder = holders.get(id(p.s)) or holders.get(id(weight))
            if holder is None:
                unplaced += 1
                continue
            if id(p.s) not in holders:
                if isinstance(holder[0], torch.optim.Muon):
                    raise ValueError(
                        "STR's thresholds are scalars and Muon trains only 2-D parameters: put them (the model's "
                        "parameters named `...parametrizations.weight.0.s`) in another optimizer, e.g. the AdamW "
                        "of your other parameters (`[p for p in self.parameters() if p.ndim != 2]` holds them)"
                    )
                additions.append((holder[0], p.s, weight))
            groups[id(holder[1])] = holder
        if self.threshold_decay is not None:
            for optimizer, group in groups.values():
                self._check_decay(optimizer, group)
        for optimizer, threshold, weight in additions:
            add_beside(optimizer, cast(torch.nn.Parameter, threshold), weight, name=_threshold_name)
        if self.threshold_decay is not None:
            thresholds = [p.s for p, _ in pairs]
            for optimizer in {id(o): o for o, _ in groups.values()}.values():
                # One decay hook per optimizer: a second fit with the same optimizer replaces the first's.
                previous = _DECAY_HOOKS.pop(optimizer, None)
                if previous is not None:
                    previous.remove()
                _DECAY_HOOKS[optimizer] = decay_at_each_step(optimizer, thresholds, self.threshold_decay)
        warnings = []
        decays = [g.get("weight_decay", 0) for _, g in groups.values()]
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

    def _check_decay(self, optimizer: Optimizer, group: dict[str, Any]) -> None:
        """Raise unless `threshold_decay` can replace the weight decay `optimizer` gives `group`."""
        name = type(optimizer).__name__
        if self.threshold_decay == float(group.get("weight_decay", 0.0)):
            return  # nothing to change
        if "weight_decay" not in group:
            raise ValueError(
                f"`threshold_decay` needs an optimizer with weight decay, and {name} has none; use one that has "
                "(SGD, Adam, AdamW, ...), or leave `threshold_decay` unset"
            )
        if weight_decay_style(optimizer, group) is None:
            raise ValueError(
                f"`threshold_decay` needs to know how {name} applies its weight decay, and {name} is not one of "
                "torch's optimizers: add `decoupled_weight_decay=True` to its param groups if its step multiplies "
                "each parameter by `1 - lr * weight_decay` (AdamW-style), `False` if it adds `weight_decay * p` "
                "to the gradient (L2, SGD-style); or leave `threshold_decay` unset"
            )

    @override
    def metrics(self, step: int, layers: SparseLayers) -> dict[str, float]:
        """``threshold/<layer name>``: each layer's threshold `sigmoid(s)`."""
        named = {name: p for name, (_, p) in layers.items() if isinstance(p, LearnedSoftThreshold)}
        if not named:
            return {}
        values = torch.stack([p.threshold().detach().float() for p in named.values()]).tolist()
        return {f"threshold/{name}": value for name, value in zip(named, values, strict=True)}


def _threshold_name(weight_name: str) -> str:
    """The name of a threshold in an optimizer's `param_names`, from that of its weight (`...weight.original`)."""
    return f"{weight_name.removesuffix('.original')}.0.s" if weight_name.endswith(".original") else f"{weight_name}.s"
