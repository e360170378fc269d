"""Sparsity schedules: frozen dataclasses mapping an optimizer step to a target sparsity."""

from __future__ import annotations

from dataclasses import dataclass


def _check_sparsity(final: float) -> None:
    if not 0.0 <= final < 1.0:
        raise ValueError(f"final sparsity must lie in [0, 1), got {final}")


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
        _check_sparsity(self.final)
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
        _check_sparsity(self.final)
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

    def sparsity_at(self, step: int) -> float:
        return self.final * (1.0 - (1.0 - self.progress(step)) ** 3)


Schedule = ConstantSchedule | LinearSchedule | CubicSchedule
