"""Sparsity schedules: frozen dataclasses mapping an optimizer step to a target sparsity.

Any object with a `sparsity_at(step) -> float` method is a `Schedule`; the built-in ones cover the
papers' ramps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from typing_extensions import override

from lightning_sparse.arguments import StepOrFraction, check_real, check_step_or_fraction

__all__ = ["ConstantSchedule", "CubicSchedule", "LinearSchedule", "Schedule"]


@runtime_checkable
class Schedule(Protocol):
    """The target sparsity after each optimizer step.

    Example:
        >>> isinstance(CubicSchedule(final=0.9, start=0, end=100), Schedule)
        True
    """

    def sparsity_at(self, step: int) -> float:
        """The fraction of weights to prune after optimizer step `step`, in [0, 1)."""
        ...


def _check_final(final: float) -> None:
    check_real("final", final, low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class ConstantSchedule:
    """Dense before `start`, `final` from `start` on.

    Example:
        >>> ConstantSchedule(final=0.9, start=10).sparsity_at(10)
        0.9
    """

    final: float
    start: int = 0

    def __post_init__(self) -> None:
        _check_final(self.final)
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")

    def sparsity_at(self, step: int) -> float:
        return self.final if step >= self.start else 0.0


@dataclass(frozen=True)
class LinearSchedule:
    """Dense before `start`, rising linearly to `final` at `end`, constant after.

    Example:
        >>> LinearSchedule(final=0.8, start=0, end=100).sparsity_at(50)
        0.4
    """

    final: float
    start: int
    end: int

    def __post_init__(self) -> None:
        _check_final(self.final)
        if not 0 <= self.start < self.end:
            raise ValueError(f"need 0 <= start < end, got start={self.start}, end={self.end}")

    def progress(self, step: int) -> float:
        """Fraction of the ramp done at `step`, clipped to [0, 1]."""
        return min(max((step - self.start) / (self.end - self.start), 0.0), 1.0)

    def sparsity_at(self, step: int) -> float:
        return self.final * self.progress(step)


@dataclass(frozen=True)
class CubicSchedule(LinearSchedule):
    """Gradual pruning's cubic ramp, `final * (1 - (1 - t)^3)`, as used by ST-3.

    Prunes fast early, while the network can still recover, and slowly near the target.

    Example:
        >>> CubicSchedule(final=0.9, start=0, end=100).sparsity_at(50)
        0.7875
    """

    @override
    def sparsity_at(self, step: int) -> float:
        return self.final * (1.0 - (1.0 - self.progress(step)) ** 3)


# Shared by the methods with a target sparsity (ST-3, STR's target mode): settings by name, resolved per run.
SCHEDULES: dict[str, type[LinearSchedule]] = {"cubic": CubicSchedule, "linear": LinearSchedule}
SCHEDULE_NAMES = (*SCHEDULES, "constant")


def check_schedule_settings(
    schedule: object,
    target_sparsity: float | None,
    start: StepOrFraction | None,
    end: StepOrFraction | None,
    default_span: tuple[float, float] = (0.05, 0.5),
) -> dict[str, Any]:
    """Validate a method's `schedule`, `target_sparsity`, `start` and `end`; the checked values to set.

    A schedule by name needs `target_sparsity` (start and end default to `default_span`, fractions of the
    run); a schedule object (any `sparsity_at(step)`) takes none of the three.

    Example:
        >>> check_schedule_settings("cubic", 0.9, None, 0.7, default_span=(0.2, 0.8))
        {'target_sparsity': 0.9, 'start': 0.2, 'end': 0.7}
    """
    checked: dict[str, Any] = {}
    if isinstance(schedule, str):
        if schedule not in SCHEDULE_NAMES:
            raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULE_NAMES))}, got {schedule!r}")
        if target_sparsity is None:
            raise ValueError("`target_sparsity` is required: the final fraction of zeros, e.g. 0.9")
        checked["target_sparsity"] = check_real("target_sparsity", target_sparsity, low=0.0, high=1.0, high_open=True)
        checked["start"] = check_step_or_fraction("start", default_span[0] if start is None else start)
        checked["end"] = check_step_or_fraction("end", default_span[1] if end is None else end)
    elif isinstance(schedule, type) or not callable(getattr(schedule, "sparsity_at", None)):
        raise TypeError(
            f"`schedule` must be one of {', '.join(map(repr, SCHEDULE_NAMES))} or an object with a "
            f"`sparsity_at(step)` method, got {schedule!r} ({type(schedule).__name__})"
        )
    else:
        named = {"target_sparsity": target_sparsity, "start": start, "end": end}
        given = [name for name, value in named.items() if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in given)} cannot be combined with a schedule object, which sets "
                "the sparsity at every step; remove them, or give `schedule` by name"
            )
    return checked


def build_schedule(schedule: str, target_sparsity: float, start: int, end: int) -> Schedule:
    """The schedule object of a schedule given by name, with its steps resolved."""
    if schedule == "constant":
        return ConstantSchedule(target_sparsity, start)
    return SCHEDULES[schedule](target_sparsity, start, end)


def check_order(
    schedule: str | Schedule,
    start: StepOrFraction | None,
    end: StepOrFraction | None,
    freeze_at: StepOrFraction | None = None,
    unit: str = "",
) -> None:
    """`start < end <= freeze_at`, for each pair given in the same unit (all are steps after `for_run`)."""
    # A constant schedule reaches its target at `start`; a schedule object's ramp is its own business.
    ramp = {"constant": "start"}.get(schedule, "end") if isinstance(schedule, str) else None
    ramp_end = start if ramp == "start" else end if ramp == "end" else None
    if ramp == "end" and _same_unit(start, end) and end <= start:  # type: ignore[operator]
        too_few = "; the run has too few optimizer steps for them" if unit else ""
        raise ValueError(f"`end` ({unit}{end}) must come after `start` ({unit}{start}){too_few}")
    if _same_unit(freeze_at, ramp_end) and freeze_at < ramp_end:  # type: ignore[operator]
        raise ValueError(
            f"`freeze_at` ({unit}{freeze_at}) must not come before `{ramp}` ({unit}{ramp_end}): "
            "masks would freeze mid-schedule"
        )


def _same_unit(a: StepOrFraction | None, b: StepOrFraction | None) -> bool:
    return a is not None and b is not None and type(a) is type(b)


def to_step(name: str, value: StepOrFraction | None, total: float) -> int | None:
    """`value` as an optimizer step: an int is one, a float is a fraction of the run's `total` steps."""
    if value is None or isinstance(value, int):
        return value
    if not math.isfinite(total):
        raise ValueError(
            f"`{name}={value}` is a fraction of training, but this Trainer has no known number of optimizer "
            f"steps; set `max_steps` or `max_epochs` on the Trainer, or give `{name}` as an int step"
        )
    return round(value * total)


def resolve_ramp(
    schedule: str | Schedule, start: StepOrFraction | None, end: StepOrFraction | None, total_steps: float
) -> tuple[int | None, int | None]:
    """`start` and `end` in optimizer steps for a run of `total_steps`, their order checked.

    On a very short run (`fast_dev_run`) fractions in order can round onto one step: `end` then moves
    one step after `start`.
    """
    start_step, end_step = to_step("start", start, total_steps), to_step("end", end, total_steps)
    if start_step is not None and end_step is not None and isinstance(end, float) and isinstance(start, float):
        end_step = max(end_step, start_step + 1)
    return start_step, end_step
