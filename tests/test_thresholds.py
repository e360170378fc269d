import math

import pytest
import torch

from lightning_sparse import kernels, thresholds
from lightning_sparse.thresholds import (
    WarmBracket,
    floored_magnitude_thresholds,
    global_magnitude_threshold,
    kth_smallest,
    min_kept_per_layer,
)


def _zero_fraction(magnitudes, tau, scales):
    zeros = sum(int((m * s <= tau).sum()) for m, s in zip(magnitudes, scales, strict=True))
    return zeros / sum(m.numel() for m in magnitudes)


def test_exact_fraction_on_a_resnet50_sized_model():
    # 25.5 M weights over layers of very different scales: more than torch.quantile accepts (2^24).
    generator = torch.Generator().manual_seed(0)
    sizes = [2_359_296] * 8 + [1_048_576] * 4 + [2_048_000, 9408, 589_824]
    magnitudes = [torch.randn(n, generator=generator).abs() * (1 + i % 5) for i, n in enumerate(sizes)]
    assert sum(sizes) > 25_000_000
    scales = [1.0] * len(sizes)
    for sparsity in (0.5, 0.9, 0.98):
        tau = global_magnitude_threshold(magnitudes, sparsity)
        assert _zero_fraction(magnitudes, tau, scales) == pytest.approx(sparsity, abs=1e-3 * sparsity)


def test_matches_the_exact_kth_value_with_scales():
    generator = torch.Generator().manual_seed(1)
    magnitudes = [torch.rand(300_000, generator=generator), torch.rand(50_000, generator=generator) * 3]
    scales = [2.0, 0.5]
    tau = global_magnitude_threshold(magnitudes, 0.8, scales)
    everything = torch.cat([m * s for m, s in zip(magnitudes, scales, strict=True)])
    assert tau == everything.kthvalue(round(0.8 * everything.numel())).values.item()


def test_bracketed_selection_over_odd_sizes_and_shapes_is_the_exact_kth_value():
    # Sizes that are not multiples of 8 (the selection reads its bracket mask 8 entries at a time), 4-D and
    # non-contiguous tensors, ties, and k at both ends.
    generator = torch.Generator().manual_seed(2)
    values = [
        torch.rand(64, 3, 7, 7, generator=generator),
        torch.rand(200_003, generator=generator).round(decimals=3),  # many ties
        torch.rand(700, 131, generator=generator).t(),
        torch.rand(5, generator=generator),
    ]
    everything = torch.cat([v.flatten() for v in values])
    for k in (1, 17, everything.numel() // 2, everything.numel() - 3, everything.numel()):
        assert kth_smallest(values, k) == everything.kthvalue(k).values.item()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        "cpu, no compiler",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_layers_no_fused_loop_serves_are_counted_in_groups_and_the_threshold_stays_exact(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 and small layers (every layer on a GPU, or without a compiler) take the eager pass, over layers
    # concatenated in groups; large float32 CPU ones the fused loop. A group size that splits them shows that
    # groups and their boundaries count exactly, scales included (ST-3σ's).
    if device == "cpu, no compiler":
        monkeypatch.setattr(kernels, "_loaded", {"library": None})
    monkeypatch.setattr(thresholds, "_GROUP_SIZE", 100_000)
    generator = torch.Generator().manual_seed(3)
    sizes = [150_000, 60_000, 3_000, 70_000, 40_000, 90_000]
    values = [torch.randn(n, generator=generator) for n in sizes]
    values = [v.bfloat16() if i % 2 else v for i, v in enumerate(values)]
    values = [v.to(device.split(",")[0]) for v in values]
    scales = [1.0, 2.0, 0.5, 1.5, 3.0, 1.0]
    everything = torch.cat([v.abs().float() * s for v, s in zip(values, scales, strict=True)])
    for sparsity in (0.1, 0.5, 0.97):
        k = round(sparsity * everything.numel())
        tau = global_magnitude_threshold(values, sparsity, scales)
        assert tau == everything.kthvalue(k).values.item()


def _drifting_weights(steps: int, generator: torch.Generator) -> list[list[torch.Tensor]]:
    """Three layers over the bracketed selection's size (bf16 among them, which the eager pass counts), and their
    values after each of `steps` small random steps, as an optimizer's."""
    weights = [torch.randn(200_003, generator=generator), torch.randn(96, 700, generator=generator) * 0.3]
    weights.append(torch.randn(5_000, generator=generator).bfloat16())
    history = []
    for _ in range(steps):
        weights = [w + (1e-3 * torch.randn(w.shape, generator=generator)).to(w.dtype) for w in weights]
        history.append(weights)
    return history


@pytest.mark.parametrize("loops", [True, False], ids=["fused loops", "eager"])
def test_a_warm_bracket_follows_drifting_weights_and_gives_the_exact_threshold_without_a_sample(
    loops: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not loops:
        monkeypatch.setattr(kernels, "_loaded", {"library": None})
    warm, generator = WarmBracket(), torch.Generator().manual_seed(4)
    scales = [1.0, 2.0, 0.5]
    # A ramp in steps as large as a cubic schedule to 0.9 over 1,000 steps makes at its steepest, then the target held.
    sparsities = [0.5 + 0.003 * step for step in range(10)] + [0.53] * 10
    for step, (weights, sparsity) in enumerate(zip(_drifting_weights(20, generator), sparsities, strict=True)):
        everything = torch.cat([w.abs().float().flatten() * s for w, s in zip(weights, scales, strict=True)])
        k = round(sparsity * everything.numel())
        guess = warm.bracket(everything.numel(), k)
        tau = global_magnitude_threshold(weights, sparsity, scales, warm=warm)
        assert tau == everything.kthvalue(k).values.item()
        if step >= 2:  # the first has nothing to start from, the second's bracket no error to widen by yet
            assert guess is not None
            lo, hi, fraction = guess
            # Held, in a bracket narrower than the sample's would be (which is then not taken).
            sampled = 2 * thresholds._sample_margin(k / everything.numel(), thresholds._SAMPLE_SIZE)
            assert lo < tau <= hi and fraction < sampled
            assert int(((everything >= lo) & (everything <= hi)).sum()) < sampled * everything.numel()


def test_a_warm_bracket_that_misses_falls_back_to_the_sample_and_widens() -> None:
    warm, generator = WarmBracket(), torch.Generator().manual_seed(5)
    history = _drifting_weights(4, generator)
    for weights in history[:3]:
        global_magnitude_threshold(weights, 0.8, warm=warm)
    jumped = [(w.float() * 1.5).to(w.dtype) for w in history[3]]  # far outside what the drift predicts
    everything = torch.cat([w.abs().float().flatten() for w in jumped])
    k = round(0.8 * everything.numel())
    lo, hi, _ = warm.bracket(everything.numel(), k)
    tau = global_magnitude_threshold(jumped, 0.8, warm=warm)
    assert not lo < tau <= hi and tau == everything.kthvalue(k).values.item()
    # The miss is remembered as the last error: the next bracket holds the same jump again.
    lo, hi, _ = warm.bracket(everything.numel(), k)
    assert abs(warm.error) >= abs(tau / 1.5 * 0.5) * 0.9 and lo < tau * 1.5 <= hi


def test_a_warm_bracket_forgets_other_values_and_keeps_floored_selections_exact() -> None:
    warm, generator = WarmBracket(), torch.Generator().manual_seed(6)
    weights = _drifting_weights(1, generator)[0]
    global_magnitude_threshold(weights, 0.8, warm=warm)
    assert warm.bracket(sum(w.numel() for w in weights), 1) is not None
    assert warm.bracket(sum(w.numel() for w in weights[:2]), 1) is None  # not the values it saw
    # With floors, only the first round's selection (over every layer) is warm; the others are exact anyway.
    small = weights[2].float() / 100
    for _ in range(2):
        tau, per_layer = floored_magnitude_thresholds([*weights[:2], small], 0.9, [0, 0, 1_000], warm=warm)
        cold_tau, cold_per_layer = floored_magnitude_thresholds([*weights[:2], small], 0.9, [0, 0, 1_000])
        assert (tau, per_layer) == (cold_tau, cold_per_layer) and per_layer[2] < tau


def test_zero_sparsity_prunes_nothing_and_bad_sparsity_raises():
    assert global_magnitude_threshold([torch.rand(10)], 0.0) == 0.0
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude_threshold([torch.rand(10)], 1.0)


# ------------------------------------------------------------------ minimum kept per layer


def _optimal_masks(values: list[torch.Tensor], min_kept: list[int], kept: int) -> list[torch.Tensor]:
    """The magnitude-optimal kept sets under floors, by brute force: each layer's `min_kept` largest, then the
    largest of all the others up to `kept`."""
    protected = [torch.zeros_like(v, dtype=torch.bool) for v in values]
    for mask, v, floor in zip(protected, values, min_kept, strict=True):
        mask[v.topk(floor).indices] = True
    others = torch.cat([v.masked_fill(mask, -math.inf) for v, mask in zip(values, protected, strict=True)])
    chosen = torch.zeros_like(others, dtype=torch.bool)
    chosen[others.topk(kept - sum(min_kept)).indices] = True
    return [m | c for m, c in zip(protected, chosen.split([v.numel() for v in values]), strict=True)]


@pytest.mark.parametrize(
    "sizes", [[30, 500, 7, 2000, 64], [40_000, 150_000, 3_000, 90_000, 10]], ids=["small", "sampled"]
)
@pytest.mark.parametrize("with_scales", [False, True])
def test_floors_keep_the_magnitude_optimal_set_and_the_exact_global_count(sizes: list[int], with_scales: bool) -> None:
    # Layers of very different scales, as conv and linear inits are: a global threshold alone empties the small ones.
    generator = torch.Generator().manual_seed(2)
    magnitudes = [torch.rand(n, generator=generator) * 10.0 ** (i % 3 - 2) for i, n in enumerate(sizes)]
    scales = [1.0 + i for i in range(len(sizes))] if with_scales else [1.0] * len(sizes)
    values = [m * s for m, s in zip(magnitudes, scales, strict=True)]
    total = sum(sizes)
    for sparsity, min_density in [(0.9, 0.02), (0.98, 0.01), (0.5, 0.3), (0.9, 0.0)]:
        min_kept = min_kept_per_layer(sizes, min_density)
        tau, thresholds = floored_magnitude_thresholds(magnitudes, sparsity, min_kept, scales)
        masks = [v > t for v, t in zip(values, thresholds, strict=True)]
        kept = total - round(sparsity * total)
        assert sum(int(m.sum()) for m in masks) == kept
        assert all(int(m.sum()) >= f for m, f in zip(masks, min_kept, strict=True))
        expected = _optimal_masks(values, min_kept, kept)
        assert all(torch.equal(m, e) for m, e in zip(masks, expected, strict=True))
        # Unfloored layers are pruned at the global threshold, floored ones below it.
        assert tau == max(thresholds) and all(t in (tau,) or t < tau for t in thresholds)
        if min_density == 0.0:
            assert thresholds == [global_magnitude_threshold(magnitudes, sparsity, scales)] * len(sizes)


def test_floors_that_bind_flooring_more_layers_in_later_rounds() -> None:
    # The tiny layer falls below its floor at the first global threshold; flooring it raises the threshold,
    # under which the middle layer falls below its floor too.
    magnitudes = [torch.arange(1.0, 11.0) / 1000, torch.arange(1.0, 11.0) / 10, torch.arange(1.0, 81.0)]
    tau, thresholds = floored_magnitude_thresholds(magnitudes, 0.8, min_kept=[2, 2, 2])
    assert [int((m > t).sum()) for m, t in zip(magnitudes, thresholds, strict=True)] == [2, 2, 16]
    assert thresholds[:2] == [pytest.approx(0.008), pytest.approx(0.8)] and tau == 64.0


def test_floors_above_what_the_sparsity_leaves_raise() -> None:
    with pytest.raises(ValueError, match=r"the layers' minimums keep 6 elements, more than the 5 of 50 that sparsity"):
        floored_magnitude_thresholds([torch.rand(25), torch.rand(25)], 0.9, min_kept=[3, 3])
    with pytest.raises(ValueError, match=r"min_kept must give each layer a count in \[0, its size \[2\]\]"):
        floored_magnitude_thresholds([torch.rand(2)], 0.5, min_kept=[3])
    # A layer may have to keep all of its weights: its threshold is 0 (only exact zeros pruned).
    assert floored_magnitude_thresholds([torch.rand(2) / 1e3, torch.rand(98)], 0.5, min_kept=[2, 0])[1][0] == 0.0
