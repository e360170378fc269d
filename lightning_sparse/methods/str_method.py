"""STR: Soft Threshold Reparameterization (Kusupati et al., ICML 2020), optionally with a target sparsity.

Plain STR (`s_init`, `threshold_decay`) is the paper's method: each layer's threshold `sigmoid(s_l)` is
a parameter trained by the gradient of `sign(w) * relu(|w| - sigmoid(s_l))` and pulled up by weight
decay; the sparsity it ends at is whatever that balance gives, with no way to ask for a number.

Target mode (`target_sparsity=`, with ST-3's `start`, `end` and `schedule`) keeps everything that
makes STR STR (the same forward, the same gradients to `w` and `s`, the same optimizer and decay) and
adds one controller after each optimizer step: a global shift `delta` of every layer's threshold in
logit space, `s_l <- s_l + delta`, chosen so the sparsified weights have exactly the schedule's
fraction of zeros.

Why a shift in logit space is an exact, budget-preserving control. Weight `i` of layer `l` is zero
iff `|w_i| <= sigmoid(s_l)`, i.e. (sigmoid being increasing, and for `|w_i| < 1`) iff
`key_i = logit(|w_i|) - s_l <= 0`. After `s_l <- s_l + delta` it is zero iff `key_i <= delta`. So
the number of zeros is a step function of the single scalar `delta`, and `delta` = the midpoint
between the k-th and (k+1)-th smallest keys over all layers, `k = round(target * n)`, gives exactly
`k` zeros (up to exact ties, as ST-3's quantile). It is the same exact selection as ST-3's global
magnitude threshold, but over each layer's *normalised* magnitude `|w| / sigmoid(s_l)` (in logit
form): the *differences* `s_l - s_m`, which decide how the budget is split between layers, are left
to the gradients, which still train every `s_l` by the paper's formula. A layer whose loss gradient
pushes its threshold up relative to the others gets pruned more, exactly as in plain STR; only the
common level, which plain STR leaves to `threshold_decay` and luck, is set by the schedule.

Seen as a controller it is dead-beat: the error `zeros - k` is driven to zero at every step from
`start` on (the schedule's target, cubic by default, rising to `target_sparsity` at `end`, then held),
so `sparsity/global` follows `sparsity/target` step by step and fit ends at exactly the target on any
model without per-target tuning. Before `start` (target 0) nothing is shifted: with the default
`s_init` the thresholds are ~0 and the net trains dense. The controller's only state is the `s_l`
themselves (parameters, saved in checkpoints): `delta` is recomputed from weights and thresholds,
so a resume continues exactly. Weight decay on `s` keeps acting on the per-layer differences (it
pulls far-off thresholds together), as it does in plain STR.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_sparse import kernels
from lightning_sparse.arguments import StepOrFraction, check_real
from lightning_sparse.methods.base import (
    EffectiveWeightCache,
    SparseLayers,
    SparseParametrization,
    SparsityMethod,
    kept_gradient,
    magnitude_above,
    soft_threshold,
    tensor_owners,
)
from lightning_sparse.optim import StepHooks, add_beside, decay_at_each_step, weight_decay_style
from lightning_sparse.schedules import Schedule, build_schedule, check_order, check_schedule_settings, resolve_ramp
from lightning_sparse.sharding import (
    Group,
    all_gather_cat,
    all_sum,
    average_gradient_over,
    is_sharded,
    local_shard,
    shard_group,
)
from lightning_sparse.thresholds import NonFiniteWeightsError, count_non_finite, kth_smallest

__all__ = ["STR", "LearnedSoftThreshold", "calibrate_thresholds"]

# The `threshold_decay` hook of each optimizer STR decays thresholds in (see `STR.on_fit_start`).
_DECAY_HOOKS: weakref.WeakKeyDictionary[Optimizer, StepHooks] = weakref.WeakKeyDictionary()
# Target mode's default ramp, later and longer than ST-3's (0.05 to 0.5): each shift of the thresholds also
# shrinks every surviving weight, which a ramp ending at a lower learning rate lets the weights absorb. On
# MNIST-1D (3 seeds) it gained 0.5 points at 80 % and 0.8 at 90 % over ST-3's span.
_DEFAULT_SPAN = (0.2, 0.8)


class _SoftThreshold(torch.autograd.Function):
    """Forward: `sign(w) * relu(|w| - g)` (`soft_threshold`) of `weight`, already computed as `effective`.
    Backward: that expression's gradients, written out.

    Autograd's backward of a clamp with tensor bounds builds several masks and `where`s for each
    bound, about ten times the cost of the forward on ResNet-18's weights; the same gradients need
    the kept gradient (`kept_gradient`) and one dot product: one fused pass on a large float32 CPU
    weight (`lightning_sparse.kernels`), which reads the forward's `signs` (two bits per weight) rather than
    the weight itself, and four eager passes elsewhere. Taking the effective weight as an input lets every forward
    between two optimizer steps reuse one (see `LearnedSoftThreshold.forward`).
    `ctx` comes to `forward`, as in ST-3's `_StraightThrough`: a `setup_context` costs an `inspect` binding per call.
    """

    @staticmethod
    @override
    def forward(ctx: Any, weight: Tensor, g: Tensor, effective: Tensor, signs: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight, g, signs)
        return effective.view_as(effective)

    @staticmethod
    @override
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        weight, g, signs = ctx.saved_tensors
        # Survivors (|w| > g) pass the gradient through unchanged and give g a gradient of -sign(w);
        # the others give nothing to either, ties included as relu'(0) = 0 (torch's clamp would
        # split the gradient at a tie, which bf16 weights often hit).
        # The incoming gradient is written over when nothing else holds it, as autograd takes such a gradient over
        # as `.grad`: a new one would be new memory, paid for in page faults at every step. Held elsewhere (a
        # gradient passed to `backward(gradient)`, one a tensor hook kept), it is not; nor is one in the weight's own
        # memory (a hook may return a view of it), which writing would change.
        unshared = tensor_owners(grad) == 1 and sys.getrefcount(grad) <= _unshared_references()
        if signs is not None and unshared and grad.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            d_g = kernels.soft_threshold_backward_(grad, signs)
            if d_g is not None:
                return grad, d_g, None, None
        kept = kept_gradient(grad, weight, g)
        return kept, -torch.dot(kept.flatten(), weight.sign().flatten()), None, None


class _ReferenceProbe(torch.autograd.Function):
    """The identity, whose backward records the Python references its incoming gradient has when nothing but
    autograd holds it: their number depends on the versions of Python and torch."""

    counts: ClassVar[list[int]] = []

    @staticmethod
    @override
    def forward(ctx: Any, x: Tensor) -> Tensor:  # `ctx` here too, as `_SoftThreshold` takes it
        return x.clone()

    @staticmethod
    @override
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        _ReferenceProbe.counts.append(sys.getrefcount(grad))  # as `_SoftThreshold.backward` counts its own
        return grad


@functools.cache
def _unshared_references() -> int:
    """How many references `sys.getrefcount` gives a custom backward's incoming gradient that nothing else holds."""
    # The first forward may be a validation's (Lightning's sanity check), in inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        _ReferenceProbe.apply(torch.zeros(1, requires_grad=True)).mul(2.0).sum().backward()
    return _ReferenceProbe.counts.pop()


class LearnedSoftThreshold(SparseParametrization):
    """Soft threshold with one learnable threshold per layer: `sign(w) * relu(|w| - sigmoid(s))`.

    Gradients are those of that expression (as in the paper's code, here with a hand-written
    backward): weights under the threshold get none and `s` is trained by the surviving weights and
    by weight decay, which is what makes the layer sparse. `sharded` says the weight is sharded
    (FSDP2): then no effective weight is kept between forwards.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> bool((layer.weight.abs() <= layer.weight.detach().abs().max()).all())
        True
    """

    def __init__(self, s_init: float, device: torch.device | None = None, sharded: bool = False) -> None:
        super().__init__()
        # float32 whatever the weight's dtype: bf16 cannot hold the small decay steps of `s`.
        self.s = torch.nn.Parameter(torch.tensor(float(s_init), dtype=torch.float32, device=device))
        self.sharded = sharded
        self._effective = EffectiveWeightCache()
        self._signs: Tensor | None = None  # those of the cached effective weight, where the fused loop made it

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> Self:
        # Keep `s` float32 under `module.to(torch.bfloat16)` / `.half()` (Lightning's `bf16-true` converts the
        # whole model): bf16 cannot hold the small decay steps of `s` (-100 has a resolution of 0.5). Device
        # moves still apply.
        dtype = self.s.dtype
        super()._apply(fn, recurse)
        if self.s.dtype != dtype and dtype == torch.float32:
            self.s.data = self.s.data.float()
        return self

    def threshold(self) -> Tensor:
        """The current magnitude threshold `sigmoid(s)`."""
        return torch.sigmoid(self.s)

    @override
    def forward(self, weight: Tensor) -> Tensor:
        g = self.threshold()
        if torch.compiler.is_compiling():
            with torch.no_grad():
                fresh = soft_threshold(weight.detach(), g.detach())
            return cast(Tensor, _SoftThreshold.apply(weight, g, fresh, None))
        _unshared_references()  # measured here, where no backward is running, for the backward to come
        # Sharded (FSDP2), the forward gets the gathered weight, which FSDP2 frees after it: a kept effective weight
        # would hold a full copy of it on every rank.
        if self.sharded:
            with torch.no_grad():
                fresh, signs = _shrink(weight.detach(), g.detach(), torch.empty_like(weight), None)
            return cast(Tensor, _SoftThreshold.apply(weight, g, fresh, signs))

        # The weight and `s` change only at optimizer steps (and `s` at a target's calibration): one effective
        # weight, and its signs, serve every forward in between, computed into the memory of the last ones.
        def compute() -> Tensor:
            stale, self._signs = self._signs, None
            unheld = stale if stale is not None and tensor_owners(stale) == 1 else None  # no graph saved them
            effective, self._signs = _shrink(weight.detach(), g.detach(), self._effective.workspace(weight), unheld)
            return effective

        effective = self._effective.serve((weight, self.s), compute)
        return cast(Tensor, _SoftThreshold.apply(weight, g, effective, self._signs))

    @override
    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive the threshold."""
        return magnitude_above(weight.detach(), self.threshold().detach())

    @classmethod
    @override
    def from_state_dict(cls, original: Tensor, state: Mapping[str, Any]) -> Self | None:
        if set(state) != {"s"}:
            return None
        candidate = cls(s_init=0.0, sharded=is_sharded(original))
        # `assign`: keep the saved dtype (a bf16 threshold after `bf16-true`), to compute as training did.
        candidate.load_state_dict(state, assign=True)
        return candidate


def _shrink(weight: Tensor, g: Tensor, out: Tensor, signs: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """`soft_threshold(weight, g)` into `out`, and where the fused loop serves, the signs its backward reads, into
    `signs` if it fits (else new memory); None for them elsewhere."""
    number = g.item() if kernels.serves(weight) else math.nan
    if number >= 0.0:  # not NaN (a diverged `s`), which takes the general form, as in `soft_threshold`
        signs = kernels.signs_for(weight, reuse=signs)
        if kernels.soft_threshold_into(weight, out, number, signs):
            return out, signs
    return soft_threshold(weight, g, out=out), None


@torch.no_grad()
def calibrate_thresholds(
    layers: Sequence[LearnedSoftThreshold],
    weights: Sequence[Tensor],
    sparsity: float,
    names: Sequence[str] | None = None,
) -> float:
    """Shift every layer's `s` by one `delta` so exactly `round(sparsity * n)` weights are at or under their threshold.

    `weights` are the raw weights, in the order of `layers`. Weight `i` of layer `l` is pruned iff
    `logit(|w_i|) - s_l <= 0`; `delta` is the midpoint between the k-th and (k+1)-th smallest of these
    keys over all layers (float64), so after `s_l += delta` exactly `k` are pruned, up to exact ties.
    The differences between the layers' `s` (their learned budget split) are unchanged. Returns `delta`.
    Raises `NonFiniteWeightsError` before changing anything if a weight holds NaN or inf. Sharded weights
    (FSDP2) are calibrated over every rank's shards, with the same `delta` on every rank
    (`lightning_sparse.thresholds.kth_smallest`).

    Example:
        >>> a, b = LearnedSoftThreshold(s_init=0.0), LearnedSoftThreshold(s_init=-1.0)
        >>> wa, wb = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.01, 0.02, 0.03, 0.04])
        >>> _ = calibrate_thresholds([a, b], [wa, wb], sparsity=0.5)
        >>> int((~a.keep_mask(wa)).sum() + (~b.keep_mask(wb)).sum())
        4
    """
    if not layers:
        return 0.0
    group = shard_group(weights)
    keys = []
    for layer, weight in zip(layers, weights, strict=True):
        magnitude = local_shard(weight).detach().double().abs()
        # logit(1) = inf: a weight of magnitude >= 1 is above every threshold sigmoid(s) < 1.
        keys.append((torch.logit(magnitude.clamp(max=1.0)) - layer.s.detach().double()).flatten())
    nan = torch.stack([torch.isnan(key).any() for key in keys]).any().long().reshape(1)
    if int(all_sum(nan, group)):
        labels = list(names) if names is not None else [f"#{i}" for i in range(len(weights))]
        raise NonFiniteWeightsError(count_non_finite(dict(zip(labels, map(local_shard, weights), strict=True))))
    k = round(sparsity * sum(weight.numel() for weight in weights))
    if k == 0:
        below = _smallest(keys, group)  # below every key: nothing pruned but exact zeros
        lo, hi = -math.inf, below
    else:
        lo = kth_smallest(keys, k, group=group)
        hi = _smallest([key[key > lo] for key in keys], group)
    if math.isfinite(lo) and math.isfinite(hi):
        delta = (lo + hi) / 2
    elif math.isfinite(lo):
        delta = lo + 1.0
    elif math.isfinite(hi):
        delta = hi - 1.0
    else:
        delta = 0.0
    for layer in layers:
        layer.s.add_(delta)
    return delta


def _smallest(keys: Sequence[Tensor], group: Group) -> float:
    """The smallest of all `keys` (1-D, non-empty list) over the ranks of `group`; inf if they hold no element."""
    smallest = torch.cat([key.min().reshape(1) for key in keys if key.numel()] + [keys[0].new_full((1,), math.inf)])
    return all_gather_cat(smallest.min().reshape(1), group).min().item()


@dataclass(frozen=True)
class STR(SparsityMethod):
    """STR: one learnable threshold per layer, trained by your optimizer; optionally a target sparsity.

    Plain (no `target_sparsity`): sparsity comes from weight decay pulling the negative `s` towards 0
    against the loss: the decay sets how sparse the model gets, `s_init` mostly when pruning starts.

    With `target_sparsity`: after each optimizer step from `start` on, every layer's `s` is shifted by
    one common amount in logit space so that exactly the schedule's fraction of the sparsified weights is
    zero (`calibrate_thresholds`); the gradients still train each `s`, so the split of the budget between
    layers is STR's, learned. Fit ends at exactly `target_sparsity` (up to ties). See the module's docstring.

    Args:
        s_init: Initial threshold parameter; `sigmoid(s_init)` is the initial threshold. Default -100.
        threshold_decay: Weight decay of the thresholds, applied by your optimizer in place of the one
            of their param group, its way: added to the gradient (SGD, Adam, RMSprop, ...) or
            multiplying them by `1 - lr * threshold_decay` (AdamW, `decoupled_weight_decay=True`). The
            thresholds stay in their weight's param group, so its learning rate, momentum and LR
            schedule are theirs. Needs an optimizer with weight decay. Default: whatever your
            optimizer applies to the weights around them.
        target_sparsity: Final fraction of zeros over all sparsified weights, in [0, 1). Default: none
            (plain STR).
        start, end, schedule: As ST-3's (`ST3`): where the target ramps from 0 to `target_sparsity`
            (optimizer step or fraction of the run; default 0.2 and 0.8, later than ST-3's), and its shape (``"cubic"``
            by default, ``"linear"``, ``"constant"``, or a schedule object replacing the three others).

    Example:
        >>> STR(target_sparsity=0.9).for_run(total_steps=100).target(100)
        0.9
        >>> STR(s_init=-5.0, threshold_decay=2e-2).name
        'str'
        >>> STR(threshold_decay=float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: `threshold_decay` must be a finite number in [0, inf], got nan
    """

    s_init: float = -100.0
    threshold_decay: float | None = None
    target_sparsity: float | None = None
    start: StepOrFraction | None = None
    end: StepOrFraction | None = None
    schedule: str | Schedule = "cubic"

    parametrization_class = LearnedSoftThreshold

    def __post_init__(self) -> None:
        object.__setattr__(self, "s_init", check_real("s_init", self.s_init))
        if self.threshold_decay is not None:
            object.__setattr__(self, "threshold_decay", check_real("threshold_decay", self.threshold_decay, low=0.0))
        plain = self.target_sparsity is None and self.schedule == "cubic"
        if plain and (self.start is not None or self.end is not None):
            raise ValueError("`start` and `end` set when STR's target sparsity ramps: give `target_sparsity` too")
        if not plain:
            checked = check_schedule_settings(
                self.schedule, self.target_sparsity, self.start, self.end, default_span=_DEFAULT_SPAN
            )
            for name, value in checked.items():
                object.__setattr__(self, name, value)
            check_order(self.schedule, self.start, self.end)

    @property
    def has_target(self) -> bool:
        """Whether this STR follows a target sparsity (else the plain method, sparsity from decay)."""
        return self.target_sparsity is not None or not isinstance(self.schedule, str)

    @override
    def for_run(self, total_steps: float) -> Self:
        if not self.has_target or not isinstance(self.schedule, str):
            return self
        start, end = resolve_ramp(self.schedule, self.start, self.end, total_steps)
        check_order(self.schedule, start, end, unit="step ")
        assert self.target_sparsity is not None and start is not None and end is not None
        schedule = build_schedule(self.schedule, self.target_sparsity, start, end)
        return dataclasses.replace(self, schedule=schedule, target_sparsity=None, start=None, end=None)

    @override
    def after_optimizer_step(self, step: int, layers: SparseLayers) -> None:
        """With a target: shift every threshold so the sparsity is exactly the schedule's (none before `start`)."""
        if not self.has_target:
            return
        sparsity = self.target(step)
        if sparsity is None or sparsity <= 0.0:
            return
        mine = {name: w for name, w in layers.items() if isinstance(w.parametrization, LearnedSoftThreshold)}
        try:
            calibrate_thresholds(
                [cast(LearnedSoftThreshold, w.parametrization) for w in mine.values()],
                [w.raw for w in mine.values()],
                sparsity,
                names=list(mine),
            )
        except NonFiniteWeightsError as error:
            raise NonFiniteWeightsError(error.layers, step) from None

    @override
    def target(self, step: int) -> float | None:
        if not self.has_target:
            return None
        if isinstance(self.schedule, str):
            raise RuntimeError("STR's schedule is in fractions of a run: call `for_run(total_steps)` first")
        return self.schedule.sparsity_at(step)

    @property
    @override
    def name(self) -> str:
        return "str"

    @override
    def parametrization(self, weight: Tensor, output_axis: int) -> LearnedSoftThreshold:
        parametrization = LearnedSoftThreshold(self.s_init, device=weight.device, sharded=is_sharded(weight))
        # Sharded, each rank holds `s` in full and FSDP2 does not manage it: average its gradient as FSDP2 does
        # the weights', so that every rank's `s` stays the same.
        average_gradient_over(parametrization.s, shard_group([weight]))
        return parametrization

    @override
    def on_fit_start(self, layers: SparseLayers, optimizers: Sequence[Optimizer]) -> list[str]:
        """Put each threshold in the param group of its weight, so your optimizer and LR schedule train it.

        A threshold some optimizer already holds (`configure_optimizers` saw it among the model's
        parameters) stays where it is; the others join their weight's group, and no group is added. With
        `threshold_decay`, each optimizer holding thresholds decays them by it at each of its steps from
        now on (`decay_at_each_step`: after gradient clipping, right before the update).

        Raises, before changing anything, if `threshold_decay` is set and the optimizer of a threshold has
        no weight decay or one of unknown kind, or if a threshold would have to join Muon's (which trains
        only 2-D parameters). Warns when nothing decays the thresholds (the model would stay dense), when a
        weight is in no optimizer, when the thresholds already prune every weight, and when a weight is all
        zeros: STR gives no gradient to a weight at or under its threshold, so a zero-initialised weight (a
        ViT's classifier head, adaLN-zero, LoRA's B) would never train.
        """
        mine = {n: w for n, w in layers.items() if isinstance(w.parametrization, LearnedSoftThreshold)}
        pairs = [(cast(LearnedSoftThreshold, w.parametrization), w.raw) for w in mine.values()]
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
        if groups and self.threshold_decay is None and not any(decays) and not self.has_target:
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
            zero = [name for name, (_, w) in zip(mine, pairs, strict=True) if not w.any()]
        if zero:
            warnings.append(
                f"These sparsified weights are all zeros at fit start: {', '.join(map(repr, zero))}. STR gives a "
                "weight at or under its threshold no gradient, so a zero-initialised weight (a classifier head, "
                "adaLN-zero, LoRA's B) never trains. Leave them dense with `exclude=[...]` naming them, initialise "
                "them with small non-zero values, or use ST-3, whose straight-through gradient trains them."
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
        """``threshold/<layer name>``: each layer's threshold `sigmoid(s)`; with a target, ``sparsity/target``."""
        named = {n: w.parametrization for n, w in layers.items() if isinstance(w.parametrization, LearnedSoftThreshold)}
        metrics: dict[str, float] = {}
        target = self.target(step)
        if target is not None:
            metrics["sparsity/target"] = target
        if not named:
            return metrics
        values = torch.stack([p.threshold().detach().float() for p in named.values()]).tolist()
        return metrics | {f"threshold/{name}": value for name, value in zip(named, values, strict=True)}


def _threshold_name(weight_name: str) -> str:
    """The name of a threshold in an optimizer's `param_names`, from that of its weight (`...weight.original`)."""
    return f"{weight_name.removesuffix('.original')}.0.s" if weight_name.endswith(".original") else f"{weight_name}.s"
