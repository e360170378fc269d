"""`layer_stats`: per-layer parameters, non-zeros and FLOPs (MACs per sample), plain PyTorch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse import layer_stats
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from lightning_sparse.stats import dense_flops, non_finite_weights, sparse_stats

# STR's ResNet-50 at 90.23 % overall sparsity (Kusupati et al., ICML 2020, layer-wise budget table in
# the appendix; also budgets/STR_Budgets_ResNet50.csv in RAIVNLab/STR): sparsity in % per layer, in
# the order of torchvision's `named_modules()`. The paper reports 343 M FLOPs for this model.
STR_90_23_SPARSITY = [
    59.80,
    83.28, 89.48, 85.80, 83.34, 89.89, 90.60, 91.70, 88.07, 87.03, 90.99,
    85.95, 93.91, 93.13, 94.96, 95.31, 91.50, 93.66, 94.61, 94.86, 93.38, 93.26, 93.21, 94.14,
    88.85, 96.14, 93.19, 97.20, 95.36, 95.06, 94.84, 96.77, 95.59, 94.99, 96.08, 96.10, 94.94,
    95.49, 95.66, 94.49, 95.09, 94.92, 93.14,
    90.32, 95.66, 91.14, 96.79, 93.69, 93.98, 90.48, 87.57, 84.37, 80.29,
    64.50,
]  # fmt: skip
STR_90_23_MFLOPS = 343
RESNET50_DENSE_MACS = 4_089_184_256


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224)


def test_resnet50_dense_macs_match_the_papers(resnet50: nn.Module, image: torch.Tensor) -> None:
    stats = layer_stats(resnet50, image)
    assert len(stats) == 54  # 53 convs and the classifier
    assert sum(s.dense_flops for s in stats) == RESNET50_DENSE_MACS
    by_name = {s.name: s for s in stats}
    assert by_name["conv1"].dense_flops == 118_013_952  # 9,408 weights x 112 x 112 outputs
    assert by_name["fc"].dense_flops == 2_048_000
    # A dense model is dense (a normal init draws the odd exact 0.0 among 25 M weights).
    assert sum(s.sparse_flops for s in stats) == pytest.approx(RESNET50_DENSE_MACS, rel=1e-6)


def test_str_published_resnet50_budget_gives_the_papers_flops(resnet50: nn.Module, image: torch.Tensor) -> None:
    model = copy.deepcopy(resnet50)
    layers = select_weights(model)
    assert len(layers) == len(STR_90_23_SPARSITY)
    parametrize_weights(layers, lambda weight, axis: LearnedSoftThreshold(s_init=0.0))
    with torch.no_grad():
        for module, sparsity in zip((w.holders[0][0] for w in layers.values()), STR_90_23_SPARSITY, strict=True):
            # Put each layer's threshold sigmoid(s) at the magnitude that prunes its published share.
            magnitude = module.parametrizations.weight.original.abs().flatten()
            t = float(magnitude.kthvalue(round(sparsity / 100 * magnitude.numel())).values)
            module.parametrizations.weight[0].s.fill_(math.log(t / (1 - t)))

    stats = layer_stats(model, image)

    assert sum(s.dense_flops for s in stats) == RESNET50_DENSE_MACS
    for s, sparsity in zip(stats, STR_90_23_SPARSITY, strict=True):
        assert s.sparsity == pytest.approx(sparsity / 100, abs=1e-3), s.name
    overall = 1 - sum(s.nonzeros for s in stats) / sum(s.params for s in stats)
    assert overall == pytest.approx(0.9023, abs=5e-4)
    assert sum(s.sparse_flops for s in stats) == pytest.approx(STR_90_23_MFLOPS * 1e6, rel=0.005)


def test_any_conv_or_linear_counts_macs_per_sample() -> None:
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1),  # 8*4*3 weights x 10 outputs
        nn.Conv1d(8, 8, 3, padding=1, groups=8),  # depthwise: 8*1*3 x 10
        nn.Unflatten(2, (2, 5)),
        nn.Conv2d(8, 6, 1, bias=False),  # 6*8 x 2*5
        nn.Unflatten(1, (2, 3)),
        nn.Conv3d(2, 2, 1),  # 2*2 x 3*2*5
        nn.Flatten(2),
        nn.Linear(30, 7),  # per token: 30*7, 2 tokens
    )
    assert dense_flops(model, torch.randn(3, 4, 10)) == {
        "0": 960, "1": 240, "3": 480, "5": 120, "7": 420,
    }  # fmt: skip


def test_dense_flops_takes_tuples_and_dicts_and_leaves_training_state_alone() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)
            self.norm = nn.BatchNorm1d(2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.norm(self.a(x) + self.b(y))

    model = TwoInputs().train()
    model.b.eval()
    x, y = torch.randn(4, 3), torch.randn(4, 5)
    expected = {"a": 6, "b": 10}  # a layer the forward does not reach has no product
    assert dense_flops(model, (x, y)) == expected
    assert dense_flops(model, {"x": x, "y": y}) == expected
    assert model.training and model.norm.training and not model.b.training
    assert int(model.norm.num_batches_tracked) == 0  # ran in eval mode: no BatchNorm update


def test_reparameterized_layers_count_their_effective_nonzeros() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    example = torch.randn(2, 3, 8, 8)
    dense = dense_flops(model, example)
    parametrize_weights(select_weights(model), lambda weight, axis: StraightThroughSoftThreshold(weight))
    pairs = [(m, m.parametrizations.weight[0]) for m in (model[0], model[3])]
    update_thresholds([p for _, p in pairs], [m.parametrizations.weight.original for m, _ in pairs], sparsity=0.7)

    stats = layer_stats(model, example)

    calls = []
    hooks = [p.register_forward_hook(lambda *_: calls.append(1)) for _, p in pairs]
    assert stats == sparse_stats(model, dense)  # the cheap path agrees ...
    assert calls == []  # ... without computing any effective weight
    for hook in hooks:
        hook.remove()
    for s, (module, _) in zip(stats, pairs, strict=True):
        assert s.nonzeros == int((module.weight != 0).sum())
        assert s.sparse_flops == round(s.dense_flops * s.nonzeros / s.params)
    overall = 1 - sum(s.nonzeros for s in stats) / sum(s.params for s in stats)
    assert overall == pytest.approx(0.7, abs=1e-3)


@pytest.mark.parametrize("frozen_st3", [False, True], ids=["str", "st3-frozen"])
def test_nan_weights_count_as_non_zeros_not_as_pruned(frozen_st3: bool) -> None:
    # 16 weights: 4 NaN, 8 under the threshold, 4 over it. The keep mask prunes the NaNs (NaN > t is false), so it
    # says 75 % sparse; the effective weight has 8 zeros and 4 NaNs among its 8 non-zeros: 50 % sparse.
    layer = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.01] * 8 + [1.0] * 4 + [float("nan")] * 4).reshape(4, 4))
    if frozen_st3:
        st3 = StraightThroughSoftThreshold(layer.weight, rescale=False)
        update_thresholds([st3], [layer.weight.nan_to_num(0.0)], sparsity=0.5)
        st3.mask = st3.keep_mask(layer.weight.detach())  # frozen with it
        parametrize.register_parametrization(layer, "weight", st3)
    else:
        parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=math.log(0.1 / 0.9)))
    (stats,) = sparse_stats(layer, {"": 16})
    assert (stats.params, stats.nonzeros, stats.nonfinite, stats.sparsity) == (16, 8, 4, 0.5)
    assert stats.nonzeros == int((layer.weight != 0).sum())  # the effective weight's count, NaN != 0
    assert non_finite_weights(sparsity_parametrizations(layer)) == {"": (4, 16)}


def test_layers_without_a_weight_tensor_are_left_out_and_an_empty_layer_is_not_sparse() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(3), nn.Linear(0, 3))
    model[0].weight = None
    (stats,) = sparse_stats(model, {})
    assert (stats.name, stats.shape, stats.params, stats.sparsity, stats.sparse_flops) == ("2", (3, 0), 0, 0.0, 0)


def test_counting_a_parametrized_dense_layer_runs_no_power_iteration() -> None:
    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)))
    u = model[0].parametrizations.weight[0]._u.clone()
    (stats,) = sparse_stats(model, {"0": 9})
    assert stats.nonzeros == 9 and model[0].training
    assert torch.equal(model[0].parametrizations.weight[0]._u, u)
