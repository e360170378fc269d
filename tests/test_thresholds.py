import pytest
import torch

from lightning_sparse.thresholds import global_magnitude_threshold


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


def test_zero_sparsity_prunes_nothing_and_bad_sparsity_raises():
    assert global_magnitude_threshold([torch.rand(10)], 0.0) == 0.0
    with pytest.raises(ValueError, match="sparsity"):
        global_magnitude_threshold([torch.rand(10)], 1.0)
