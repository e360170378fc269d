"""`lightning_sparse.layers`: choosing the layers, and putting reparameterizations on (all or nothing) and off."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sparse.layers import (
    check_filters,
    check_removable,
    parametrize_weights,
    remove_parametrization,
    select_weights,
    sparsity_parametrizations,
    unparametrize,
)
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold
from lightning_sparse.methods.str_method import LearnedSoftThreshold


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = nn.Conv2d(1, 2, 1)
        self.conv3 = nn.Conv3d(1, 2, 1)
        self.norm = nn.BatchNorm1d(2)


def _net() -> nn.Module:
    net = nn.Module()
    net.encoder = Encoder()
    net.embed = nn.Embedding(5, 3)
    net.conv1 = nn.Conv1d(1, 2, 3)
    net.act = nn.ReLU()
    net.head = nn.Linear(4, 2)
    return net


def _str(weight: Tensor, output_axis: int) -> LearnedSoftThreshold:
    return LearnedSoftThreshold(s_init=-3.0)


# ------------------------------------------------------------------------------------------- check_filters


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (None, None),
        (nn.Linear, [nn.Linear]),
        ("conv", ["conv"]),  # one pattern, not its letters
        ("encoder.*", ["encoder.*"]),
        (["conv", nn.Linear], ["conv", nn.Linear]),
        (("conv",), ["conv"]),
        ([], []),
    ],
    ids=["None", "type", "pattern", "glob", "list", "tuple", "empty"],
)
def test_check_filters_takes_one_filter_or_a_list(filters: Any, expected: Any) -> None:
    checked = check_filters("include", filters)
    assert checked == expected
    if filters is not None:
        assert type(checked) is list and checked is not filters  # a copy: the user's list is not kept


@pytest.mark.parametrize(
    ("argument", "filters", "bad"),
    [
        ("include", 3, "3"),
        ("include", [3], "3"),
        ("exclude", [nn.functional.relu], "<function relu"),
        ("exclude", nn.Linear(2, 2), "Linear\\(in_features=2"),  # a module, not its type
        ("include", [int], "<class 'int'>"),
        ("include", {"conv"}, "\\{'conv'\\}"),  # a set has no order: not taken as a list
        ("exclude", [["conv"]], "\\['conv'\\]"),
    ],
    ids=["int", "int-in-list", "function", "module-instance", "non-module-type", "set", "nested-list"],
)
def test_check_filters_refuses_other_entries_naming_the_argument(argument: str, filters: Any, bad: str) -> None:
    with pytest.raises(
        TypeError,
        match=rf"^`{argument}` takes module types \(nn.Module subclasses\) or name patterns \(str\) of modules or "
        rf"parameters, one or a list of them, got {bad}",
    ):
        check_filters(argument, filters)


# ------------------------------------------------------------------------------------------- select_weights


def test_select_weights_defaults_to_every_conv_and_linear() -> None:
    assert list(select_weights(_net())) == ["encoder.conv2", "encoder.conv3", "conv1", "head"]


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (["encoder.conv*"], [], ["encoder.conv2", "encoder.conv3"]),  # include replaces the default
        ([nn.Embedding, "head"], [], ["embed", "head"]),
        (None, ["encoder.*"], ["conv1", "head"]),
        (None, [nn.Conv2d, nn.Conv3d], ["conv1", "head"]),
        (["encoder.*"], [nn.BatchNorm1d], ["encoder.conv2", "encoder.conv3"]),
        (None, ["conv?"], ["encoder.conv2", "encoder.conv3", "head"]),  # fnmatch on the full qualified name
    ],
)
def test_select_weights_include_replaces_and_exclude_removes(
    include: list[Any] | None, exclude: list[Any], expected: list[str]
) -> None:
    assert list(select_weights(_net(), include, exclude)) == expected


@pytest.mark.parametrize(
    ("include", "exclude", "match"),
    [
        (["encoder"], [], r"`include` entry 'encoder' matches no module with a weight"),  # no weight of its own
        (None, ["Head"], r"`exclude` entry 'Head' matches no module with a weight"),  # case-sensitive
        ([nn.Conv1d, nn.LSTM], [], r"`include` entry <class 'torch.nn.modules.rnn.LSTM'> matches no module"),
        (None, [nn.Conv1d, nn.LSTM], r"`exclude` entry <class 'torch.nn.modules.rnn.LSTM'> matches no module"),
        (["*.bias_k"], [], r"`include` entry '\*.bias_k' matches no module with a weight and no parameter"),
    ],
)
def test_select_weights_refuses_a_filter_that_matches_nothing_listing_the_candidates(
    include: list[Any] | None, exclude: list[Any], match: str
) -> None:
    candidates = "modules with weights are: encoder.conv2, encoder.conv3, encoder.norm, embed, conv1, head$"
    with pytest.raises(ValueError, match=rf"{match}.*{candidates}"):
        select_weights(_net(), include, exclude)


def test_select_weights_refuses_a_1d_weight_it_selects_naming_it_and_the_exclude_that_leaves_it_dense() -> None:
    # `encoder.*` also matches the BatchNorm: ST-3's per-channel rescale means nothing for a 1-D weight.
    with pytest.raises(
        ValueError,
        match=r"^Cannot sparsify these weights, which `include`/`exclude` select:\n- 'encoder.norm': it is 1-D "
        r"\(shape \(2,\)\): .*\nLeave them dense with `exclude=\['encoder.norm'\]`",
    ):
        select_weights(_net(), include=["encoder.*"])


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_select_weights_refuses_hook_normalised_and_lazy_weights_and_skips_a_none_weight() -> None:
    net = nn.Sequential(
        nn.utils.spectral_norm(nn.Linear(3, 3)),
        nn.utils.weight_norm(nn.Linear(3, 3)),
        nn.LazyLinear(3),
        nn.Linear(3, 3),
    )
    net[3].weight = None
    with pytest.raises(ValueError) as raised:
        select_weights(net)
    lines = str(raised.value).splitlines()
    assert lines[1].startswith("- '0': it is recomputed before each forward by `torch.nn.utils.spectral_norm`")
    assert lines[2].startswith("- '1': it is recomputed before each forward by `torch.nn.utils.weight_norm`")
    assert lines[3].startswith("- '2': it belongs to a lazy module (LazyLinear) and has no shape yet; run one forward")
    assert (
        lines[4]
        == "Leave them dense with `exclude=['0', '1', '2']` (added to any other `exclude`), or narrow `include`."
    )
    assert select_weights(net, exclude=["0", "1", "2"]) == {}  # '3' has no weight: no candidate
    with pytest.raises(ValueError, match="matches no module with a weight"):
        select_weights(net, include=["3"])


def test_select_weights_does_not_compute_a_parametrized_weight() -> None:
    net = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(3, 3)), nn.Linear(3, 3))
    u = net[0].parametrizations.weight[0]._u.clone()
    assert list(select_weights(net)) == ["0", "1"]  # then refused by `parametrize_weights`, as any parametrized weight
    assert torch.equal(net[0].parametrizations.weight[0]._u, u)  # no power iteration ran


def test_select_weights_sees_parametrized_weights_and_reports_none() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    parametrize_weights(select_weights(net, include=["0"]), _str)
    assert list(select_weights(net)) == ["0", "2"]
    with pytest.raises(
        ValueError, match=r"matches no module with a weight and no parameter; modules with weights are: none"
    ):
        select_weights(nn.Sequential(nn.ReLU()), include=["0"])


# ------------------------------------------------------------------------------ parametrize / unparametrize


def test_parametrize_weights_registers_one_parametrization_per_weight_and_tied_weights_share_it() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    net[1].weight = net[0].weight
    made: list[Tensor] = []

    def make(weight: Tensor, output_axis: int) -> StraightThroughSoftThreshold:
        made.append(weight)
        return StraightThroughSoftThreshold(weight)

    parametrize_weights(select_weights(net), make)
    layers = sparsity_parametrizations(net)
    assert list(layers) == ["0", "2"] and len(made) == 2  # a tied weight is one weight, named by its first holder
    assert layers["0"].holders == ((net[0], "weight"), (net[1], "weight"))
    assert net[0].parametrizations.weight[0] is net[1].parametrizations.weight[0] is layers["0"].parametrization
    assert net[0].parametrizations.weight.original is net[1].parametrizations.weight.original


def test_parametrize_weights_refuses_a_weight_that_already_has_a_parametrization_before_changing_anything() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    nn.utils.parametrizations.orthogonal(net[1])
    with pytest.raises(
        ValueError,
        match=r"weight '1' already has a parametrization \(_Orthogonal\); exclude it with "
        r"`exclude=\['1'\]`",
    ):
        parametrize_weights(select_weights(net), _str)
    assert not parametrize.is_parametrized(net[0])
    assert not sparsity_parametrizations(net)


def test_parametrize_weights_is_all_or_nothing() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Conv1d(1, 2, 3), nn.Linear(4, 2))
    net[1].weight = net[0].weight  # tied: undone for both layers, and still tied afterwards
    weights = [m.weight for m in net]
    values = [w.detach().clone() for w in weights]
    calls = []

    def make(weight: Tensor, output_axis: int) -> LearnedSoftThreshold:
        calls.append(weight)
        if len(calls) == 2:
            raise RuntimeError("cannot reparameterize this one")
        return LearnedSoftThreshold(s_init=-3.0)

    with pytest.raises(RuntimeError, match="cannot reparameterize this one"):
        parametrize_weights(select_weights(net), make)

    assert not any(parametrize.is_parametrized(m) for m in net)
    assert [type(m) for m in net] == [nn.Linear, nn.Linear, nn.Conv1d, nn.Linear]
    assert all(m.weight is w for m, w in zip(net, weights, strict=True))  # the same Parameter objects ...
    assert all(torch.equal(w, v) for w, v in zip(weights, values, strict=True))  # ... with the same values
    assert net[1].weight is net[0].weight


def test_unparametrize_gives_back_the_raw_weights_untouched() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    weights = [m.weight for m in net]
    values = [w.detach().clone() for w in weights]
    added = parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=0.0))  # sigmoid(0)
    assert any((m.weight == 0).any() for m in net)

    unparametrize(added)

    assert not sparsity_parametrizations(net)
    assert [type(m) for m in net] == [nn.Linear, nn.Linear]
    assert all(m.weight is w for m, w in zip(net, weights, strict=True))
    assert all(torch.equal(w, v) for w, v in zip(weights, values, strict=True))  # nothing baked in


def test_unparametrize_gives_back_the_parameters_in_their_order() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    keys, parameters = list(net.state_dict()), list(net.parameters())
    unparametrize(parametrize_weights(select_weights(net), _str))
    assert list(net.state_dict()) == keys
    assert all(p is q for p, q in zip(net.parameters(), parameters, strict=True))


class Double(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return 2 * weight


@pytest.mark.parametrize("bake", [True, False])
def test_remove_parametrization_keeps_one_stacked_on_ours(bake: bool) -> None:
    net = nn.Sequential(nn.Linear(4, 4))
    raw = net[0].weight.detach().clone()
    parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-1.0))
    ours = net[0].weight.detach().clone()
    parametrize.register_parametrization(net[0], "weight", Double())

    remove_parametrization(net[0], "weight", bake=bake)

    assert [type(p) for p in net[0].parametrizations.weight] == [Double]
    torch.testing.assert_close(net[0].weight, 2 * (ours if bake else raw))


def test_check_removable_refuses_ours_on_top_of_another() -> None:
    net = nn.Sequential(nn.Linear(3, 3))
    parametrize.register_parametrization(net[0], "weight", Double())
    parametrize.register_parametrization(net[0], "weight", LearnedSoftThreshold(s_init=-1.0))
    with pytest.raises(ValueError, match=r"weight 'head' has a parametrization under lightning-sparse's \(Double\)"):
        check_removable("head", net[0], "weight")


def test_sparsity_parametrizations_ignores_other_parametrizations() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    nn.utils.parametrizations.orthogonal(net[0])
    assert sparsity_parametrizations(net) == {}
    parametrize_weights(select_weights(net, include=["1"]), _str)
    ((name, weight),) = sparsity_parametrizations(net).items()
    assert (name, weight.holders) == ("1", ((net[1], "weight"),))
    assert isinstance(weight.parametrization, LearnedSoftThreshold)
