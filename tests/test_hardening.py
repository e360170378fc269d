"""`lightning_sparse.harden`: a reparameterized model back to a plain one with exact zeros, in place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sparse import ST3, STR, SparsityCallback, harden, harden_state_dict
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods.base import SparsityMethod
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from models import BatchNormNet, make_trainer


def _st3(frozen: bool) -> Callable[[nn.Module], None]:
    def sparsify(net: nn.Module) -> None:
        parametrize_weights(select_weights(net), lambda w, axis: StraightThroughSoftThreshold(w))
        pairs = [(w.parametrization, w.raw) for w in sparsity_parametrizations(net).values()]
        update_thresholds([p for p, _ in pairs], [w for _, w in pairs], sparsity=0.6)
        if frozen:
            pairs[0][0].freeze(pairs[0][1])

    return sparsify


def _str(net: nn.Module) -> None:
    parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-1.5))


SPARSIFY = {"str": _str, "st3": _st3(frozen=False), "st3-frozen": _st3(frozen=True)}


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(24, 3))


@pytest.mark.parametrize("method", list(SPARSIFY))
def test_harden_bakes_in_the_effective_weights_and_gives_back_the_plain_model(method: str) -> None:
    net = _net()
    keys, classes = list(net.state_dict()), [type(m) for m in net.modules()]
    weights = [net[0].weight, net[3].weight]
    SPARSIFY[method](net)
    effective = [net[0].weight.detach().clone(), net[3].weight.detach().clone()]
    x = torch.randn(5, 1, 8)
    net.eval()
    expected = net(x)

    assert harden(net) is net

    assert not sparsity_parametrizations(net)
    assert [type(m) for m in net.modules()] == classes
    assert list(net.state_dict()) == keys  # the unmodified model's keys, in its order
    for layer, weight, value in zip((net[0], net[3]), weights, effective, strict=True):
        assert layer.weight is weight and type(weight) is nn.Parameter  # the Parameter the optimizer holds
        assert torch.equal(weight, value) and (weight == 0).any()
    assert torch.equal(net(x), expected)


def test_harden_leaves_a_plain_model_and_other_parametrizations_alone() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert harden(net) is net
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    nn.utils.parametrizations.orthogonal(net[1])
    parametrize_weights(select_weights(net, include=["0"]), lambda w, axis: LearnedSoftThreshold(s_init=-1.5))
    harden(net)
    assert not sparsity_parametrizations(net)
    assert nn.utils.parametrize.is_parametrized(net[1], "weight")  # not ours: kept


class Double(nn.Module):
    """Someone else's parametrization: twice the weight (from a buffer, so it shows in state dicts)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.tensor(2.0))

    def forward(self, weight: Tensor) -> Tensor:
        return self.factor * weight


@pytest.mark.parametrize("method", list(SPARSIFY))
def test_harden_removes_only_ours_and_keeps_a_parametrization_stacked_on_it(method: str) -> None:
    net = _net()
    SPARSIFY[method](net)
    ours = net[3].weight.detach().clone()
    parametrize.register_parametrization(net[3], "weight", Double())
    saved = {k: v.clone() if isinstance(v, Tensor) else v for k, v in net.state_dict().items()}
    x = torch.randn(5, 1, 8)
    net.eval()
    expected = net(x)

    harden(net)

    assert not sparsity_parametrizations(net)
    assert [type(p) for p in net[3].parametrizations.weight] == [Double]  # theirs, kept and not baked in
    assert torch.equal(net[3].parametrizations.weight.original, ours)  # ours, baked into the raw weight
    assert torch.equal(net(x), expected)
    # The state dict is the one of the unmodified model with their parametrization, and `harden_state_dict` agrees.
    plain = _net()
    parametrize.register_parametrization(plain[3], "weight", Double())
    assert list(net.state_dict()) == list(plain.state_dict())
    hardened = harden_state_dict(saved)
    assert list(hardened) == list(net.state_dict())
    assert all(torch.equal(hardened[k], v) for k, v in net.state_dict().items())
    assert "3.parametrizations.weight.0.factor" in hardened


def test_harden_refuses_ours_on_top_of_another_parametrization_before_changing_anything() -> None:
    net = _net()
    parametrize.register_parametrization(net[3], "weight", Double())
    parametrize.register_parametrization(net[3], "weight", LearnedSoftThreshold(s_init=-1.5))
    parametrize_weights(select_weights(net, include=["0"]), lambda w, axis: LearnedSoftThreshold(s_init=-1.5))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"weight '3' has a parametrization under lightning-sparse's .*\(Double\)"):
        harden(net)
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert set(sparsity_parametrizations(net)) == {"0", "3"}


def test_harden_twice_changes_nothing_more() -> None:
    net = _net()
    _str(net)
    state = {k: v.clone() for k, v in harden(net).state_dict().items()}
    harden(net)
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_harden_keeps_tied_weights_tied() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    shared = a.weight
    net = nn.Sequential(a, nn.ReLU(), b)
    parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-1.0))
    effective = a.weight.detach().clone()
    x = torch.randn(2, 4)
    expected = net(x)

    harden(net)

    assert a.weight is b.weight is shared
    assert torch.equal(shared, effective) and (shared == 0).any()  # the threshold applied once, not twice
    assert torch.equal(net(x), expected)


def _sparsified_weights(model: nn.Module) -> list[Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]


@pytest.mark.parametrize(
    "method",
    [ST3(target_sparsity=0.8), ST3(target_sparsity=0.8, sigma=True), STR(s_init=-2.0, threshold_decay=0.05)],
    ids=["st3", "st3sigma", "str"],
)
def test_harden_after_a_fit_leaves_outputs_unchanged_and_exact_zeros(tmp_path: Path, method: SparsityMethod) -> None:
    model = BatchNormNet()
    trainer = make_trainer(tmp_path, max_epochs=3, callbacks=[SparsityCallback(method, harden_on_fit_end=False)])
    trainer.fit(model, model.train_dataloader())
    assert sparsity_parametrizations(model)  # not hardened: still reparameterized

    x = torch.randn(16, 1, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
        effective = {name: getattr(*w.holders[0]).clone() for name, w in sparsity_parametrizations(model).items()}
        harden(model)
        after = model(x)
    assert (after - before).abs().max().item() <= 1e-4
    for name, weight in effective.items():
        hardened = model.get_submodule(name).weight
        assert torch.equal(hardened == 0, weight == 0)
        assert (hardened == 0).any()
    assert all(type(w) is nn.Parameter for w in _sparsified_weights(model))
