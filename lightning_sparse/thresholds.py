"""Global magnitude threshold: the budget distribution of ST-3 (one quantile over all layers), optionally with a
minimum number of weights kept in every layer, and the error for weights no threshold or sparsity can be taken of
(NaN, inf).

Every threshold here is one exact selection, `kth_smallest`: the k-th smallest of all values of all layers
(ST-3's magnitudes, ST-3σ's width-normalised ones, one layer's for a `min_density` floor, STR's logit keys).
Small inputs are selected directly. Above 2 x 2^16 elements:

1. **Sample.** Every `stride`-th element of each layer (`stride = n // 2^16`): about 2^16 values.
2. **Bracket.** The sample's order statistics at `k/n` plus and minus a 5-sigma binomial margin give
   `lo <= hi` that hold the k-th smallest value of all with near certainty.
3. **Count and select.** Those below `lo` are counted and those inside `[lo, hi]` (about 1 % of them at 2^16
   samples) taken out: in one fused loop on float32 CPU values (`lightning_sparse.kernels`), else with two
   comparisons per element and an index of the blocks holding one, over layers concatenated in groups (on a GPU,
   each such pass waits for the device: once per group, not once per layer). The k-th smallest of all is the
   `(k - below)`-th smallest inside, selected exactly. If the bracket missed (`k` not in
   `(below, below + inside]`), the selection is over all values. The same pass counts the NaN and infinite
   magnitudes, which have no rank: a magnitude selection raises `NonFiniteWeightsError` on them, with no pass
   of its own (STR's keys, not magnitudes, may be infinite).

A selection made again and again over the same values (ST-3's, after every optimizer step) can be given a
`WarmBracket`: steps 1 and 2 then give way to a bracket centred where the last selection's value, the change of `k`
and the values' drift put it, which holds a few thousand values instead of about 1 % of them; the sample's bracket
serves the first selection and any that the warm one misses.

Magnitude thresholds take `|w|` as each step reads the weights: above 2 x 2^16 elements only the sample's and
the bracket's magnitudes are ever materialised (all of them only when the bracket missed). The order statistics
of steps 2 and 3 come from a fused quickselect where it serves, else `kthvalue` (a sort on a GPU): the same value
either way.

Sharded (FSDP2: each rank holds a shard of every weight, `group` is their process group), the same three
steps run on each rank's shards with collectives in between, and no rank ever gathers the weights:

1. each rank samples its shards; the samples are all-gathered (concatenated in rank order): `2^16` values
   in all, the same on every rank, so every rank computes the same `lo` and `hi`;
2. the counts below and inside are all-reduced (two integers);
3. the values inside the bracket are all-gathered (about 1 % of all, split over the ranks) and selected.
   If the bracket missed, each rank keeps only its values on the side of the bracket that holds the k-th and
   the selection repeats on those (a new sample, a new bracket), never over all values.

Communication per selection is the sample, two counts and the bracket; the result is exact, deterministic (no
RNG) and bit-identical on every rank, and on one process the same value as a plain `kthvalue`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from lightning_sparse import kernels
from lightning_sparse.sharding import Group, all_gather_cat, all_sum

__all__ = [
    "NonFiniteWeightsError",
    "WarmBracket",
    "count_non_finite",
    "floored_magnitude_thresholds",
    "global_magnitude_threshold",
    "kth_smallest",
    "min_kept_per_layer",
]

# Above this many elements, a strided sample brackets the quantile and only the elements inside
# the bracket are selected exactly: a few cheap passes instead of a full selection, which costs
# ~0.4 s on 11 M CPU floats (and `torch.quantile` refuses more than 2^24 elements at all).
_SAMPLE_SIZE = 1 << 16
# The most elements the eager counting pass reads at once, from layers concatenated (`_counting_passes`): 128 MiB
# of float32, beside the passes' own temporaries.
_GROUP_SIZE = 1 << 25
# About how many values a warm bracket (`WarmBracket`) holds beyond its prediction's error: a selection among them
# costs well under a millisecond, and a miss (one more counting pass) is rarer the more it holds.
_WARM_ROOM = 4096


class NonFiniteWeightsError(FloatingPointError):
    """Sparsified weights hold NaN or inf: training has diverged, and no sparsity can be set or measured.

    `layers` maps each such layer's name to its count of non-finite entries and its size; `step` is the
    optimizer step after which they were found, if known.

    Example:
        >>> raise NonFiniteWeightsError({"fc": (3, 64)}, step=7)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_sparse.thresholds.NonFiniteWeightsError: lightning-sparse: sparsified weights hold NaN or inf after \
optimizer step 7: 'fc' (3 of 64 entries). ...
    """

    def __init__(self, layers: Mapping[str, tuple[int, int]], step: int | None = None) -> None:
        self.layers, self.step = dict(layers), step
        when = f" after optimizer step {step}" if step is not None else ""
        found = ", ".join(f"{name!r} ({bad:,} of {size:,} entries)" for name, (bad, size) in self.layers.items())
        super().__init__(
            f"lightning-sparse: sparsified weights hold NaN or inf{when}: {found or 'on another process'}. Training "
            "has diverged (a NaN or inf loss or gradient), and a NaN is not a zero: no mask or sparsity can be taken "
            "of these weights. Lower the learning rate or clip gradients (e.g. `Trainer(gradient_clip_val=1.0)`) and "
            "resume from a checkpoint saved before this step; `Trainer(detect_anomaly=True)` finds the operation "
            "that first makes a NaN."
        )


@dataclass
class WarmBracket:
    """What the last of a sequence of selections over the same values found (ST-3's threshold, one optimizer step
    after another), to bracket the next one without a sample.

    Between two steps the k-th smallest magnitude moves by what the schedule adds to `k`, at the density of the
    magnitudes around it, and by the weights' drift, which changes slowly from step to step. The next bracket is
    centred where both put it; its half-width is four times the last prediction's error, a quarter of the
    schedule's move and room for about `_WARM_ROOM` values: a few thousand values where the sample's 5-sigma
    bracket holds about 1 % of all (on ResNet-18, 4-5 thousand against 130 thousand), so the selection inside it
    costs little, and the sample (a strided read of every layer, and two selections) is not taken at all. A miss
    costs one more counting pass, then the sample's bracket serves, and the miss widens the next one. Any bracket
    gives the same threshold: this is a cache, not training state, so it is not saved, and DDP ranks, which select
    the same values, keep the same one.

    Example:
        >>> warm, weights = WarmBracket(), [torch.linspace(-1.0, 1.0, 300_001)]
        >>> global_magnitude_threshold(weights, 0.5, warm=warm)  # no memory yet: sampled
        0.5
        >>> lo, hi, _ = warm.bracket(300_001, 150_000)
        >>> lo < 0.5 < hi
        True
    """

    total: int = 0
    k: int = 0
    value: float = 0.0
    density: float = 0.0  # values per unit around `value`; 0 when nothing is remembered
    drift: float = 0.0  # how far `value` moved at the last step beyond what its change of `k` explains
    error: float = 0.0  # how far the last bracket's centre was from the value found

    def bracket(self, total: int, k: int) -> tuple[float, float, float] | None:
        """`(lo, hi, fraction)`: the bracket for the `k`-th smallest of `total` values, and the fraction of them
        expected inside it; None if nothing is remembered of a selection over `total` values."""
        centre = self._centre(total, k)
        if centre is None:
            return None
        shift = (k - self.k) / self.density
        half = 4.0 * abs(self.error) + 0.25 * abs(shift) + _WARM_ROOM / 2 / self.density
        return centre - half, centre + half, min(1.0, 2.0 * half * self.density / total)

    def record(self, total: int, k: int, found: _Bracketed) -> None:
        """Remember what a selection of the `k`-th smallest of `total` values found in its bracket (which held it)."""
        assert found.value is not None
        centre = self._centre(total, k)
        if centre is not None:
            self.error = found.value - centre
            self.drift += self.error  # the move beyond the change of `k`: the drift predicted and what it missed
        else:
            self.error = self.drift = 0.0
        width = found.hi - found.lo
        # A density from a handful of values, or from an open bracket, would mislead the next bracket's width.
        enough = found.inside >= _WARM_ROOM // 16 and math.isfinite(width) and width > 0.0
        self.total, self.k, self.value = total, k, found.value
        self.density = found.inside / width if enough else 0.0

    def _centre(self, total: int, k: int) -> float | None:
        if total != self.total or self.density <= 0.0:
            return None
        return self.value + (k - self.k) / self.density + self.drift


def count_non_finite(weights: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """For each weight that holds NaN or inf: how many entries, and of how many. For the rare error path.

    Example:
        >>> count_non_finite({"a": torch.tensor([1.0, float("nan"), float("inf")]), "b": torch.ones(2)})
        {'a': (2, 3)}
    """
    counts = {name: (int((~torch.isfinite(w)).sum()), w.numel()) for name, w in weights.items()}
    return {name: count for name, count in counts.items() if count[0]}


def global_magnitude_threshold(
    weights: Sequence[Tensor],
    sparsity: float,
    scales: Sequence[float] | None = None,
    group: Group = None,
    names: Sequence[str] | None = None,
    warm: WarmBracket | None = None,
) -> float:
    """Return `tau` such that a `sparsity` fraction of all magnitudes `|weights[i]| * scales[i]` is `<= tau`.

    Exact: pruning every element with `|weight| * scale <= tau` zeroes `round(sparsity * n)`
    elements (plus exact ties). Returns 0.0 for zero sparsity. Deterministic, and it does not
    touch the global RNG, so DDP ranks and resumed runs agree. With a process `group`, `weights` are
    this rank's shards and `n` counts every rank's (see the module's docstring). The magnitudes are taken
    as the weights are read (see the module's docstring for what is materialised). Raises
    `NonFiniteWeightsError` naming the weights (by `names`, else by position) that hold NaN or inf, on every rank.
    `warm` brackets the selection from the last one it made (`WarmBracket`), at no cost to exactness.

    Example:
        >>> global_magnitude_threshold([torch.tensor([3.0, -1.0]), torch.tensor([-2.0, 4.0])], 0.5)
        2.0
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    scales = list(scales) if scales is not None else [1.0] * len(weights)
    k = round(sparsity * _global_numel(weights, group))
    try:
        if not k:
            _check_finite(weights, group)
            return 0.0
        return _kth_smallest_bracketed(weights, scales, k, group, absolute=True, warm=warm)
    except _NonFiniteMagnitudes:
        raise _non_finite_error(weights, names) from None


def min_kept_per_layer(sizes: Sequence[int], min_density: float) -> list[int]:
    """How many weights each layer of `sizes` weights keeps at `min_density`: `ceil(min_density * size)`.

    Example:
        >>> min_kept_per_layer([100, 3, 0], 0.07)  # 0.07 * 100 is 7.000000000000001 in floating point: still 7
        [7, 1, 0]
    """
    # Floating-point products such as 0.07 * 100 land just above an integer, which must not round up.
    return [min(size, math.ceil(min_density * size - 1e-6)) for size in sizes]


def floored_magnitude_thresholds(
    weights: Sequence[Tensor],
    sparsity: float,
    min_kept: Sequence[int],
    scales: Sequence[float] | None = None,
    group: Group = None,
    names: Sequence[str] | None = None,
    warm: WarmBracket | None = None,
) -> tuple[float, list[float]]:
    """The global threshold `tau` and each layer's threshold, so that pruning `|weight| * scale <= threshold` in
    every layer prunes `round(sparsity * n)` of all `n` elements (up to exact ties) while layer `i` keeps at least
    `min_kept[i]` of its elements.

    The kept set is the magnitude-optimal one under the floors: each layer's `min_kept` largest elements, and the
    largest of all the others up to the global budget. Layer `i` then keeps `max(min_kept[i], count_i(tau))`
    elements, `count_i(tau)` being how many of its elements lie above `tau`: a layer whose count stays at or
    above its floor is pruned at `tau`, one whose count falls below it gets its own, lower threshold at its floor
    (its `min_kept`-th largest element), and `tau` is chosen so that the kept counts add up to the budget.

    Solved by a fixed point that only ever grows the set of floored layers: `tau` is the global selection over
    the layers not yet floored, for the budget the floored ones leave; the layers whose count at that `tau` falls
    below their floor join the floored set, and the selection is repeated. Flooring layers that keep more than
    they did leaves fewer kept elements to the others, so `tau` only rises and a floored layer stays below its
    floor: it ends in at most one more round than there are floored layers, and when no layer falls below its
    floor the kept counts add up to the budget exactly. Each round is one bracketed selection (as in
    `global_magnitude_threshold`) and one counting pass; each floored layer, one selection of its own. No sort.
    With no floors (all zero) it is `global_magnitude_threshold`, at the same cost.

    Thresholds are in the units of `|weight| * scale`; a layer that keeps everything gets 0.0. With a process
    `group`, `weights` are this rank's shards, and sizes, counts and selections are over every rank's. Raises
    `NonFiniteWeightsError` as `global_magnitude_threshold` does, from the first selection's counts (a NaN is
    neither below nor inside a bracket), or from a pass of its own if nothing is pruned. `warm` brackets the first
    selection, over all layers, as in `global_magnitude_threshold`.

    Example:
        >>> small, large = torch.tensor([0.25, 0.5, 0.75]), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
        >>> global_magnitude_threshold([small, large], 0.5)  # prunes 4: all of `small`
        1.0
        >>> floored_magnitude_thresholds([small, large], 0.5, min_kept=[1, 1])  # `small` keeps its largest
        (2.0, [0.5, 2.0])
    """
    scales = list(scales) if scales is not None else [1.0] * len(weights)
    sizes = _global_sizes(weights, group)
    if len(min_kept) != len(sizes) or any(not 0 <= f <= n for f, n in zip(min_kept, sizes, strict=True)):
        raise ValueError(f"min_kept must give each layer a count in [0, its size {sizes}], got {list(min_kept)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    total = sum(sizes)
    kept = total - round(sparsity * total)
    if sum(min_kept) > kept:
        raise ValueError(
            f"the layers' minimums keep {sum(min_kept):,} elements, more than the {kept:,} of {total:,} that "
            f"sparsity {sparsity} leaves"
        )
    try:
        return _floored_thresholds(weights, scales, sizes, kept, min_kept, group, warm)
    except _NonFiniteMagnitudes:
        raise _non_finite_error(weights, names) from None


def _floored_thresholds(
    weights: Sequence[Tensor],
    scales: Sequence[float],
    sizes: Sequence[int],
    kept: int,
    min_kept: Sequence[int],
    group: Group,
    warm: WarmBracket | None,
) -> tuple[float, list[float]]:
    """`floored_magnitude_thresholds`' fixed point, its arguments checked."""
    floored: dict[int, float] = {}
    while True:
        rest = [i for i in range(len(sizes)) if i not in floored]
        # What the layers not floored must prune so that, with the floored layers at their floors, `kept` remain.
        prune = sum(sizes[i] for i in rest) - (kept - sum(min_kept[i] for i in floored))
        if prune > 0:
            # Only the first round's selection, over every layer, is the same from one step to the next.
            tau = _kth_smallest_bracketed(
                [weights[i] for i in rest], [scales[i] for i in rest], prune, group, absolute=True,
                warm=None if floored else warm,
            )  # fmt: skip
        else:  # Only through exact ties at a threshold: the others keep everything, or every layer is floored.
            if not floored:  # no selection has read the weights
                _check_finite(weights, group)
            tau = max([0.0, *floored.values()]) if not rest else 0.0
        candidates = [i for i in rest if min_kept[i]]
        if not candidates:
            break
        counts = all_sum(
            torch.stack([torch.count_nonzero(_scaled(weights[i].abs(), scales[i]) > tau) for i in candidates]), group
        )
        below = [i for i, count in zip(candidates, counts.tolist(), strict=True) if count < min_kept[i]]
        if not below:
            break
        for i in below:
            prune_own = sizes[i] - min_kept[i]
            if prune_own:
                floored[i] = _kth_smallest_bracketed([weights[i]], [scales[i]], prune_own, group, absolute=True)
            else:
                floored[i] = 0.0
    return tau, [floored.get(i, tau) for i in range(len(sizes))]


class _NonFiniteMagnitudes(Exception):
    """A magnitude selection met NaN or inf, on this rank or another: raised on every rank alike."""


def _non_finite_error(weights: Sequence[Tensor], names: Sequence[str] | None) -> NonFiniteWeightsError:
    """The error naming which of `weights` (this rank's shards) hold NaN or inf: for the rare path, a pass each."""
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(weights))]
    return NonFiniteWeightsError(count_non_finite(dict(zip(labels, weights, strict=True))))


def _check_finite(weights: Sequence[Tensor], group: Group) -> None:
    """Raise `_NonFiniteMagnitudes` on every rank if any rank's `weights` hold NaN or inf: a pass and one sync, where
    no selection counted them."""
    if not weights:
        return
    bad = torch.stack([torch.isfinite(w).all().logical_not() for w in weights]).sum().reshape(1)
    if int(all_sum(bad, group)):
        raise _NonFiniteMagnitudes


def _scaled(magnitude: Tensor, scale: float) -> Tensor:
    """`magnitude * scale` in float32 (float64 stays float64), computed as the selection and ST-3's masks compute it."""
    magnitude = _promoted(magnitude)
    return magnitude * scale if scale != 1.0 else magnitude


def _promoted(values: Tensor) -> Tensor:
    """`values` in float32, or float64 if they are (STR's keys): the precision every selection computes in."""
    return values if values.dtype == torch.float64 else values.float()


def kth_smallest(values: Sequence[Tensor], k: int, scales: Sequence[float] | None = None, group: Group = None) -> float:
    """The `k`-th smallest (from 1) of all `values[i] * scales[i]`, exact, without selecting over all of them.

    With a process `group`, `values` are this rank's shards and the selection is over every rank's, with
    the same result on every rank; no rank gathers more than a sample and a bracket (see the module's
    docstring). Computed in float32 (float64 values stay float64). Deterministic: no RNG.

    Example:
        >>> kth_smallest([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])], 3)
        3.0
    """
    scales = list(scales) if scales is not None else [1.0] * len(values)
    return _kth_smallest_bracketed(values, scales, k, group)


def _kth_smallest_bracketed(
    values: Sequence[Tensor],
    scales: Sequence[float],
    k: int,
    group: Group,
    absolute: bool = False,
    warm: WarmBracket | None = None,
) -> float:
    """The `k`-th smallest (from 1) of all `values[i] * scales[i]` over the ranks of `group`; of the magnitudes
    `|values[i]| * scales[i]` with `absolute`. With `warm`, bracketed first where it predicts (no sample), and told
    what this selection found."""
    total = _global_numel(values, group)
    stride = total // _SAMPLE_SIZE
    if stride < 2:
        return _kth_smallest(_magnitudes(values) if absolute else values, scales, k, group, finite=absolute)

    # Flat views: a boolean index into a 4-D weight builds four index tensors, 2-3x the time of one.
    values = [v.reshape(-1) for v in values]
    q = k / total
    guess = warm.bracket(total, k) if warm is not None else None
    # A warm bracket wider than the sample's (the schedule's steps are large next to the run) is not worth its count.
    if warm is not None and guess is not None and guess[2] < 2.0 * _sample_margin(q, _SAMPLE_SIZE):
        lo, hi, expected = guess
        found = _select_in_bracket(values, scales, k, (lo, hi), expected, group, absolute)
        if found.value is not None:
            warm.record(total, k, found)
            return found.value
    # |v| * s is |v * s| bit for bit (s > 0): one `abs` for the whole sample, not one per layer.
    local = torch.cat([_scaled(v[::stride], s) for v, s in zip(values, scales, strict=True)])
    sample = all_gather_cat(local.abs_() if absolute else local, group)
    m = sample.numel()
    margin = _sample_margin(q, m)
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    ranks = [rank for rank in (lo_rank, hi_rank) if 1 <= rank <= m]
    bounds = dict(zip(ranks, _select_ranks(sample, ranks), strict=True))
    lo, hi = bounds.get(lo_rank, -math.inf), bounds.get(hi_rank, math.inf)
    found = _select_in_bracket(values, scales, k, (lo, hi), (hi_rank - lo_rank) / m, group, absolute)
    if found.value is not None:
        if warm is not None:
            warm.record(total, k, found)
        return found.value
    values = _magnitudes(values) if absolute else values
    if group is None:
        return _kth_smallest(values, scales, k, group)
    # Sharded, the bracket missed (as rarely as above): select again among the values on the side of the
    # bracket that holds the k-th, which each rank filters from its shards; never a gather of all values.
    if k <= found.below:
        return _kth_smallest_bracketed([v[v < lo / s] for v, s in zip(values, scales, strict=True)], scales, k, group)
    above = [v[v > hi / s] for v, s in zip(values, scales, strict=True)]
    return _kth_smallest_bracketed(above, scales, k - found.below - found.inside, group)


def _sample_margin(q: float, m: int) -> float:
    """How far from `q` a sample of `m` values brackets the `q`-quantile of all values, as a fraction of them.

    A 5-sigma binomial margin: the bracket misses the true quantile about once in a million calls, and then the
    selection still gives the right answer.
    """
    return 5.0 * math.sqrt(q * (1.0 - q) / m) + 1.0 / m


@dataclass(frozen=True)
class _Bracketed:
    """What a count over a bracket `[lo, hi]` found: how many values lie below and inside it (over all ranks), and
    the k-th smallest of all if it lay inside, else None."""

    lo: float
    hi: float
    below: int
    inside: int
    value: float | None


def _select_in_bracket(
    values: Sequence[Tensor],
    scales: Sequence[float],
    k: int,
    bracket: tuple[float, float],
    expected: float,
    group: Group,
    absolute: bool,
) -> _Bracketed:
    """Count the flat `values` (their magnitudes, with `absolute`) below `bracket` and select the k-th smallest of all
    among those inside, about an `expected` fraction of them. Raises `_NonFiniteMagnitudes` if the magnitudes hold
    NaN or inf."""
    lo, hi = bracket
    below, inside, inside_scales, non_finite = 0, [], [], 0
    for v, s in _counting_passes(values, scales):
        # Room is address space, not memory, until written: room for four times a layer's share of the bracket
        # (it holds more only by chance or by scale) makes a second pass rare.
        room = min(v.numel(), math.ceil(4 * expected * v.numel()) + 1024)
        n_below, v_inside, v_non_finite = _count_below_and_select(v, lo / s, hi / s, room, absolute)
        below, non_finite = below + n_below, non_finite + v_non_finite
        inside.append(v_inside)
        inside_scales.append(s)
    counts = torch.tensor([below, sum(x.numel() for x in inside), non_finite], device=values[0].device)
    n_below, n_inside, n_non_finite = all_sum(counts, group).tolist()
    if n_non_finite:
        raise _NonFiniteMagnitudes
    value = _kth_smallest(inside, inside_scales, k - n_below, group) if n_below < k <= n_below + n_inside else None
    return _Bracketed(lo, hi, n_below, n_inside, value)


def _counting_passes(values: Sequence[Tensor], scales: Sequence[float]) -> Iterator[tuple[Tensor, float]]:
    """What the bracket's counting passes read, each with the scale its values still need: every layer a fused loop
    serves, as it is; the others scaled and concatenated, in groups of up to `_GROUP_SIZE` elements (scale 1).

    An eager pass waits for the device twice (for its counts, then for the size of its selection): on a GPU, a wait
    per layer would stall it fifty times in a ResNet-50's update, where a group of layers stalls it once.
    """
    pending: list[Tensor] = []
    size = 0
    for v, s in zip(values, scales, strict=True):
        if kernels.serves(v):
            yield v, s
            continue
        if pending and size + v.numel() > _GROUP_SIZE:
            yield _joined(pending), 1.0
            pending, size = [], 0
        pending.append(_scaled(v, s))
        size += v.numel()
    if pending:
        yield _joined(pending), 1.0


def _joined(values: list[Tensor]) -> Tensor:
    return values[0] if len(values) == 1 else torch.cat(values)


def _magnitudes(values: Sequence[Tensor]) -> list[Tensor]:
    return [v.abs() for v in values]


def _count_below_and_select(
    values: Tensor, lo: float, hi: float, expected: int, absolute: bool = False
) -> tuple[int, Tensor, int]:
    """How many of the flat, contiguous `values` (of their magnitudes, with `absolute`) are below `lo`, those in
    `[lo, hi]` (in no particular order), about `expected` of them, and, with `absolute` (weights, whose magnitudes
    must be finite), how many are NaN or inf (else 0: STR's keys can be infinite).

    One fused pass on large float32 CPU values (`lightning_sparse.kernels`), which takes the magnitudes as it
    reads. Elsewhere two comparisons per element serve both; a boolean index scans its mask at about 1 ns per
    element however few entries are set, so the mask is read as int64 words, 8 entries each, and only the few
    words holding an entry inside are indexed.

    Example:
        >>> _count_below_and_select(torch.arange(10.0), 2.5, 4.0, expected=2)
        (3, tensor([3., 4.]), 0)
    """
    fused = kernels.count_below_and_select(values, lo, hi, expected, absolute)
    if fused is not None:
        below, selected, non_finite = fused
        return below, selected, non_finite if absolute else 0
    values = values.abs() if absolute else values
    at_least = values >= lo
    # One host sync for both counts; |v| < inf is false for NaN and inf alike.
    counts = [torch.count_nonzero(at_least)] + ([torch.count_nonzero(values < math.inf)] if absolute else [])
    n_at_least, *n_finite = torch.stack(counts).tolist()
    below = values.numel() - n_at_least
    non_finite = values.numel() - n_finite[0] if n_finite else 0
    inside = at_least.logical_and_(values <= hi)
    whole = values.numel() // 8 * 8
    words = inside[:whole].view(torch.int64).nonzero().squeeze(1)
    candidates = values[:whole].view(-1, 8).index_select(0, words).flatten()
    selected = candidates[inside[:whole].view(-1, 8).index_select(0, words).flatten()]
    if whole == values.numel():
        return below, selected, non_finite
    return below, torch.cat([selected, values[whole:][inside[whole:]]]), non_finite


def _kth_smallest(
    values: Sequence[Tensor], scales: Sequence[float], k: int, group: Group, finite: bool = False
) -> float:
    """The `k`-th smallest of all `values[i] * scales[i]`, selected directly; with `finite`, raises
    `_NonFiniteMagnitudes` (on every rank: each checks the same gathered values) if one is NaN or inf."""
    flat = all_gather_cat(torch.cat([_scaled(v.flatten(), s) for v, s in zip(values, scales, strict=True)]), group)
    if finite and not bool(torch.isfinite(flat).all()):
        raise _NonFiniteMagnitudes
    return _select_ranks(flat, [k])[0]


def _select_ranks(values: Tensor, ranks: Sequence[int]) -> list[float]:
    """The `ranks`-th smallest of the flat `values`, which may be reordered: a fused quickselect where it serves."""
    fused = kernels.select_ranks(values, ranks)
    if fused is not None:
        return fused
    if values.device.type == "cpu":
        return [values.kthvalue(rank).values.item() for rank in ranks]
    # A GPU's `kthvalue` selects each row on one thread block, so a flat tensor's on one: sorting is many times faster,
    # and one read-back serves every rank.
    ordered = torch.sort(values).values
    return cast(list[float], ordered[torch.tensor(ranks, device=values.device) - 1].tolist())


def _global_numel(values: Sequence[Tensor], group: Group) -> int:
    """How many elements `values` hold over all ranks of `group`."""
    return sum(_global_sizes(values, group))


def _global_sizes(values: Sequence[Tensor], group: Group) -> list[int]:
    """How many elements each of `values` holds over all ranks of `group`: one all-reduce for all."""
    sizes = [v.numel() for v in values]
    if group is None or not values:
        return sizes
    return [int(n) for n in all_sum(torch.tensor(sizes, device=values[0].device), group).tolist()]
