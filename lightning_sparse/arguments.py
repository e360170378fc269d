"""Checking user arguments once, with their types: every error names the argument and the fix.

Numbers are real numbers: Python `int`/`float` and numpy scalars (converted to Python numbers, so
checkpoints stay loadable with `weights_only=True`); bools, strings, tensors and lists are refused.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

__all__ = ["StepOrFraction", "check_bool", "check_positive_int", "check_real", "check_step_or_fraction"]

StepOrFraction = int | float
"""An optimizer step (int) or a fraction of the run's optimizer steps (float in [0, 1])."""


def check_real(
    name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, high_open: bool = False
) -> float:
    """`value` as a Python float, if it is a finite real number in `[low, high]` (`[low, high)` with `high_open`).

    Example:
        >>> import numpy as np
        >>> check_real("target_sparsity", np.float32(0.5), low=0.0, high=1.0, high_open=True)
        0.5
        >>> check_real("target_sparsity", "0.5")
        Traceback (most recent call last):
        ...
        TypeError: `target_sparsity` must be a real number (int or float), got '0.5' (str)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = "; pass a Python number, e.g. `tensor.item()`" if hasattr(value, "item") else ""
        raise TypeError(f"`{name}` must be a real number (int or float), got {value!r} ({type(value).__name__}){hint}")
    number = float(value)
    bracket = ")" if high_open else "]"
    if not (math.isfinite(number) and low <= number and (number < high if high_open else number <= high)):
        span = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}{bracket}"
        raise ValueError(f"`{name}` must be a finite number{span}, got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """`value` if it is a bool (numpy's included); strings such as ``"False"`` are refused, not taken as true.

    Example:
        >>> check_bool("rescale", "False")
        Traceback (most recent call last):
        ...
        TypeError: `rescale` must be True or False, got 'False' (str)
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_step_or_fraction(name: str, value: Any) -> StepOrFraction:
    """`value` as an optimizer step (an int >= 0) or a fraction of the run (a float in [0, 1]).

    Example:
        >>> check_step_or_fraction("end", 0.5), check_step_or_fraction("end", 100)
        (0.5, 100)
        >>> check_step_or_fraction("end", 1.5)
        Traceback (most recent call last):
        ...
        ValueError: `end` as a fraction of training (float) must lie in [0, 1], got 1.5; give a step as an int
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"`{name}` as an optimizer step (int) must be >= 0, got {value}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be an optimizer step (int) or a fraction of training (float), "
            f"got {value!r} ({type(value).__name__})"
        )
    fraction = float(value)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(
            f"`{name}` as a fraction of training (float) must lie in [0, 1], got {value!r}; give a step as an int"
        )
    return fraction


def check_positive_int(name: str, value: Any) -> int:
    """`value` as a Python int, if it is an integer >= 1 (numpy's included).

    Example:
        >>> check_positive_int("log_every_n_steps", 0)
        Traceback (most recent call last):
        ...
        ValueError: `log_every_n_steps` must be a positive int, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    return int(value)
