"""Global magnitude threshold: the budget distribution of ST-3 (one quantile over all layers), and the error
for weights no threshold or sparsity can be taken of (NaN, inf)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["NonFiniteWeightsError", "count_non_finite", "global_magnitude_threshold"]

# Above this many elements, a strided sample brackets the quantile and only the elements inside
# the bracket are selected exactly: a few cheap passes instead of a full selection, which costs
# ~0.4 s on 11 M CPU floats (and `torch.quantile` refuses more than 2^24 elements at all).
_SAMPLE_SIZE = 1 << 16


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


def count_non_finite(weights: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """For each weight that holds NaN or inf: how many entries, and of how many. For the rare error path.

    Example:
        >>> count_non_finite({"a": torch.tensor([1.0, float("nan"), float("inf")]), "b": torch.ones(2)})
        {'a': (2, 3)}
    """
    counts = {name: (int((~torch.isfinite(w)).sum()), w.numel()) for name, w in weights.items()}
    return {name: count for name, count in counts.items() if count[0]}


def global_magnitude_threshold(
    magnitudes: Sequence[Tensor], sparsity: float, scales: Sequence[float] | None = None
) -> float:
    """Return `tau` such that a `sparsity` fraction of all `magnitudes[i] * scales[i]` is `<= tau`.

    Exact: pruning every element with `magnitude * scale <= tau` zeroes `round(sparsity * n)`
    elements (plus exact ties). Returns 0.0 for zero sparsity. Deterministic, and it does not
    touch the global RNG, so DDP ranks and resumed runs agree.

    Example:
        >>> global_magnitude_threshold([torch.tensor([3.0, 1.0]), torch.tensor([2.0, 4.0])], 0.5)
        2.0
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity}")
    scales = list(scales) if scales is not None else [1.0] * len(magnitudes)
    total = sum(m.numel() for m in magnitudes)
    k = round(sparsity * total)
    if k == 0:
        return 0.0
    stride = total // _SAMPLE_SIZE
    if stride < 2:
        return _kth_smallest(magnitudes, scales, k)

    sample = torch.cat([m.flatten()[::stride].float() * s for m, s in zip(magnitudes, scales, strict=True)])
    m = sample.numel()
    q = k / total
    # A 5-sigma binomial margin: the bracket misses the true quantile about once in a million calls,
    # and then the exact full selection below still gives the right answer.
    margin = 5.0 * math.sqrt(q * (1.0 - q) / m) + 1.0 / m
    lo_rank, hi_rank = math.floor((q - margin) * m), math.ceil((q + margin) * m)
    lo = sample.kthvalue(lo_rank).values.item() if lo_rank >= 1 else -math.inf
    hi = sample.kthvalue(hi_rank).values.item() if hi_rank <= m else math.inf
    below = sum(int(torch.count_nonzero(mag < lo / s)) for mag, s in zip(magnitudes, scales, strict=True))
    inside = [mag[(mag >= lo / s) & (mag <= hi / s)] for mag, s in zip(magnitudes, scales, strict=True)]
    if below < k <= below + sum(x.numel() for x in inside):
        return _kth_smallest(inside, scales, k - below)
    return _kth_smallest(magnitudes, scales, k)


def _kth_smallest(values: Sequence[Tensor], scales: Sequence[float], k: int) -> float:
    flat = torch.cat([v.flatten().float() * s for v, s in zip(values, scales, strict=True)])
    return flat.kthvalue(k).values.item()
