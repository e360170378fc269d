"""`lightning_sparse.methods.str_method`: STR's parametrization against hand-computed values, and the `STR` method."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse import STR, SparsityCallback, kernels
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods.base import SparseWeight
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold
from lightning_sparse.methods.str_method import LearnedSoftThreshold, _unshared_references
from models import BatchNormNet, TinyNet, make_trainer

# --------------------------------------------------------------------- the parametrization, plain PyTorch


def test_str_effective_weight_and_gradients():
    weight = torch.tensor([0.5, -0.2, 0.05, -0.8], requires_grad=True)
    s_init = math.log(0.1 / 0.9)  # sigmoid(s) = 0.1
    str_ = LearnedSoftThreshold(s_init=s_init)
    effective = str_(weight)
    torch.testing.assert_close(effective, torch.tensor([0.4, -0.1, 0.0, -0.7]))
    assert effective[2].item() == 0.0  # exact zero, not a tiny residue

    effective.sum().backward()
    # Weights under the threshold get no gradient; the others pass it through unchanged.
    torch.testing.assert_close(weight.grad, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    # d/ds of sign(w) * (|w| - sigmoid(s)) = -sign(w) * sigmoid'(s) over survivors: (-1 + 1 + 1) * 0.1 * 0.9
    torch.testing.assert_close(str_.s.grad, torch.tensor(0.09))


@pytest.mark.parametrize("odd", [[], [float("nan"), float("inf")]], ids=["finite", "nan-and-inf"])
def test_str_one_pass_cpu_kernels_equal_the_general_path_exactly(odd: list[float], monkeypatch: pytest.MonkeyPatch):
    # The softshrink kernels must neither hide a diverged weight nor split a gradient at a tie differently from the
    # clamp they replace. (A NaN weight's own gradient is left out: torch's kernels disagree on it between their
    # vectorised and scalar loops, and the weight stays NaN either way. A pruned negative weight is -0.0 from the
    # kernel and +0.0 from the clamp: equal, as `assert_close` compares them.)
    str_ = LearnedSoftThreshold(s_init=math.log(0.1 / 0.9))
    g = str_.threshold().item()
    weight = torch.cat([torch.randn(10_000) * 0.2, torch.tensor([g, -g, 0.0, *odd])])
    grad = torch.randn_like(weight)

    def run() -> list[torch.Tensor]:
        str_.s.grad = None
        w = weight.clone().requires_grad_()
        effective = str_(w)
        effective.backward(grad)
        assert w.grad is not None and str_.s.grad is not None
        return [effective.detach(), w.grad[~weight.isnan()], str_.s.grad.clone()]

    fast = run()
    monkeypatch.setattr("lightning_sparse.methods.base._threshold_number", lambda weight, g: None)
    for a, b in zip(fast, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _linear_with_str(s_init: float = math.log(0.05 / 0.95)) -> tuple[nn.Linear, LearnedSoftThreshold, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)  # 8192 weights: large enough for the fused loop
    str_ = LearnedSoftThreshold(s_init=s_init)
    parametrize.register_parametrization(layer, "weight", str_)
    return layer, str_, layer.parametrizations.weight.original


def test_forwards_between_two_steps_share_one_effective_weight_and_the_next_takes_its_memory() -> None:
    layer, str_, raw = _linear_with_str()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    first = layer.weight
    assert layer.weight.data_ptr() == first.data_ptr()  # a second forward (accumulation, validation) computes none
    storage = first.data_ptr()
    del first
    for _ in range(2):
        layer(torch.randn(4, 128)).square().sum().backward()
        optimizer.step()  # changes the weight and `s`
        served = layer.weight
        assert served.data_ptr() == storage
        with torch.no_grad():
            expected = torch.nn.functional.softshrink(raw, str_.threshold().item())
        assert torch.equal(served, expected)
        del served
    # One someone still holds is not written over: the next is in new memory, the held one keeps its values.
    held = layer.weight
    before = held.clone()
    with torch.no_grad():
        raw.add_(0.01)
    assert layer.weight.data_ptr() != held.data_ptr() and torch.equal(held, before)


def test_a_graph_not_yet_backpropagated_keeps_the_signs_of_its_own_forward() -> None:
    layer, str_, raw = _linear_with_str()
    x = torch.randn(4, 128)
    first = layer(x)
    signs = str_._signs
    layer(x).sum().backward()  # a second forward before any step (accumulation) shares them
    assert signs is not None and str_._signs is signs
    with torch.no_grad():
        kept = raw.abs() > str_.threshold()
        str_.s.add_(1.0)  # a target's calibration moves the threshold; `first` is still to be backpropagated
    layer(x).sum().backward()
    assert str_._signs is not None and str_._signs.data_ptr() != signs.data_ptr()
    raw.grad = None
    first.sum().backward()
    assert torch.equal(raw.grad, torch.ones(4, 64).T @ x * kept)
    # Once no graph holds them, the next signs are written into their memory.
    before = str_._signs.data_ptr()
    with torch.no_grad():
        str_.s.add_(1.0)
    layer(x)
    assert str_._signs.data_ptr() == before


def test_the_backward_writes_its_gradient_over_only_where_nothing_else_holds_it(monkeypatch: pytest.MonkeyPatch):
    layer, str_, raw = _linear_with_str()
    _unshared_references.cache_clear()
    with torch.inference_mode():  # a first forward in inference mode (Lightning's sanity check) measures it too
        layer(torch.randn(1, 128))
    served: list[str] = []
    loop = kernels.soft_threshold_backward_
    monkeypatch.setattr(kernels, "soft_threshold_backward_", lambda *a: served.append("loop") or loop(*a))
    x = torch.randn(4, 128)
    kept = raw.detach().abs() > str_.threshold().detach()
    expected = torch.ones(4, 64).T @ x * kept

    layer(x).sum().backward()  # the linear's gradient is autograd's alone: written over in place
    assert served == ["loop"] and torch.allclose(raw.grad, expected)

    raw.grad = None
    given = torch.ones(64, 128)
    layer.weight.backward(given)  # a gradient the caller holds
    assert torch.equal(given, torch.ones(64, 128)) and torch.equal(raw.grad, given * kept)

    raw.grad, seen = None, []
    weight = layer.weight
    weight.register_hook(seen.append)  # a hook that keeps the gradient it sees
    torch.nn.functional.linear(x, weight).sum().backward()
    assert torch.allclose(seen[0], torch.ones(4, 64).T @ x) and torch.allclose(raw.grad, expected)
    assert served == ["loop"]  # neither took the in-place loop

    raw.grad = None
    before = raw.detach().clone()
    weight = layer.weight
    weight.register_hook(lambda grad: raw.detach())  # a gradient in the weight's own memory
    weight.sum().backward()
    assert torch.equal(raw.detach(), before) and torch.equal(raw.grad, before * kept)
    assert served == ["loop"]  # not written over: that would change the weight


def test_str_keeps_bf16_and_keep_mask():
    weight = torch.tensor([0.5, -0.05], dtype=torch.bfloat16)
    str_ = LearnedSoftThreshold(s_init=math.log(0.1 / 0.9))
    assert str_(weight).dtype == torch.bfloat16
    assert str_.keep_mask(weight).tolist() == [True, False]


def test_from_state_dict_recognises_only_its_own_state_and_keeps_its_dtype() -> None:
    weight = torch.randn(3, 3, dtype=torch.bfloat16)
    # A bf16 threshold saved before thresholds stayed float32 under `.to(torch.bfloat16)`.
    saved = {"s": torch.tensor(-1.5, dtype=torch.bfloat16)}
    loaded = LearnedSoftThreshold.from_state_dict(weight, saved)
    assert loaded is not None and loaded.s.dtype == torch.bfloat16 and loaded.s.item() == -1.5
    assert LearnedSoftThreshold.from_state_dict(weight, {}) is None
    assert LearnedSoftThreshold.from_state_dict(weight, StraightThroughSoftThreshold(weight).state_dict()) is None


# ------------------------------------------------------------------------------------ the method object


def test_defaults_name_and_settings() -> None:
    method = STR()
    assert method == STR(s_init=-100.0, threshold_decay=None)
    assert method.name == "str" and method.parametrization_class is LearnedSoftThreshold
    assert STR(-5, 0).settings() == {
        "method": "str", "s_init": -5.0, "threshold_decay": 0.0,
        "target_sparsity": None, "start": None, "end": None, "schedule": "cubic",
    }  # fmt: skip
    assert type(STR(-5).s_init) is float
    assert method.parametrization(torch.ones(2), 0).s.item() == -100.0
    assert method.for_run(math.inf) is method  # nothing depends on the run length


REAL = r"must be a real number \(int or float\), got"
IN_RANGE = r"must be a finite number in \[0, inf\], got"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"s_init": "-5"}, TypeError, r"^`s_init` must be a real number \(int or float\), got '-5' \(str\)$"),
        ({"s_init": True}, TypeError, r"^`s_init` must be a real number \(int or float\), got True \(bool\)$"),
        ({"s_init": math.inf}, ValueError, r"^`s_init` must be a finite number, got inf$"),
        ({"threshold_decay": "0.1"}, TypeError, rf"^`threshold_decay` {REAL} '0.1' \(str\)$"),
        ({"threshold_decay": True}, TypeError, rf"^`threshold_decay` {REAL} True \(bool\)$"),
        ({"threshold_decay": math.nan}, ValueError, rf"^`threshold_decay` {IN_RANGE} nan$"),
        ({"threshold_decay": -1.0}, ValueError, rf"^`threshold_decay` {IN_RANGE} -1.0$"),
    ],
    ids=["s_init-str", "s_init-bool", "s_init-inf", "decay-str", "decay-bool", "decay-nan", "decay-negative"],
)
def test_bad_settings_raise_at_construction_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        STR(**kwargs)


def _layers(s_init: float = -3.0) -> dict:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    parametrize_weights(select_weights(net), STR(s_init).parametrization)
    return {name: (w.holders[0][0], w.parametrization) for name, w in sparsity_parametrizations(net).items()}


def _distinct(layers: Any) -> dict[str, SparseWeight]:
    return {name: SparseWeight(p, ((m, "weight"),)) for name, (m, p) in layers.items()}


def test_on_fit_start_puts_each_threshold_in_the_group_of_its_weight() -> None:
    layers = _layers()
    (conv, p_conv), (fc, p_fc) = layers.values()
    first = torch.optim.SGD([conv.parametrizations.weight.original], lr=0.1, weight_decay=5e-4)
    second = torch.optim.Adam([fc.parametrizations.weight.original, p_fc.s], lr=0.2)
    assert STR(threshold_decay=0.05).on_fit_start(_distinct(layers), [first, second]) == []
    # No group is added (LR schedulers keep one entry per group): the thresholds join their weight's.
    assert [len(g["params"]) for g in first.param_groups] == [2] and first.param_groups[0]["params"][1] is p_conv.s
    assert [len(g["params"]) for g in second.param_groups] == [2]  # already held: not added twice


def test_on_fit_start_leaves_a_threshold_another_optimizer_holds_where_it_is() -> None:
    layers = _layers()
    (first, p_first), _ = layers.values()
    weights = torch.optim.SGD([first.parametrizations.weight.original], lr=0.1, weight_decay=5e-4)
    thresholds = torch.optim.Adam([p_first.s], lr=0.01)  # a dedicated optimizer for the first's
    STR().on_fit_start(dict(list(_distinct(layers).items())[:1]), [weights, thresholds])
    assert [len(g["params"]) for g in weights.param_groups] == [1] and len(thresholds.param_groups[0]["params"]) == 1


def test_on_fit_start_names_added_thresholds_in_an_optimizer_of_named_parameters() -> None:
    layers = _layers()
    net_params = [
        (f"{i}.parametrizations.weight.original", m.parametrizations.weight.original)
        for i, (m, _) in zip((0, 2), layers.values(), strict=True)
    ]
    optimizer = torch.optim.SGD(net_params, lr=0.1, weight_decay=5e-4)
    STR().on_fit_start(_distinct(layers), [optimizer])
    assert optimizer.param_groups[0]["param_names"] == [
        "0.parametrizations.weight.original",
        "2.parametrizations.weight.original",
        "0.parametrizations.weight.0.s",
        "2.parametrizations.weight.0.s",
    ]


def _unknown_optimizer(params: Any) -> torch.optim.Optimizer:
    class Lion(torch.optim.Optimizer):  # a third-party optimizer: how it decays is its own business
        def __init__(self, params: Any) -> None:
            super().__init__(params, {"lr": 0.1, "weight_decay": 0.1})

    return Lion(params)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda ps: torch.optim.Rprop(ps, lr=0.1),
            r"^`threshold_decay` needs an optimizer with weight decay, and Rprop has none; use one that has",
        ),
        (
            _unknown_optimizer,
            r"^`threshold_decay` needs to know how Lion applies its weight decay, and Lion is not one of torch's "
            r"optimizers: add `decoupled_weight_decay=True` to its param groups",
        ),
    ],
    ids=["Rprop", "unknown"],
)
def test_on_fit_start_refuses_threshold_decay_it_cannot_apply_before_changing_anything(make: Any, match: str) -> None:
    layers = _layers()
    weights = [w.raw for w in _distinct(layers).values()]
    optimizer = make(weights)
    with pytest.raises(ValueError, match=match):
        STR(threshold_decay=0.5).on_fit_start(_distinct(layers), [optimizer])
    assert optimizer.param_groups[0]["params"] == weights and not optimizer._optimizer_step_pre_hooks
    own = 0.1 if make is _unknown_optimizer else 0.0  # the decay asked for is the optimizer's own: nothing to change
    assert STR(threshold_decay=own).on_fit_start(_distinct(layers), [make(weights)]) == []


def test_on_fit_start_decays_with_one_hook_per_optimizer_however_many_fits() -> None:
    layers = _layers()
    (_, p), _ = layers.values()
    params = [q for module, _ in layers.values() for q in module.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.1, weight_decay=0.0)
    for _ in range(2):  # a second fit with the same optimizer replaces the first's hook
        STR(threshold_decay=0.5).on_fit_start(_distinct(layers), [optimizer])
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    before = p.s.item()
    p.s.grad = torch.zeros(())
    optimizer.step()
    assert p.s.item() == pytest.approx(before * (1 - 0.1 * 0.5))


def test_on_fit_start_warns_when_nothing_decays_the_thresholds() -> None:
    dense = "your optimizer applies none to them: the model will stay dense. Pass `threshold_decay=`"

    def warnings(method: STR, **optimizer: Any) -> list[str]:
        layers = _layers()
        params = [p for module, _ in layers.values() for p in module.parameters()]
        return method.on_fit_start(_distinct(layers), [torch.optim.SGD(params, lr=0.1, **optimizer)])

    (warning,) = warnings(STR())
    assert dense in warning
    assert warnings(STR(), weight_decay=1e-4) == []
    assert warnings(STR(threshold_decay=0.0)) == []  # chosen


def test_on_fit_start_warns_about_weights_in_no_optimizer() -> None:
    (warning,) = STR(threshold_decay=0.1).on_fit_start(_distinct(_layers()), [])
    assert warning.startswith("2 sparsified weight(s) are in no optimizer, so their STR thresholds stay at s_init")


def test_on_fit_start_warns_when_s_init_prunes_everything() -> None:
    layers = _layers(s_init=50.0)
    weights = [w.raw for w in _distinct(layers).values()]
    optimizer = torch.optim.SGD(weights, lr=0.1)
    (warning,) = STR(s_init=50.0, threshold_decay=0.1).on_fit_start(_distinct(layers), [optimizer])
    assert warning.startswith("Every sparsified weight is at or under its STR threshold (sigmoid(s_init=50) = 1)")
    assert "Use a much lower `s_init`, e.g. -5 for short runs or -100 (the default)." in warning


@pytest.mark.parametrize(
    "callback",
    [lambda: SparsityCallback(STR(s_init=50.0, threshold_decay=1e-3)), lambda: SparsityCallback("str", s_init=50)],
    ids=["object", "name"],
)
def test_a_fit_with_an_s_init_that_prunes_everything_warns_at_its_start(tmp_path: Path, callback: Any) -> None:
    model = TinyNet()
    with pytest.warns(UserWarning, match=r"sigmoid\(s_init=50\) = 1\): the whole model is pruned.*lower `s_init`"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[callback()]).fit(model)
    assert not model.conv.weight.any() and not model.fc.weight.any()


def test_metrics_are_each_layers_threshold() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    parametrize_weights(select_weights(net), STR(s_init=math.log(0.1 / 0.9)).parametrization)
    assert STR().metrics(7, sparsity_parametrizations(net)) == {
        "threshold/0": pytest.approx(0.1),
        "threshold/2": pytest.approx(0.1),
    }
    assert STR().metrics(7, {}) == {}


# ----------------------------------------------------------------------------------- with a real Trainer


def test_str_thresholds_are_in_the_users_optimizer_and_train(tmp_path: Path) -> None:
    model = BatchNormNet()
    callback = SparsityCallback("str", s_init=-2.0, threshold_decay=0.05)
    seen = {}

    class Spy(Callback):  # watches the optimizer during fit
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            thresholds = [w.parametrization.s for w in sparsity_parametrizations(pl_module).values()]
            optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["in_optimizer"] = all(id(s) in optimizer_params for s in thresholds)
            seen["decay"] = [g["weight_decay"] for g in trainer.optimizers[0].param_groups]
            seen["before"] = [s.item() for s in thresholds]

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen["after"] = [w.parametrization.s.item() for w in sparsity_parametrizations(pl_module).values()]

    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[callback, Spy()])
    trainer.fit(model, model.train_dataloader())
    assert seen["in_optimizer"]
    assert seen["decay"] == [5e-4]  # no group added: the thresholds are in their weights' group
    assert all(a != b for a, b in zip(seen["before"], seen["after"], strict=True))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    assert any((w == 0).any() for w in weights)


class WarmupCosine(TinyNet):
    """TinyNet under a linear warmup, then a cosine decay, per optimizer step: a SequentialLR."""

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=5e-4)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[4])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def test_threshold_decay_works_under_a_sequential_lr_schedule(tmp_path: Path) -> None:
    dense = WarmupCosine()
    make_trainer(tmp_path).fit(dense)
    model = WarmupCosine()
    make_trainer(tmp_path, callbacks=[SparsityCallback(STR(s_init=-3.0, threshold_decay=0.05))]).fit(model)
    (group,) = model.trainer.optimizers[0].param_groups
    assert group["lr"] == dense.trainer.optimizers[0].param_groups[0]["lr"]  # the user's LR trajectory
    assert any((w == 0).any() for w in (model.conv.weight, model.fc.weight))
