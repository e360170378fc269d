"""Sparsity schedules: frozen dataclasses mapping an optimizer step to a target sparsity.

Any object with a `sparsity_at(step) -> float` method is a `Schedule`; the built-in ones cover the
papers' ramps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from typing_extensions import override

from lightning_sparse.arguments import check_real

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
