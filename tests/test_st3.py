"""`lightning_sparse.methods.st3`: ST-3's parametrization against hand-computed values, and the `ST3` method object."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse import ST3, kernels
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, shrink_for, sigma_scale, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule
from lightning_sparse.thresholds import NonFiniteWeightsError

# --------------------------------------------------------------------- the parametrization, plain PyTorch


def _st3_layer() -> tuple[torch.Tensor, StraightThroughSoftThreshold]:
    weight = torch.tensor([[0.5, -0.2, 0.05], [-0.8, 0.1, 0.3]], requires_grad=True)
    return weight, StraightThroughSoftThreshold(weight)


def test_st3_threshold_mask_and_rescale():
    weight, st3 = _st3_layer()
    # |w| sorted: 0.05 0.1 0.2 0.3 0.5 0.8; half of six pruned -> tau is the third, 0.2.
    assert update_thresholds([st3], [weight], sparsity=0.5) == pytest.approx(0.2)
    assert st3.keep_mask(weight).tolist() == [[True, False, False], [True, False, True]]
    # Kept L1 fractions 0.5 / 0.75 and 1.1 / 1.2, rescaled by 1.01 / (r + 0.01).
    expected_scale = torch.tensor([[1.01 / (0.5 / 0.75 + 0.01)], [1.01 / (1.1 / 1.2 + 0.01)]])
    torch.testing.assert_close(st3.scale, expected_scale)

    effective = st3(weight)
    soft = torch.tensor([[0.3, 0.0, 0.0], [-0.6, 0.0, 0.1]])
    torch.testing.assert_close(effective, soft * expected_scale)
    assert (effective[st3.keep_mask(weight).logical_not()] == 0).all()


def test_st3_gradient_is_straight_through_to_every_weight():
    weight, st3 = _st3_layer()
    update_thresholds([st3], [weight], sparsity=0.5)
    upstream = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (st3(weight) * upstream).sum().backward()
    # Pruned weights receive the gradient too, so they can come back at the next threshold.
    torch.testing.assert_close(weight.grad, upstream)


def test_st3_without_rescale_is_a_plain_soft_threshold():
    weight = torch.tensor([[0.5, -0.2, 0.05], [-0.8, 0.1, 0.3]])
    st3 = StraightThroughSoftThreshold(weight, rescale=False)
    update_thresholds([st3], [weight], sparsity=0.5)
    torch.testing.assert_close(st3(weight), torch.tensor([[0.3, 0.0, 0.0], [-0.6, 0.0, 0.1]]))


def test_st3_frozen_trains_only_surviving_weights():
    weight, st3 = _st3_layer()
    update_thresholds([st3], [weight], sparsity=0.5)
    before = st3(weight).detach()
    with torch.no_grad():
        st3.freeze(weight)
    torch.testing.assert_close(weight.detach(), before)  # effective weights baked into the raw ones
    st3(weight).sum().backward()
    assert st3.mask is not None and weight.grad.tolist() == st3.mask.float().tolist()
    assert st3.state_dict()["_extra_state"] == {"frozen": True}


def test_st3_sigma_normalises_magnitudes_by_layer_width():
    wide, narrow = torch.full((64, 64), 0.1), torch.full((2, 2), 0.2)
    wide[0, 0], narrow[0, 0] = 1.0, 1.0
    layers = [StraightThroughSoftThreshold(wide, rescale=False), StraightThroughSoftThreshold(narrow, rescale=False)]
    # Plain ST-3 prunes the small weights of both layers alike...
    update_thresholds(layers, [wide, narrow], sparsity=0.5)
    assert layers[1].keep_mask(narrow).sum().item() == 4
    # ...while ST-3σ compares |w| * sqrt(sum(shape)): the wide layer's 0.1 * sqrt(128) beats 0.2 * sqrt(4).
    tau = update_thresholds(layers, [wide, narrow], sparsity=3 / 4100, sigma=True)
    assert sigma_scale(wide) == math.sqrt(128)
    assert layers[1].threshold.item() == pytest.approx(tau / 2)
    assert layers[1].keep_mask(narrow).sum().item() == 1 and layers[0].keep_mask(wide).all()


def test_st3_sigma_prunes_exactly_the_target_count() -> None:
    short = []
    for seed in range(20):
        torch.manual_seed(seed)
        weights = [torch.randn(4, 1, 3), torch.randn(3, 24)]
        layers = [StraightThroughSoftThreshold(w) for w in weights]
        update_thresholds(layers, weights, sparsity=0.5, sigma=True)
        zeros = sum(int((~p.keep_mask(w)).sum()) for p, w in zip(layers, weights, strict=True))
        if zeros != round(0.5 * (12 + 72)):
            short.append((seed, zeros))
    assert short == []


@pytest.fixture(params=[True, False], ids=["fused", "eager"])
def loops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """A test twice: with the fused CPU loops, and with the eager forms alone (as with no C compiler)."""
    if not request.param:
        monkeypatch.setattr(kernels, "_loaded", {"library": None})
    return bool(request.param)


def test_st3_sigma_effective_weights_are_zero_exactly_where_the_mask_prunes(loops: bool) -> None:
    # With `tau / width` as a layer's shrink, the weight at the global threshold could round to kept: its mask
    # pruned it, its effective weight (and the hardened model) kept about 1e-8 of it.
    kept_by_mask, nonzero = [], []
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        weights = [torch.randn(shape, generator=generator) for shape in [(64, 32, 3, 3), (128, 64), (10, 512)]]
        layers = [StraightThroughSoftThreshold(w) for w in weights]
        update_thresholds(layers, weights, sparsity=0.9, sigma=True)
        kept_by_mask.append([int(p.keep_mask(w).sum()) for p, w in zip(layers, weights, strict=True)])
        nonzero.append([int((p(w) != 0).sum()) for p, w in zip(layers, weights, strict=True)])
        assert all(torch.equal(p(w) != 0, p.keep_mask(w)) for p, w in zip(layers, weights, strict=True))
    assert nonzero == kept_by_mask
    assert all(sum(kept) == round(0.1 * (64 * 32 * 9 + 128 * 64 + 10 * 512)) for kept in kept_by_mask)


@pytest.mark.parametrize("width", [1.0, 2.0, math.sqrt(3.0), math.sqrt(1091.0)])
def test_shrink_for_prunes_what_the_width_normalised_comparison_prunes(width: float) -> None:
    magnitudes = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    for threshold in (magnitudes * width).kthvalue(50_000).values.item(), 0.0, 0.3:
        shrink = shrink_for(threshold, width)
        assert torch.equal(magnitudes > shrink, magnitudes * width > threshold)
        assert shrink == torch.tensor(shrink).item()  # a float32 value, as the layer's buffer holds it


def _classifier_at_small_std() -> list[torch.Tensor]:
    """Two He-initialised convs and a classifier initialised at std 0.01, as torchvision's MobileNetV3 does."""
    torch.manual_seed(0)
    return [torch.randn(16, 3, 3, 3) * 0.27, torch.randn(32, 16, 3, 3) * 0.12, torch.randn(10, 512) * 0.01]


@pytest.mark.parametrize("sigma", [False, True])
def test_st3_min_density_keeps_each_layer_its_minimum_at_the_exact_global_count(sigma: bool) -> None:
    weights = _classifier_at_small_std()
    layers = [StraightThroughSoftThreshold(w) for w in weights]
    n = sum(w.numel() for w in weights)
    update_thresholds(layers, weights, sparsity=0.9, sigma=sigma)
    assert int(layers[2].keep_mask(weights[2]).sum()) == 0  # one global threshold empties the classifier

    tau = update_thresholds(layers, weights, sparsity=0.9, sigma=sigma, min_density=0.02)
    kept = [int(p.keep_mask(w).sum()) for p, w in zip(layers, weights, strict=True)]
    assert sum(kept) == n - round(0.9 * n)
    assert kept[2] == math.ceil(0.02 * 5120)  # held at its minimum: its largest 103 weights
    assert bool(layers[2].keep_mask(weights[2]).flatten()[weights[2].abs().flatten().topk(103).indices].all())
    assert all(k >= math.ceil(0.02 * w.numel()) for k, w in zip(kept, weights, strict=True))
    # The classifier is soft-thresholded at its own, lower threshold, the convs at the global one.
    scales = [sigma_scale(w) if sigma else 1.0 for w in weights]
    thresholds = [p.threshold.item() * s for p, s in zip(layers, scales, strict=True)]
    assert thresholds[:2] == [pytest.approx(tau)] * 2 and thresholds[2] < tau
    assert [int((p(w) != 0).sum()) for p, w in zip(layers, weights, strict=True)] == kept


def test_st3_min_density_in_the_method_follows_the_schedule_and_logs_the_global_threshold() -> None:
    method = ST3(0.9, start=0, end=2, min_density=0.02).for_run(total_steps=10)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(512, 10))
    with torch.no_grad():
        for layer, weight in zip((net[0], net[1], net[3]), _classifier_at_small_std(), strict=True):
            layer.weight.copy_(weight)
    parametrize_weights(select_weights(net), method.parametrization)
    layers = sparsity_parametrizations(net)
    assert method.on_fit_start(layers, []) == []
    for step in (1, 2, 3):
        method.after_optimizer_step(step, layers)
        kept = [int((layer.weight != 0).sum()) for layer in (net[0], net[1], net[3])]
        n = 432 + 4608 + 5120
        assert sum(kept) == n - round(CubicSchedule(0.9, 0, 2).sparsity_at(step) * n)
        assert kept[2] >= 103
    metrics = method.metrics(3, layers)
    thresholds = [w.parametrization.threshold.item() for w in layers.values()]
    assert metrics["sparsity/threshold"] == max(thresholds) == thresholds[0] > thresholds[2]


def test_st3_refuses_at_fit_start_a_min_density_its_layers_cannot_keep_rounded_up() -> None:
    # 0.1 <= 1 - 0.9, but ceil(0.1 x 12) + ceil(0.1 x 72) = 2 + 8 weights is more than the 8 of 84 that 90 % leaves.
    method = ST3(0.9, min_density=0.1).for_run(total_steps=100)
    _, layers = _sparse_layers(method)
    with pytest.raises(
        ValueError,
        match=r"^`min_density=0.1` keeps at least 10 of the 84 sparsified weights \(ceil\(0.1 x its size\) in each "
        r"of the 2 layers\), more than the 8 that sparsity 0.9 leaves: lower `min_density`",
    ):
        method.on_fit_start(layers, [])
    assert ST3(0.9, min_density=0.05).for_run(total_steps=100).on_fit_start(layers, []) == []


def test_st3_keeps_bf16_weights_bf16():
    weight = torch.randn(8, 4, dtype=torch.bfloat16)
    st3 = StraightThroughSoftThreshold(weight)
    update_thresholds([st3], [weight], sparsity=0.5)
    assert st3(weight).dtype == torch.bfloat16
    assert st3.threshold.dtype == torch.float32 and st3.scale.dtype == torch.float32


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])  # 0: no global selection, yet masks and rescales are set
@pytest.mark.parametrize("rows", [1, 10_000], ids=["small", "bracketed"])
def test_update_thresholds_refuses_non_finite_weights_naming_them_before_any_layer_changes(
    rescale: bool, bad: float, sparsity: float, rows: int, loops: bool
) -> None:
    # Large enough (over 2 x 2^16 weights in all), the selection brackets the threshold, and its counting pass
    # finds the NaN or inf, where a small one selects over all magnitudes at once.
    weights = [torch.randn(4 * rows, 3), torch.randn(2, 5), torch.randn(3 * rows, 3)]
    layers = [StraightThroughSoftThreshold(w, rescale=rescale) for w in weights]
    update_thresholds(layers, weights, sparsity=0.3)
    before = [{k: v.clone() for k, v in p.state_dict().items() if isinstance(v, torch.Tensor)} for p in layers]
    weights[1][1, 2] = bad
    weights[2].fill_(bad)
    size = 9 * rows
    with pytest.raises(
        NonFiniteWeightsError, match=rf"NaN or inf: 'b' \(1 of 10 entries\), 'c' \({size:,} of {size:,} entries\)\."
    ) as e:
        update_thresholds(layers, weights, sparsity=sparsity, names=["a", "b", "c"])
    assert e.value.layers == {"b": (1, 10), "c": (size, size)} and e.value.step is None
    for p, state in zip(layers, before, strict=True):
        assert all(torch.equal(p.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(NonFiniteWeightsError, match=r"'#1' \(1 of 10 entries\)"):
        update_thresholds(layers, weights, sparsity=sparsity)  # unnamed: by position


def test_update_thresholds_finds_one_nan_among_many_weights_outside_the_sample(loops: bool) -> None:
    weights = [torch.randn(512, 512), torch.randn(64, 64)]
    weights[0].view(-1)[12_345] = float("nan")  # the sample takes every 4th entry: not this one
    layers = [StraightThroughSoftThreshold(w) for w in weights]
    with pytest.raises(NonFiniteWeightsError, match=r"'#0' \(1 of 262,144 entries\)\.") as e:
        update_thresholds(layers, weights, sparsity=0.9)
    assert set(e.value.layers) == {"#0"}
    assert all(p.threshold.item() == 0.0 and bool((p.scale == 1.0).all()) for p in layers)  # no layer changed


def test_st3_after_optimizer_step_names_layers_and_step_of_non_finite_weights() -> None:
    method = ST3(0.5, start=0, end=2).for_run(total_steps=10)
    net, layers = _sparse_layers(method)
    with torch.no_grad():
        net[2].parametrizations.weight.original[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"after optimizer step 3: '2' \(1 of \d+ entries\)\. Training has"):
        method.after_optimizer_step(3, layers)


def test_st3_rescale_of_a_1d_weight_is_per_entry_and_keeps_its_shape() -> None:
    # `select_weights` refuses 1-D weights; the parametrization itself still keeps its buffers' shapes, so its
    # state dict loads back.
    weight = torch.tensor([0.5, -0.1, 0.3, 0.05])
    st3 = StraightThroughSoftThreshold(weight)
    update_thresholds([st3], [weight], sparsity=0.5)
    assert st3.scale.shape == (4,) and st3.keep_mask(weight).tolist() == [True, False, True, False]
    torch.testing.assert_close(st3(weight), torch.tensor([0.4, 0.0, 0.2, 0.0]))  # t = 0.1; kept entries: scale 1
    assert StraightThroughSoftThreshold.from_state_dict(weight, st3.state_dict()) is not None


def test_st3_from_state_dict_names_missing_entries_of_a_damaged_state() -> None:
    weight = torch.randn(3, 2)
    st3 = StraightThroughSoftThreshold(weight)
    state = st3.state_dict()
    del state["scale"]
    with pytest.raises(KeyError) as raised:
        StraightThroughSoftThreshold.from_state_dict(weight, state)
    assert raised.value.args == ("scale",)
    # A frozen layer's mask is state (an unfrozen one's is derived from the weight): a frozen state needs it.
    st3.freeze(weight)
    state = st3.state_dict()
    del state["mask"], state["scale"]
    with pytest.raises(KeyError) as raised:
        StraightThroughSoftThreshold.from_state_dict(weight, state)
    assert raised.value.args == ("mask", "scale")
    # One entry alone could be another parametrization's (torch.ao's FakeSparsity has a `mask`): not ST-3's.
    assert StraightThroughSoftThreshold.from_state_dict(weight, {"mask": torch.ones(3, 2, dtype=torch.bool)}) is None


def test_parametrized_conv_sees_effective_weight():
    conv = nn.Conv2d(3, 8, 3)
    st3 = StraightThroughSoftThreshold(conv.weight)
    parametrize.register_parametrization(conv, "weight", st3)
    update_thresholds([st3], [conv.parametrizations.weight.original], sparsity=0.75)
    assert (conv.weight == 0).float().mean().item() == pytest.approx(0.75, abs=1 / conv.weight.numel())


# ------------------------------------------------------------------------------------ the method object


def test_defaults_and_names() -> None:
    method = ST3(target_sparsity=0.9)
    assert method == ST3(0.9, start=0.05, end=0.5, schedule="cubic", freeze_at=None, rescale=True, sigma=False)
    assert (method.name, ST3(0.9, sigma=True).name) == ("st3", "st3sigma")
    assert method.parametrization_class is StraightThroughSoftThreshold
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.target_sparsity = 0.5  # type: ignore[misc]


def test_settings_are_plain_python_values() -> None:
    assert ST3(0.9, start=10, end=0.5, freeze_at=0.9, sigma=True).settings() == {
        "method": "st3sigma", "target_sparsity": 0.9, "start": 10, "end": 0.5, "schedule": "cubic",
        "freeze_at": 0.9, "rescale": True, "sigma": True, "min_density": 0.0,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, r"^`target_sparsity` is required: the final fraction of zeros, e.g. 0.9$"),
        ({"target_sparsity": 0.9, "sigma": "yes"}, TypeError, r"^`sigma` must be True or False, got 'yes' \(str\)$"),
        ({"target_sparsity": 0.9, "rescale": 1}, TypeError, r"^`rescale` must be True or False, got 1 \(int\)$"),
        ({"target_sparsity": 0.9, "schedule": "exp"}, ValueError,
         r"^`schedule` must be one of 'cubic', 'linear', 'constant', got 'exp'$"),
        ({"target_sparsity": 0.9, "schedule": ["cubic"]}, TypeError,
         r"^`schedule` must be one of 'cubic', 'linear', 'constant' or an object with a `sparsity_at\(step\)` "
         r"method, got \['cubic'\] \(list\)$"),
        ({"target_sparsity": 0.9, "start": 0.5, "end": 0.5}, ValueError, r"^`end` \(0.5\) must come after `start`"),
        ({"target_sparsity": 0.9, "schedule": "constant", "start": 0.5, "freeze_at": 0.4}, ValueError,
         r"^`freeze_at` \(0.4\) must not come before `start` \(0.5\): masks would freeze mid-schedule$"),
    ],
    ids=["no-target", "sigma-str", "rescale-int", "schedule-name", "schedule-list", "empty-ramp",
         "freeze-before-constant-start"],
)  # fmt: skip
def test_bad_settings_raise_at_construction_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ST3(**kwargs)


def test_a_schedule_class_instead_of_an_instance_raises_at_construction() -> None:
    with pytest.raises(TypeError, match=r"`schedule`"):
        ST3(schedule=LinearSchedule)  # type: ignore[arg-type]


def test_a_constant_schedule_has_no_ramp_to_end() -> None:
    # `end` only shapes a ramp: a constant schedule reaches its target at `start`.
    assert ST3(0.9, schedule="constant", start=0.5, end=0.1).for_run(10).schedule == ConstantSchedule(0.9, 5)


@pytest.mark.parametrize("name", ["target_sparsity", "start", "end"])
def test_a_schedule_object_replaces_target_start_and_end(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=rf"^`{name}` cannot be combined with a schedule object, which sets the sparsity at every "
        r"step; remove them, or give `schedule` by name$",
    ):
        ST3(schedule=LinearSchedule(0.5, 0, 4), **{name: 0.1})


@pytest.mark.parametrize(
    ("method", "total", "expected"),
    [
        (ST3(0.9), 100, ST3(schedule=CubicSchedule(0.9, 5, 50))),
        (ST3(0.9, start=0.1, end=0.5, freeze_at=0.75, sigma=True), 16,
         ST3(schedule=CubicSchedule(0.9, 2, 8), freeze_at=12, sigma=True)),
        (ST3(0.5, start=3, end=0.5, schedule="linear", rescale=False), 10,
         ST3(schedule=LinearSchedule(0.5, 3, 5), rescale=False)),
        (ST3(0.5, start=0.5, schedule="constant"), 16, ST3(schedule=ConstantSchedule(0.5, 8))),
        (ST3(schedule=LinearSchedule(0.5, 0, 4), freeze_at=0.5), 16,
         ST3(schedule=LinearSchedule(0.5, 0, 4), freeze_at=8)),
        (ST3(0.9, start=0, end=40), math.inf, ST3(schedule=CubicSchedule(0.9, 0, 40))),  # steps need no run length
    ],
    ids=["defaults", "fractions", "linear-mixed", "constant", "schedule-object", "unknown-length-steps"],
)  # fmt: skip
def test_for_run_turns_fractions_into_steps_and_names_into_schedules(method: ST3, total: float, expected: ST3) -> None:
    run = method.for_run(total)
    assert run == expected
    assert isinstance(run.freeze_at, int | None) and not isinstance(run.schedule, str)
    assert method.for_run(total) == run  # the method itself is unchanged: it serves every fit


@pytest.mark.parametrize(
    ("method", "total", "match"),
    [
        (ST3(0.9, end=0.5, freeze_at=3), 16, r"`freeze_at` \(step 3\) must not come before `end` \(step 8\)"),
        (ST3(0.9, end=10, freeze_at=0.3), 16, r"`freeze_at` \(step 5\) must not come before `end` \(step 10\)"),
        (ST3(0.9, start=0.9, end=3), 16, r"`end` \(step 3\) must come after `start` \(step 14\); the run has too few"),
        (ST3(0.9), math.inf, r"^`start=0.05` is a fraction of training, but this Trainer has no known number of "
         r"optimizer steps; set `max_steps` or `max_epochs` on the Trainer, or give `start` as an int step$"),
        (ST3(schedule=LinearSchedule(0.5, 0, 4), freeze_at=0.9), math.inf, r"^`freeze_at=0.9` is a fraction"),
    ],
    ids=["freeze-step-before-end", "freeze-fraction-before-end", "end-before-start", "unknown-length",
         "unknown-length-schedule-object"],
)  # fmt: skip
def test_for_run_refuses_an_order_that_only_the_run_length_breaks(method: ST3, total: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        method.for_run(total)


def _sparse_layers(method: ST3) -> tuple[nn.Module, dict]:
    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    parametrize_weights(select_weights(net), method.parametrization)
    return net, sparsity_parametrizations(net)


def test_st3_state_dict_saves_the_derived_mask_and_loads_frozen_and_unfrozen_states() -> None:
    method = ST3(0.5, start=0, end=2).for_run(total_steps=10)
    net, layers = _sparse_layers(method)
    method.after_optimizer_step(2, layers)
    fc = layers["2"].parametrization
    raw = net[2].parametrizations.weight.original
    # Not stored while training, yet saved with the weight: a checkpoint has the layout 0.1.0's had.
    assert fc.mask is None and "mask" not in fc.state_dict()
    state = net.state_dict()
    assert torch.equal(state["2.parametrizations.weight.0.mask"], fc.keep_mask(raw))
    fresh, fresh_layers = _sparse_layers(method)
    fresh.load_state_dict(state)  # strict: the saved mask of an unfrozen layer is derived again, not kept
    assert fresh_layers["2"].parametrization.mask is None
    assert torch.equal(fresh[2].weight, net[2].weight)

    for w in layers.values():
        w.parametrization.freeze(w.raw)
    frozen_mask = fc.keep_mask(raw)
    with torch.no_grad():
        raw.add_(1.0)  # weights move after freezing: the mask must come from the state, not from them
    fresh.load_state_dict(net.state_dict())
    loaded = fresh_layers["2"].parametrization
    assert loaded.frozen and loaded.mask is not None and torch.equal(loaded.mask, frozen_mask)
    assert torch.equal(fresh[2].weight, net[2].weight)
    # A partial state, without the frozen flag, leaves a frozen layer frozen with its mask.
    fresh.load_state_dict({"2.parametrizations.weight.original": torch.ones_like(raw)}, strict=False)
    assert loaded.frozen and loaded.mask is not None and torch.equal(loaded.mask, frozen_mask)
    del state["2.parametrizations.weight.0.mask"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*2\.parametrizations\.weight\.0\.mask"):
        fresh.load_state_dict(state | {"2.parametrizations.weight.0._extra_state": {"frozen": True}})


@pytest.mark.parametrize("sigma", [False, True])
def test_after_optimizer_step_follows_the_schedule_and_freezes(sigma: bool) -> None:
    method = ST3(0.5, start=0, end=2, freeze_at=3, sigma=sigma).for_run(total_steps=10)
    net, layers = _sparse_layers(method)
    parametrizations = [w.parametrization for w in layers.values()]
    n = 12 + 72
    for step in (1, 2, 3):
        method.after_optimizer_step(step, layers)
        expected = round(CubicSchedule(0.5, 0, 2).sparsity_at(step) * n)
        zeros = sum(int((m.weight == 0).sum()) for m in (net[0], net[2]))
        # ST-3σ may keep the one weight at the threshold: see test_st3_sigma_prunes_exactly_the_target_count.
        assert expected - zeros in ((0, 1) if sigma else (0,))
        assert all(p.frozen is (step >= 3) for p in parametrizations)
        metrics = method.metrics(step, layers)
        assert metrics["sparsity/target"] == CubicSchedule(0.5, 0, 2).sparsity_at(step)
        conv = layers["0"].parametrization
        scale = sigma_scale(net[0].parametrizations.weight.original) if sigma else 1.0
        assert metrics["sparsity/threshold"] == pytest.approx(conv.threshold.item() * scale)
    masks = [p.mask for p in parametrizations]
    assert all(mask is not None for mask in masks)
    with torch.no_grad():
        net[2].parametrizations.weight.original.mul_(-3.0).add_(0.5)  # weights move: frozen masks do not
    method.after_optimizer_step(4, layers)
    assert all(torch.equal(p.mask, mask) for p, mask in zip(parametrizations, masks, strict=True))


def test_after_optimizer_step_needs_the_run_length_first() -> None:
    method = ST3(0.5)
    _, layers = _sparse_layers(method)
    with pytest.raises(RuntimeError, match=r"call `for_run\(total_steps\)` first"):
        method.after_optimizer_step(1, layers)


def test_owns_only_its_own_parametrization_with_its_rescale() -> None:
    weight = torch.ones(2, 2)
    assert ST3(0.5).owns(StraightThroughSoftThreshold(weight))
    assert ST3(0.5, sigma=True).owns(StraightThroughSoftThreshold(weight))  # σ changes the threshold, not the weights
    assert not ST3(0.5).owns(StraightThroughSoftThreshold(weight, rescale=False))
    assert not ST3(0.5, rescale=False).owns(StraightThroughSoftThreshold(weight))
    assert not ST3(0.5).owns(LearnedSoftThreshold(s_init=-5.0))
    assert ST3(0.5, rescale=False).parametrization(weight, 0).rescale is False


def test_fractions_keep_their_order_on_a_one_step_run() -> None:
    # `fast_dev_run`: 0.05 and 0.5 of one step both round to 0; the ramp still ends after it starts.
    run = ST3(0.9, freeze_at=0.9).for_run(total_steps=1)
    assert run.schedule == CubicSchedule(0.9, 0, 1) and run.freeze_at == 1


@pytest.mark.parametrize("sigma", [False, True])
def test_update_serves_the_effective_weight_in_the_memory_of_the_last_one(sigma: bool):
    # The update computes the next effective weight itself, into the storage of the stale one: the forward after
    # it computes nothing, and gives exactly what a forward computing from the buffers gives.
    torch.manual_seed(0)
    layer = nn.Conv1d(3, 8, 5)
    st3 = StraightThroughSoftThreshold(layer.weight)
    parametrize.register_parametrization(layer, "weight", st3)
    raw = layer.parametrizations.weight.original
    update_thresholds([st3], [raw], sparsity=0.6, sigma=sigma)
    storage = layer.weight.data_ptr()
    for _ in range(3):
        with torch.no_grad():
            raw.add_(torch.randn_like(raw) * 0.01)  # an optimizer step
        update_thresholds([st3], [raw], sparsity=0.6, sigma=sigma)
        served = layer.weight
        assert served.data_ptr() == storage
        st3._effective.clear()  # what a forward computes from the buffers alone
        assert torch.equal(served, layer.weight)
        storage = layer.weight.data_ptr()
        del served
    # An effective weight someone still holds is not written over: the update takes new memory.
    held = layer.weight
    before = held.clone()
    with torch.no_grad():
        raw.add_(torch.randn_like(raw) * 0.01)
    update_thresholds([st3], [raw], sparsity=0.6, sigma=sigma)
    assert torch.equal(held, before) and layer.weight.data_ptr() != held.data_ptr()
