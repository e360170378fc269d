"""ST-3: soft thresholding with straight-through gradients (Vanderschueren & De Vleeschouwer, WACV 2023)."""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_sparse import kernels
from lightning_sparse.arguments import StepOrFraction, check_bool, check_real, check_step_or_fraction
from lightning_sparse.methods.base import (
    EffectiveWeightCache,
    SparseLayers,
    SparseParametrization,
    SparsityMethod,
    distinct_weights,
    magnitude_above,
    soft_threshold,
)
from lightning_sparse.schedules import (
    Schedule,
    build_schedule,
    check_order,
    check_schedule_settings,
    resolve_ramp,
    to_step,
)
from lightning_sparse.sharding import full_like, is_sharded, local_shard, shard_group, shard_like
from lightning_sparse.thresholds import (
    NonFiniteWeightsError,
    WarmBracket,
    floored_magnitude_thresholds,
    min_kept_per_layer,
)

__all__ = [
    "ST3",
    "StraightThroughSoftThreshold",
    "channel_totals",
    "shrink_for",
    "sigma_scale",
    "update_thresholds",
]


def _soft_threshold(weight: Tensor, threshold: Tensor, scale: Tensor) -> Tensor:
    """ST-3's effective weight, `sign(w) * relu(|w| - t) * c`, in the weight's dtype."""
    return soft_threshold(weight, threshold).mul_(scale.to(weight.dtype))


class _StraightThrough(torch.autograd.Function):
    """Forward: an effective weight already computed from `weight`. Backward: the identity, to `weight`.

    Pruned weights keep receiving the full gradient, so they can come back at the next threshold. Taking
    the effective weight as an input lets every forward between two changes of the raw weight (gradient
    accumulation, validation) reuse one: the soft threshold and rescale cost one pass per optimizer step.

    `ctx` comes to `forward` (no `setup_context`): with one, torch binds each call's arguments to `forward`'s
    signature through `inspect`, about 20 us per layer and forward, which on a GPU is host time the step waits on.
    """

    @staticmethod
    @override
    def forward(ctx: Any, weight: Tensor, effective: Tensor) -> Tensor:
        return effective.view_as(effective)

    @staticmethod
    @override
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class StraightThroughSoftThreshold(SparseParametrization):
    """ST-3's reparameterization of one weight: `sign(w) * relu(|w| - t) * c`, straight-through.

    `t` (the layer's threshold) and the per-output-channel rescale `c` are buffers set by
    `update_thresholds` after each optimizer step; the keep mask is `|w| > t`, derived, not stored (a byte per
    weight less to hold), though saved with the weight in a state dict as `mask`. Once frozen, the mask is
    stored and the forward is `w * mask` with the true gradient, so only surviving weights train.
    `output_axis` is where the output channels run: 0 for torch's layers, 1 for a `ConvTranspose` or a Hugging
    Face `Conv1D`. On a weight sharded by FSDP2 (a `DTensor`), the mask and rescale are sharded like it
    (`lightning_sparse.sharding`).

    Example:
        >>> from torch.nn.utils import parametrize
        >>> layer = torch.nn.Linear(4, 2)
        >>> st3 = StraightThroughSoftThreshold(layer.weight)
        >>> _ = parametrize.register_parametrization(layer, "weight", st3)
        >>> _ = update_thresholds([st3], [layer.parametrizations.weight.original], sparsity=0.5)
        >>> int((layer.weight == 0).sum())
        4
    """

    threshold: Tensor
    mask: Tensor | None
    scale: Tensor

    def __init__(self, weight: Tensor, rescale: bool = True, output_axis: int = 0) -> None:
        super().__init__()
        self.rescale = rescale
        self.output_axis = output_axis
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=weight.device))
        self.register_buffer("mask", None)  # stored once frozen
        local = local_shard(weight)
        scale_shape, local_shape = [1] * weight.dim(), [1] * weight.dim()
        scale_shape[output_axis], local_shape[output_axis] = weight.shape[output_axis], local.shape[output_axis]
        scale = torch.ones(local_shape, dtype=torch.float32, device=local.device)
        self.register_buffer("scale", shard_like(scale, weight, scale_shape))
        self._effective = EffectiveWeightCache()

    @property
    def frozen(self) -> bool:
        """Whether the mask is fixed (`freeze`): then it is stored, and only surviving weights train."""
        return self.mask is not None

    @override
    def forward(self, weight: Tensor) -> Tensor:
        if self.mask is not None:
            return weight * full_like(self.mask, weight)
        # Sharded, the forward gets the gathered weight, which FSDP2 frees after it: a cached effective weight
        # would keep a full copy of it alive on every rank.
        if torch.compiler.is_compiling() or is_sharded(self.scale):
            with torch.no_grad():
                fresh = _soft_threshold(weight.detach(), self.threshold, full_like(self.scale, weight))
            return cast(Tensor, _StraightThrough.apply(weight, fresh))
        effective = self._effective.serve(
            (weight, self.threshold, self.scale), lambda: _soft_threshold(weight.detach(), self.threshold, self.scale)
        )
        return cast(Tensor, _StraightThrough.apply(weight, effective))

    @override
    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of `weight` survive: `|w| > t` (compared in float32, as the update does), or the frozen mask.

        After an update and until the next optimizer step, that is exactly where the effective weight is non-zero.
        """
        if self.mask is not None:
            return self.mask
        local = local_shard(weight).detach()
        return shard_like(magnitude_above(local.float(), self.threshold), weight, weight.shape)

    @classmethod
    @override
    def from_state_dict(cls, original: Tensor, state: Mapping[str, Any]) -> Self | None:
        """ST-3's parametrization saved as `state`; None if `state` is not ST-3's. Raises a `KeyError` naming the
        missing entries if `state` holds two or more of ST-3's entries and nothing else, but not all: that is a
        damaged ST-3 state, not another parametrization's (one entry alone, e.g. a `mask`, could be). The `mask` is
        an entry of a frozen layer's state, and optional in an unfrozen one's, which derives it."""
        scale = state.get("scale")
        # The saved rescale is shaped along the output axis: the one dimension it does not broadcast over.
        axis = next((i for i, n in enumerate(scale.shape) if n != 1), 0) if isinstance(scale, Tensor) else 0
        candidate = cls(original, output_axis=axis)
        expected, given = set(candidate.state_dict()), set(state)
        if _frozen_in(state.get("_extra_state")):
            expected.add("mask")
        else:
            given.discard("mask")
        if given != expected:
            if given < expected and len(given) >= 2:
                raise KeyError(*sorted(expected - given))
            return None
        # `assign`: keep the saved dtypes, to compute as training did.
        candidate.load_state_dict(state, assign=True)
        return candidate

    @torch.no_grad()
    def set_threshold(self, weight: Tensor, threshold: float, width: float = 1.0) -> None:
        """Prune the entries of `weight` with `|w| * width <= threshold`, recompute the channel rescale, and leave the
        new effective weight ready for the next forward.

        `width` is ST-3σ's normalisation, and `threshold` is in its units, as the global selection compared them.
        The layer's own threshold is `shrink_for(threshold, width)`, which prunes those same entries, so the mask
        and the effective weight's zeros agree. Sharded, the local shard of the rescale is written.
        """
        local, scale = local_shard(weight).detach(), local_shard(self.scale)
        shrink = shrink_for(threshold, width)
        self.threshold.fill_(shrink)
        # The paper code's 1.01 / (r + 0.01), r the kept fraction of a channel's L1 mass: about 1/r, bounded when a
        # channel is fully pruned; its 1e-6 is added to each L1 *mean* over the channel, so here to each sum times
        # the channel's size.
        epsilon = 1e-6 * local.numel() / max(local.shape[self.output_axis], 1)
        # The next forward computes a sharded weight's (see `forward`) or another dtype's; a float32 one is computed
        # here, by the fused loop or `softshrink.out`, into the memory of the stale one.
        effective = None
        if is_sharded(weight) or weight.dtype != torch.float32:
            self._effective.clear()
        else:
            effective = self._effective.workspace(weight)
        # All of it in one pass per output channel, on a float32 CPU weight with its channels first (or a shard of
        # one: FSDP2 shards the channels, each rank holding whole ones).
        fused = self.output_axis == 0 and kernels.st3_apply(local, effective, scale, shrink, self.rescale, epsilon)
        if not fused:
            if self.rescale:
                magnitude = local.float().abs() if effective is None else torch.abs(local, out=effective)
                total = channel_totals(magnitude, self.output_axis)
                # Zero the pruned magnitudes in place: `threshold_` is the keep mask's own comparison.
                torch.threshold_(magnitude, shrink, 0.0)
                kept = channel_totals(magnitude, self.output_axis)
                kept_fraction = (kept + epsilon) / (total + epsilon)
                torch.div(1.01, kept_fraction + 0.01, out=scale)
            if effective is not None:
                # What `forward` computes (`soft_threshold`), in memory already there: softshrink is
                # `sign(w) * relu(|w| - t)` bit for bit (t, a Python float, is the float32 buffer's value).
                torch.ops.aten.softshrink.out(local, shrink, out=effective).mul_(self.scale)
        if effective is not None:
            self._effective.store((weight, self.threshold, self.scale), effective)

    @torch.no_grad()
    def freeze(self, weight: Tensor) -> None:
        """Bake the current effective weight into `weight` and fix the mask from now on."""
        mask = self.keep_mask(weight)
        weight.copy_(self(weight))
        self.mask = mask

    @override
    def get_extra_state(self) -> dict[str, bool]:
        return {"frozen": self.frozen}

    @override
    def set_extra_state(self, state: dict[str, bool]) -> None:
        pass  # the frozen flag is whether a mask is stored, which `_load_from_state_dict` settled by it

    @override
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Saved with the weight, an unfrozen layer's derived mask too, so checkpoints keep one layout: loaders that
        # build the expected entries from the model as it is (distributed checkpoints) then restore a frozen one.
        # The weight is its `ParametrizationList`'s `original`, which that list saved before its parametrizations:
        # under the prefix without this module's own last component (`"0."` of `"fc.parametrizations.weight.0."`).
        original = destination.get(prefix[: prefix.rstrip(".").rfind(".") + 1] + "original")
        if self.mask is None and isinstance(original, Tensor):
            destination[prefix + "mask"] = self.keep_mask(original)

    @override
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:  # fmt: skip
        key, extra_key = prefix + "mask", prefix + "_extra_state"
        # A state without the frozen flag (a partial load) leaves the layer as frozen as it is.
        if not (_frozen_in(state_dict[extra_key]) if extra_key in state_dict else self.frozen):
            state_dict.pop(key, None)  # derived from the weight
            self.mask = None
        elif self.mask is None and key not in state_dict:
            missing_keys.append(key)  # which `super()` would not report: it expects only the buffers there are
        elif self.mask is None:
            # Room to load the saved mask into (or to be assigned over, with `assign`): sharded like it, or a plain
            # tensor on this module's device, as loading a buffer keeps it.
            saved = state_dict[key]
            self.mask = (
                torch.empty_like(saved) if is_sharded(saved) else torch.empty_like(saved, device=self.threshold.device)
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )  # fmt: skip


def _frozen_in(extra_state: Any) -> bool:
    """Whether an ST-3 parametrization's saved extra state is a frozen layer's."""
    return isinstance(extra_state, Mapping) and bool(extra_state.get("frozen"))


def channel_totals(magnitude: Tensor, output_axis: int = 0) -> Tensor:
    """The L1 mass of each output channel (along `output_axis`), shaped like the channel rescale.

    A 1-D weight's entries are each their own channel (`sum` over no dimension would sum them all).

    Example:
        >>> channel_totals(torch.ones(2, 3, 4)).flatten().tolist(), channel_totals(torch.ones(3)).tolist()
        ([12.0, 12.0], [1.0, 1.0, 1.0])
        >>> channel_totals(torch.ones(2, 3), output_axis=1).tolist()
        [[2.0, 2.0, 2.0]]
    """
    if magnitude.dim() <= 1:
        return magnitude.clone()
    return magnitude.sum(tuple(d for d in range(magnitude.dim()) if d != output_axis), keepdim=True)


def shrink_for(threshold: float, width: float) -> float:
    """The float32 threshold `s` on `|w|` that prunes exactly what `|w| * width <= threshold` prunes (in float32, as
    the global selection and the mask compare): ST-3σ's per-layer shrink, which is `threshold / width` up to its
    rounding. With `threshold / width` itself, the weight at the global threshold could round to kept, and the
    effective weight keep an entry of order 1e-8 that the mask prunes.

    Example:
        >>> width = math.sqrt(3.0)
        >>> at = torch.tensor(shrink_for(0.5, width))
        >>> above = torch.nextafter(at, torch.tensor(1.0))
        >>> bool(at * width <= 0.5), bool(above * width > 0.5)  # float32 products, as the selection computes them
        (True, True)
    """
    threshold = _float32(threshold)
    if width == 1.0:
        return threshold
    factor = _float32(width)

    def pruned(magnitude: float) -> bool:
        # A product of two float32 values is exact in a double: rounding it once gives the float32 product.
        return _float32(magnitude * factor) <= threshold

    shrink = _float32(threshold / factor)
    while shrink > 0.0 and not pruned(shrink):
        shrink = _next_float32(shrink, up=False)
    while pruned(_next_float32(shrink, up=True)):
        shrink = _next_float32(shrink, up=True)
    return shrink


_FLOAT32, _UINT32 = struct.Struct("<f"), struct.Struct("<I")


def _float32(value: float) -> float:
    return float(_FLOAT32.unpack(_FLOAT32.pack(value))[0])


def _next_float32(value: float, up: bool) -> float:
    """The float32 next to the non-negative float32 `value`, above or below it."""
    bits = _UINT32.unpack(_FLOAT32.pack(value))[0]
    return float(_FLOAT32.unpack(_UINT32.pack(bits + (1 if up else -1)))[0])


def sigma_scale(weight: Tensor) -> float:
    """ST-3σ's width normalisation: magnitudes are compared as `|w| * sqrt(sum(weight.shape))`.

    Example:
        >>> sigma_scale(torch.zeros(16, 8, 6, 6))
        6.0
    """
    return math.sqrt(sum(weight.shape))


@torch.no_grad()
def update_thresholds(
    layers: Sequence[StraightThroughSoftThreshold],
    weights: Sequence[Tensor],
    sparsity: float,
    sigma: bool = False,
    names: Sequence[str] | None = None,
    min_density: float = 0.0,
    warm: WarmBracket | None = None,
) -> float:
    """Set every layer's threshold from one global magnitude quantile at `sparsity`.

    `weights` are the raw (original) weights, in the order of `layers`. With `sigma`, each layer's
    magnitudes are width-normalised first (ST-3σ), which spreads the budget more evenly. With
    `min_density`, every layer keeps at least `ceil(min_density * its size)` weights (its largest), the
    global count of zeros staying `round(sparsity * n)`: see `floored_magnitude_thresholds`.
    Returns the global threshold (in normalised units under `sigma`), which layers held at their
    minimum undercut. `warm`, kept from one step's update to the next, brackets the selection from the last one
    (`lightning_sparse.thresholds.WarmBracket`): the same thresholds, without a sample.

    Raises `NonFiniteWeightsError` naming the layers (by `names`, else by position) whose weights hold
    NaN or inf, before any layer changes: a NaN is neither pruned nor kept.

    Sharded weights (FSDP2) are thresholded over all ranks' shards with the same result on every rank, each
    rank reading and writing only its own shards (`lightning_sparse.thresholds`); a NaN on any rank raises on all.

    Example:
        >>> w = torch.arange(1.0, 11.0).reshape(2, 5)
        >>> st3 = StraightThroughSoftThreshold(w, rescale=False)
        >>> update_thresholds([st3], [w], sparsity=0.3)
        3.0
        >>> st3.keep_mask(w).sum().item()
        7
    """
    group = shard_group(weights)
    shards = [local_shard(w).detach() for w in weights]
    scales = [sigma_scale(w) if sigma else 1.0 for w in weights]
    sizes = [w.numel() for w in weights]
    check_min_density(sizes, sparsity, min_density)
    floors = min_kept_per_layer(sizes, min_density)
    # Raises on NaN or inf before returning, from the counts of its own pass over the weights.
    tau, thresholds = floored_magnitude_thresholds(shards, sparsity, floors, scales, group, names, warm)
    for layer, weight, threshold, scale in zip(layers, weights, thresholds, scales, strict=True):
        layer.set_threshold(weight, threshold, scale)
    return tau


def check_min_density(sizes: Sequence[int], sparsity: float, min_density: float) -> None:
    """Raise a `ValueError` naming `min_density` if layers of `sizes` weights cannot each keep that fraction at
    `sparsity`: their minimums, rounded up per layer, must fit in what the sparsity leaves.

    Example:
        >>> check_min_density([1000, 10], sparsity=0.9, min_density=0.15)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `min_density=0.15` keeps at least 152 of the 1,010 sparsified weights (ceil(0.15 x its size) in \
each of the 2 layers), more than the 101 that sparsity 0.9 leaves: lower `min_density` ...
    """
    if not min_density:
        return
    total = sum(sizes)
    kept = total - round(sparsity * total)
    floors = sum(min_kept_per_layer(sizes, min_density))
    if floors > kept:
        raise ValueError(
            f"`min_density={min_density:g}` keeps at least {floors:,} of the {total:,} sparsified weights "
            f"(ceil({min_density:g} x its size) in each of the {len(sizes)} layers), more than the {kept:,} that "
            f"sparsity {sparsity:g} leaves: lower `min_density` (at most 1 - the target sparsity, less the rounding "
            "up in small layers) or the target sparsity"
        )


@dataclass(frozen=True)
class ST3(SparsityMethod):
    """ST-3: one global magnitude threshold after every optimizer step, following a schedule.

    The effective weight is `sign(w) * relu(|w| - t) * c` with straight-through gradients: every raw
    weight, pruned or not, gets the gradient of its effective weight, so pruned weights can come back.
    `t` is chosen after each optimizer step so that the schedule's fraction of all sparsified weights
    is zero; `c` rescales each output channel by about 1 / (fraction of its L1 mass kept).

    Args:
        target_sparsity: Final fraction of zeros over all sparsified weights, in [0, 1).
        start, end: Where the schedule starts and reaches `target_sparsity`: an optimizer step (int)
            or a fraction of the run's optimizer steps (float). Default 0.05 and 0.5.
        schedule: ``"cubic"`` (default), ``"linear"``, ``"constant"`` (the full target from `start`),
            or any object with a `sparsity_at(step)` method, which then replaces `target_sparsity`,
            `start` and `end`.
        freeze_at: Step or fraction from which masks are fixed and only surviving weights train
            (the papers' fine-tune). Default: never.
        rescale: The per-output-channel rescale of the paper's code. Default True.
        sigma: ST-3σ: compare `|w| * sqrt(sum(weight.shape))` across layers, which spreads the
            budget more evenly and gives fewer FLOPs at the same sparsity.
        min_density: Every sparsified layer keeps at least this fraction of its weights (rounded up:
            at least one weight), its largest, so no layer is pruned away whole; the global sparsity
            stays exact (layers held at their minimum leave fewer weights to the others). In
            [0, 1 - target_sparsity]. Default 0: one global threshold, which can empty a layer whose
            weights are small next to the others' (e.g. a classifier initialised at std 0.01).

    Example:
        >>> ST3(target_sparsity=0.9, freeze_at=0.9).for_run(total_steps=100).freeze_at
        90
        >>> ST3(target_sparsity=0.9, end=0.5, freeze_at=3).for_run(total_steps=16)
        Traceback (most recent call last):
        ...
        ValueError: `freeze_at` (step 3) must not come before `end` (step 8): masks would freeze mid-schedule
        >>> ST3(target_sparsity=0.9, min_density=0.2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `min_density` (0.2) must be at most 1 - `target_sparsity` (0.9): ...
    """

    target_sparsity: float | None = None
    start: StepOrFraction | None = None
    end: StepOrFraction | None = None
    schedule: str | Schedule = "cubic"
    freeze_at: StepOrFraction | None = None
    rescale: bool = True
    sigma: bool = False
    min_density: float = 0.0
    # Where the last update's selection found the threshold, for the next one to start from: a cache that gives the
    # same thresholds as none (see `WarmBracket`), so not a setting (not an `__init__` argument); each resolved
    # method, one per fit, starts its own.
    _warm: WarmBracket = dataclasses.field(default_factory=WarmBracket, init=False, repr=False, compare=False)

    parametrization_class = StraightThroughSoftThreshold
    reparameterization_settings = frozenset({"rescale"})

    def __post_init__(self) -> None:
        checked = check_schedule_settings(self.schedule, self.target_sparsity, self.start, self.end)
        if self.freeze_at is not None:
            checked["freeze_at"] = check_step_or_fraction("freeze_at", self.freeze_at)
        checked["rescale"] = check_bool("rescale", self.rescale)
        checked["sigma"] = check_bool("sigma", self.sigma)
        checked["min_density"] = check_real("min_density", self.min_density, low=0.0, high=1.0)
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        check_order(self.schedule, self.start, self.end, self.freeze_at)
        # With a tolerance: 1 - 0.9 is 0.09999999999999998 in floating point, and 0.1 with 0.9 is allowed.
        if self.target_sparsity is not None and self.min_density + self.target_sparsity > 1.0 + 1e-12:
            raise ValueError(
                f"`min_density` ({self.min_density:g}) must be at most 1 - `target_sparsity` "
                f"({self.target_sparsity:g}): the layers cannot each keep more than the fraction of weights the target "
                "leaves; lower one of them"
            )

    @property
    @override
    def name(self) -> str:
        return "st3sigma" if self.sigma else "st3"

    @override
    def for_run(self, total_steps: float) -> Self:
        start, end = resolve_ramp(self.schedule, self.start, self.end, total_steps)
        freeze_at = to_step("freeze_at", self.freeze_at, total_steps)
        # On a very short run (`fast_dev_run`) fractions in order can round onto one step: keep their order.
        fractions = isinstance(self.end, float) and isinstance(self.freeze_at, float)
        if freeze_at is not None and end is not None and fractions:
            freeze_at = max(freeze_at, end)
        check_order(self.schedule, start, end, freeze_at, unit="step ")
        if not isinstance(self.schedule, str):
            return dataclasses.replace(self, freeze_at=freeze_at)
        # The resolved method carries its schedule as an object, like a user-given one.
        assert self.target_sparsity is not None and start is not None and end is not None
        schedule = build_schedule(self.schedule, self.target_sparsity, start, end)
        return dataclasses.replace(
            self, schedule=schedule, target_sparsity=None, start=None, end=None, freeze_at=freeze_at
        )

    @override
    def parametrization(self, weight: Tensor, output_axis: int) -> StraightThroughSoftThreshold:
        return StraightThroughSoftThreshold(weight, rescale=self.rescale, output_axis=output_axis)

    @override
    def owns(self, parametrization: nn.Module) -> bool:
        return isinstance(parametrization, StraightThroughSoftThreshold) and parametrization.rescale == self.rescale

    @override
    def on_fit_start(self, layers: SparseLayers, optimizers: Sequence[Optimizer]) -> list[str]:
        """Refuse a `min_density` that the layers, rounded up one by one, cannot keep at the final sparsity."""
        check_min_density([w.raw.numel() for w in layers.values()], self.target(sys.maxsize), self.min_density)
        return []

    @override
    def after_optimizer_step(self, step: int, layers: SparseLayers) -> None:
        """Update every mask and rescale; raises `NonFiniteWeightsError` (naming layers and `step`) on NaN or inf."""
        mine = {name: w for name, w in layers.items() if isinstance(w.parametrization, StraightThroughSoftThreshold)}
        parametrizations = [cast(StraightThroughSoftThreshold, w.parametrization) for w in mine.values()]
        if any(p.frozen for p in parametrizations):
            return
        try:
            update_thresholds(
                parametrizations, [w.raw for w in mine.values()], self._schedule().sparsity_at(step), self.sigma,
                names=list(mine), min_density=self.min_density, warm=self._warm,
            )  # fmt: skip
        except NonFiniteWeightsError as error:
            raise NonFiniteWeightsError(error.layers, step) from None
        if isinstance(self.freeze_at, int) and step >= self.freeze_at:
            for p, weight in zip(parametrizations, mine.values(), strict=True):
                p.freeze(weight.raw)

    @override
    def metrics(self, step: int, layers: SparseLayers) -> dict[str, float]:
        """``sparsity/target`` (the schedule's value) and ``sparsity/threshold`` (the global threshold)."""
        metrics = {"sparsity/target": self.target(step)}
        pairs = [(p, w) for p, w in distinct_weights(layers) if isinstance(p, StraightThroughSoftThreshold)]
        if pairs:
            # Each layer holds its threshold in its own units (divided by its width under σ): the global one, or a
            # lower one if `min_density` holds it at its minimum. The largest is the global threshold.
            thresholds = torch.stack([p.threshold for p, _ in pairs]).tolist()
            scales = [sigma_scale(w) if self.sigma else 1.0 for _, w in pairs]
            metrics["sparsity/threshold"] = max(t * s for t, s in zip(thresholds, scales, strict=True))
        return metrics

    @override
    def target(self, step: int) -> float:
        return self._schedule().sparsity_at(step)

    def _schedule(self) -> Schedule:
        if isinstance(self.schedule, str):
            raise RuntimeError("ST3's schedule is in fractions of a run: call `for_run(total_steps)` first")
        return self.schedule
