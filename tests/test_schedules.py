"""`lightning_sparse.schedules`: the built-in ramps, and any object with `sparsity_at(step)` driving ST-3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_sparse import ST3, SparsityCallback
from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule, Schedule
from models import N_WEIGHTS, TinyNet, make_trainer, zeros


def test_cubic_schedule_start_middle_end() -> None:
    schedule = CubicSchedule(final=0.9, start=10, end=110)
    assert schedule.sparsity_at(0) == 0.0
    assert schedule.sparsity_at(10) == 0.0
    assert schedule.sparsity_at(60) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule.sparsity_at(110) == pytest.approx(0.9)
    assert schedule.sparsity_at(10_000) == pytest.approx(0.9)


def test_linear_schedule_start_middle_end() -> None:
    schedule = LinearSchedule(final=0.8, start=0, end=100)
    assert [schedule.sparsity_at(s) for s in (0, 50, 100, 200)] == pytest.approx([0.0, 0.4, 0.8, 0.8])


def test_constant_schedule() -> None:
    schedule = ConstantSchedule(final=0.5, start=3)
    assert [schedule.sparsity_at(s) for s in (0, 2, 3, 99)] == [0.0, 0.0, 0.5, 0.5]


def test_cubic_prunes_faster_early_than_linear() -> None:
    cubic, linear = CubicSchedule(0.9, 0, 100), LinearSchedule(0.9, 0, 100)
    assert all(cubic.sparsity_at(s) >= linear.sparsity_at(s) for s in range(101))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: CubicSchedule(final=1.0, start=0, end=10), ValueError, r"`final` must be a finite number in \[0, 1\)"),
        (lambda: LinearSchedule(final=-0.1, start=0, end=10), ValueError, r"`final` must be a finite number"),
        (lambda: LinearSchedule(final="0.5", start=0, end=10), TypeError, r"`final` must be a real number"),
        (lambda: CubicSchedule(final=0.5, start=10, end=10), ValueError,
         r"need 0 <= start < end, got start=10, end=10"),
        (lambda: ConstantSchedule(final=0.5, start=-1), ValueError, r"start must be >= 0, got -1"),
    ],
)  # fmt: skip
def test_invalid_schedules_raise(make: Callable[[], Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


class Steps:
    """A user's schedule: not a dataclass, nothing from the library, only `sparsity_at(step)`."""

    def sparsity_at(self, step: int) -> float:
        return 0.25 if step < 8 else 0.5


def test_any_object_with_sparsity_at_is_a_schedule() -> None:
    assert isinstance(CubicSchedule(0.9, 0, 10), Schedule) and isinstance(Steps(), Schedule)
    assert not isinstance(object(), Schedule)


def _record(counts: list[int]) -> pl.Callback:
    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            counts.append(zeros(pl_module.conv.weight, pl_module.fc.weight))

    return Record()


@pytest.mark.parametrize(
    "callback",
    [
        lambda schedule: SparsityCallback(ST3(schedule=schedule), harden_on_fit_end=False),
        lambda schedule: SparsityCallback("st3", schedule=schedule, harden_on_fit_end=False),
    ],
    ids=["object", "name"],
)
@pytest.mark.parametrize("schedule", [LinearSchedule(0.5, 0, 4), Steps()], ids=["LinearSchedule", "user-class"])
def test_schedules_are_open_a_schedule_object_drives_st3_step_by_step(
    tmp_path: Path, callback: Callable[[Schedule], SparsityCallback], schedule: Schedule
) -> None:
    counts: list[int] = []
    model = TinyNet()
    make_trainer(tmp_path, callbacks=[callback(schedule), _record(counts)]).fit(model)
    assert counts == [round(schedule.sparsity_at(step) * N_WEIGHTS) for step in range(1, 17)]
    assert counts[-1] == round(0.5 * N_WEIGHTS)
