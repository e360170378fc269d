"""`lightning_sparse.methods`: the registry of method names, and that nothing outside it knows which methods exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lightning_sparse import ST3, STR
from lightning_sparse.methods import METHODS, PARAMETRIZATIONS, make_method
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold
from lightning_sparse.methods.str_method import LearnedSoftThreshold

PACKAGE = Path(__file__).parents[1] / "lightning_sparse"
METHOD_NAMES = {"st3", "st3sigma", "str"}
METHOD_CLASSES = {"ST3", "STR", "LearnedSoftThreshold", "StraightThroughSoftThreshold"}
QUOTED_NAME = re.compile(r"""['"](st3|st3sigma|str)['"]""")


def test_every_name_makes_the_method_that_carries_it() -> None:
    assert set(METHODS) == METHOD_NAMES
    for name in METHODS:
        settings = {"target_sparsity": 0.9} if name.startswith("st3") else {}
        assert make_method(name, **settings).name == name  # what a checkpoint records maps back to the method


def test_make_method_builds_the_method_object_and_none_means_its_default() -> None:
    assert make_method("st3", target_sparsity=0.9, freeze_at=None, start=None) == ST3(target_sparsity=0.9)
    assert make_method("st3sigma", target_sparsity=0.9, end=0.6) == ST3(0.9, end=0.6, sigma=True)
    assert make_method("str", s_init=-5.0, threshold_decay=None) == STR(s_init=-5.0)
    assert make_method("str") == STR()


ONE_OF = r"`method` must be one of 'st3', 'st3sigma', 'str' or a method object,"


@pytest.mark.parametrize(
    ("name", "settings", "match"),
    [
        ("rigl", {}, rf"^{ONE_OF} got 'rigl'$"),
        ("ST3", {}, rf"^{ONE_OF} got 'ST3'$"),
        (None, {}, rf"^{ONE_OF} got None$"),
        ("str", {"freeze_at": 0.9}, r"^`freeze_at` does not apply to method='str' \(its settings: s_init, "
         r"threshold_decay, target_sparsity, start, end, schedule\); remove it, or pick the method it belongs to$"),
        ("st3", {"target_sparsity": 0.9, "s_init": -5.0, "threshold_decay": 0.1},
         r"^`s_init`, `threshold_decay` do not apply to method='st3' \(its settings: target_sparsity, start, end, "
         r"schedule, freeze_at, rescale, sigma, min_density\)"),
        ("st3sigma", {"target_sparsity": 0.9, "sigma": False}, r"^`sigma` does not apply to method='st3sigma' \(its "
         r"settings: target_sparsity, start, end, schedule, freeze_at, rescale, min_density\)"),  # the name fixes it
    ],
    ids=["unknown", "class-name", "None", "foreign", "two-foreign", "fixed-by-the-name"],
)  # fmt: skip
def test_make_method_refuses_naming_the_argument_and_the_choices(name: str, settings: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_method(name, **settings)


def test_parametrizations_are_every_methods_own() -> None:
    assert set(PARAMETRIZATIONS) == {StraightThroughSoftThreshold, LearnedSoftThreshold}
    assert len(PARAMETRIZATIONS) == len(set(PARAMETRIZATIONS))
    assert {cls.parametrization_class for cls, _ in METHODS.values()} == set(PARAMETRIZATIONS)


# ------------------------------------------------------ nothing outside lightning_sparse/methods/ names a method


def method_mentions(source: str) -> list[str]:
    """Where code (not documentation) names a registered method or its classes, as ``line: what``.

    Documentation is any string that is a statement of its own: docstrings of modules, classes and
    functions, and attribute docstrings; comments are not in the syntax tree at all. In code, these
    count: a string holding a method's name (``"st3"``, or quoted inside a longer string), any use of
    a method's or its parametrization's class, and an import from a method's own module.
    """
    tree = ast.parse(source)
    documentation = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    }
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation:
            if node.value in METHOD_NAMES or QUOTED_NAME.search(node.value):
                found.append((node.lineno, f"string {node.value!r}"))
        elif isinstance(node, ast.Name) and node.id in METHOD_CLASSES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in METHOD_CLASSES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").rsplit(".", 1)[-1] in ("st3", "str_method"):
                found.append((node.lineno, f"import from {node.module}"))
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in METHOD_CLASSES]
    return [f"{line}: {what}" for line, what in sorted(found, key=lambda item: item[0])]


def test_method_mentions_finds_code_and_skips_documentation() -> None:
    source = '''
"""Module docstring: SparsityCallback("st3", 0.9)."""
from lightning_sparse.methods.st3 import update_thresholds
from lightning_sparse import methods, ST3

ALIASES = {"sigma": "st3sigma"}


class A:
    """SparsityCallback("str")."""

    limit: int = 3
    """Attribute docstring: method="str"."""

    def f(self, p, name):
        # a comment: isinstance(p, STR), "st3"
        if isinstance(p, (methods.StraightThroughSoftThreshold, LearnedSoftThreshold)):
            return f"method='st3', got {name!r}"
        return name == "str" or isinstance(p, str)
'''
    found = method_mentions(source)
    assert found[:3] == ["3: import from lightning_sparse.methods.st3", "4: import ST3", "6: string 'st3sigma'"]
    assert sorted(found[3:5]) == ["17: .StraightThroughSoftThreshold", "17: LearnedSoftThreshold"]
    assert found[5:] == ["18: string \"method='st3', got \"", "19: string 'str'"]


@pytest.mark.parametrize(
    "path", sorted(p for p in PACKAGE.glob("*.py")), ids=lambda p: p.name
)  # fmt: skip
def test_no_module_outside_methods_names_a_method(path: Path) -> None:
    # `SparsityCallback("st3", ...)` in a docstring's example is documentation; the package's `__init__`
    # re-exports the method classes for users (`from lightning_sparse import ST3`), which names no method in code.
    mentions = method_mentions(path.read_text())
    if path.name == "__init__.py":
        mentions = [m for m in mentions if not re.fullmatch(r"\d+: import (ST3|STR)", m)]
    assert mentions == [], f"{path.name} knows which methods exist; move that into lightning_sparse/methods/"
