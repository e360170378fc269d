"""`lightning_sparse.arguments`: user numbers, bools and steps checked once, every error naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from lightning_sparse.arguments import check_bool, check_real, check_step_or_fraction


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.5, 0.5), (0, 0.0), (3, 3.0), (np.float64(0.25), 0.25), (np.float32(0.5), 0.5), (np.int64(2), 2.0)],
    ids=["float", "int-zero", "int", "np.float64", "np.float32", "np.int64"],
)
def test_check_real_gives_a_python_float(value: Any, expected: float) -> None:
    checked = check_real("x", value)
    assert type(checked) is float and checked == expected


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("0.5", r"`x` must be a real number \(int or float\), got '0.5' \(str\)$"),
        (True, r"`x` must be a real number \(int or float\), got True \(bool\)$"),
        (np.bool_(False), r"`x` must be a real number \(int or float\), got np.False_ \(bool\)"),
        (None, r"`x` must be a real number \(int or float\), got None \(NoneType\)$"),
        ([0.5], r"`x` must be a real number \(int or float\), got \[0.5\] \(list\)$"),
        (1j, r"`x` must be a real number \(int or float\), got 1j \(complex\)$"),
        (torch.tensor(0.5), r"got tensor\(0.5000\) \(Tensor\); pass a Python number, e.g. `tensor.item\(\)`"),
        (np.array(0.5), r"got array\(0.5\) \(ndarray\); pass a Python number, e.g. `tensor.item\(\)`"),
    ],
    ids=["str", "bool", "np.bool_", "None", "list", "complex", "tensor", "0-d-array"],
)
def test_check_real_refuses_what_is_not_a_real_number(value: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        check_real("x", value)


def test_check_real_bounds_and_finiteness() -> None:
    assert check_real("s", 0.0, low=0.0, high=1.0, high_open=True) == 0.0
    assert check_real("s", 1.0, low=0.0, high=1.0) == 1.0  # closed unless `high_open`
    with pytest.raises(ValueError, match=r"^`s` must be a finite number in \[0, 1\), got 1.0$"):
        check_real("s", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"^`s` must be a finite number in \[0, 1\], got -0.1$"):
        check_real("s", -0.1, low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"^`d` must be a finite number in \[0, inf\], got nan$"):
        check_real("d", math.nan, low=0.0)
    for value in (math.inf, -math.inf, math.nan, np.float32("nan")):
        with pytest.raises(ValueError, match=r"^`x` must be a finite number, got"):
            check_real("x", value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_check_bool_gives_a_python_bool(value: Any) -> None:
    checked = check_bool("rescale", value)
    assert type(checked) is bool and checked == bool(value)


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, 1.0])
def test_check_bool_refuses_anything_else_rather_than_take_its_truth(value: Any) -> None:
    expected = rf"^`rescale` must be True or False, got {value!r} \({type(value).__name__}\)$"
    with pytest.raises(TypeError, match=expected):
        check_bool("rescale", value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, 0), (100, 100), (np.int64(7), 7), (0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (np.float32(0.25), 0.25)],
    ids=["step-0", "step", "np.int64", "fraction-0", "fraction", "fraction-1", "np.float32"],
)
def test_check_step_or_fraction_keeps_ints_as_steps_and_floats_as_fractions(value: Any, expected: float) -> None:
    checked = check_step_or_fraction("end", value)
    assert type(checked) is type(expected) and checked == expected


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, r"^`end` as an optimizer step \(int\) must be >= 0, got -1$"),
        (np.int64(-3), ValueError, r"^`end` as an optimizer step \(int\) must be >= 0, got -3$"),
        (1.5, ValueError, r"^`end` as a fraction of training \(float\) must lie in \[0, 1\], got 1.5; give a step as"),
        (-0.1, ValueError, r"^`end` as a fraction of training \(float\) must lie in \[0, 1\], got -0.1"),
        (math.nan, ValueError, r"^`end` as a fraction of training \(float\) must lie in \[0, 1\], got nan"),
        (True, TypeError, r"^`end` must be an optimizer step \(int\) or a fraction of training \(float\), got True"),
        ("0.5", TypeError, r"^`end` must be an optimizer step \(int\) or a fraction of training \(float\), got '0.5'"),
        (torch.tensor(3), TypeError, r"^`end` must be an optimizer step \(int\) or a fraction of training \(float\)"),
        (None, TypeError, r"^`end` must be an optimizer step \(int\) or a fraction of training \(float\), got None"),
    ],
    ids=["negative", "negative-np.int64", "over-one", "negative-fraction", "nan", "bool", "str", "tensor", "None"],
)
def test_check_step_or_fraction_refuses_naming_the_argument(value: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_step_or_fraction("end", value)
