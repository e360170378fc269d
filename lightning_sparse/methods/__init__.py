"""Sparsity methods, one module each, and the registry of their names for `SparsityCallback("name", ...)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_sparse.methods.base import SparseParametrization, SparsityMethod
from lightning_sparse.methods.st3 import ST3
from lightning_sparse.methods.str_method import STR

__all__ = ["METHODS", "PARAMETRIZATIONS", "ST3", "STR", "SparseParametrization", "SparsityMethod", "make_method"]

METHODS: dict[str, tuple[type[SparsityMethod], dict[str, Any]]] = {
    "st3": (ST3, {}),
    "st3sigma": (ST3, {"sigma": True}),
    "str": (STR, {}),
}
"""Each name: the method class and the settings the name fixes."""

PARAMETRIZATIONS: tuple[type[SparseParametrization], ...] = tuple(
    dict.fromkeys(cls.parametrization_class for cls, _ in METHODS.values())
)
"""Every method's parametrization class, for recognising them in models and state dicts."""


def make_method(name: str, **settings: Any) -> SparsityMethod:
    """The method registered as `name`, with `settings`; a setting given as None takes its default.

    Example:
        >>> make_method("st3sigma", target_sparsity=0.9, s_init=None)
        ST3(target_sparsity=0.9, start=0.05, end=0.5, schedule='cubic', freeze_at=None, rescale=True, sigma=True, \
min_density=0.0)
        >>> make_method("str", freeze_at=0.9)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `freeze_at` does not apply to method='str' (its settings: s_init, ...
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))} or a method object, got {name!r}")
    cls, fixed = METHODS[name]
    own = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed]  # type: ignore[arg-type]
    given = {key: value for key, value in settings.items() if value is not None}
    foreign = [key for key in given if key not in own]
    if foreign:
        raise ValueError(
            f"{', '.join(f'`{key}`' for key in foreign)} {'does' if len(foreign) == 1 else 'do'} not apply to "
            f"method={name!r} (its settings: {', '.join(own)}); remove it, or pick the method it belongs to"
        )
    return cls(**fixed, **given)
