"""`lightning_sparse.methods.base`: what every method provides; a method written outside the library works too."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_sparse import ST3, LinearSchedule, SparsityCallback
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods import SparseParametrization, SparsityMethod
from lightning_sparse.methods.base import distinct_weights, parametrizations_of
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from models import TinyNet, make_trainer, zeros


class KeepLargest(SparseParametrization):
    """Zeroes the smaller half of a weight's entries (by magnitude), recomputed at every forward."""

    def keep_mask(self, weight: Tensor) -> Tensor:
        magnitude = weight.detach().abs()
        return magnitude > magnitude.flatten().median()

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.keep_mask(weight)

    @classmethod
    def from_state_dict(cls, original: Tensor, state: Mapping[str, Any]) -> KeepLargest | None:
        return cls() if not state else None


@dataclass(frozen=True)
class HalfPruning(SparsityMethod):
    """A method defined by a user: no registry entry, only the base class."""

    label: str = "half"

    parametrization_class = KeepLargest

    @property
    def name(self) -> str:
        return "half"

    def parametrization(self, weight: Tensor, output_axis: int) -> KeepLargest:
        return KeepLargest()


def test_a_method_from_outside_the_library_trains_with_the_callback(tmp_path: Path) -> None:
    model = TinyNet()
    callback = SparsityCallback(HalfPruning(), harden_on_fit_end=False)
    make_trainer(tmp_path, callbacks=[callback]).fit(model)

    layers = sparsity_parametrizations(model)
    assert list(layers) == ["conv", "fc"] and all(isinstance(w.parametrization, KeepLargest) for w in layers.values())
    assert callback.state_dict() == {
        "method": "half", "label": "half", "layers": ["conv", "fc"], "total_steps": 16, "schedule_step": 16
    }  # fmt: skip
    # The base class's defaults: nothing to adapt, nothing of its own to log, one object for every run.
    method = callback.method
    assert method.for_run(16) is method and method.for_run(math.inf) is method
    assert method.on_fit_start({}, []) == [] and method.metrics(1, layers) == {} and method.target(1) is None
    assert method.owns(layers["fc"].parametrization) and not method.owns(nn.Identity())
    assert zeros(model.conv.weight) == 6 and zeros(model.fc.weight) == 32  # at or under the median: half


def test_settings_hold_only_what_a_weights_only_checkpoint_can() -> None:
    @dataclass(frozen=True)
    class Steps:
        def sparsity_at(self, step: int) -> float:
            return 0.5

    settings = ST3(schedule=LinearSchedule(0.5, 0, 4)).settings()
    assert settings["schedule"] == "LinearSchedule(final=0.5, start=0, end=4)"  # an object by its repr
    assert ST3(schedule=Steps()).settings()["schedule"].endswith("Steps()")
    buffer = io.BytesIO()
    torch.save(settings, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == settings


def test_distinct_weights_lists_a_tied_weight_once_and_reads_it_afresh() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    net[1].weight = net[0].weight
    parametrize_weights(select_weights(net), lambda weight, axis: KeepLargest())
    layers = sparsity_parametrizations(net)

    pairs = distinct_weights(layers)

    assert [p for p, _ in pairs] == [layers["0"].parametrization, layers["2"].parametrization]
    assert pairs[0][1] is parametrizations_of(net[1], "weight").original is net[0].parametrizations.weight.original
    net[2].parametrizations.weight.original = nn.Parameter(torch.zeros(2, 3))  # e.g. FSDP swapping parameters
    assert distinct_weights(layers)[1][1] is net[2].parametrizations.weight.original


def test_a_method_and_a_parametrization_must_implement_the_abstract_parts() -> None:
    with pytest.raises(TypeError, match="abstract"):
        SparsityMethod()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="abstract"):
        SparseParametrization()  # type: ignore[abstract]


@pytest.mark.parametrize(
    "make", [lambda weight: LearnedSoftThreshold(s_init=-5.0), StraightThroughSoftThreshold], ids=["str", "st3"]
)
def test_an_effective_weight_computed_in_inference_mode_serves_training(make: Any) -> None:
    # Lightning validates in inference mode, its sanity check before the first training step. The effective weight
    # such a forward computes is kept: training must be able to save it for backward, and a later forward to write
    # the next one into its memory.
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(64, 128))
    parametrization = make(weight)
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with torch.inference_mode():
        parametrization(weight)
    for _ in range(2):
        (parametrization(weight) * torch.randn(64, 128)).sum().backward()
        optimizer.step()
        with torch.inference_mode():
            served = parametrization(weight)
        assert not served.is_inference()
