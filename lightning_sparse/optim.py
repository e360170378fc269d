"""Giving parameters their own hyperparameters inside an optimizer someone else built."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["split_param_group"]


def split_param_group(
    optimizer: torch.optim.Optimizer,
    params: Iterable[nn.Parameter],
    schedulers: Sequence[Any] = (),
    **overrides: Any,
) -> None:
    """Move `params` out of their param groups into new groups that differ only by `overrides`.

    Each new group copies every hyperparameter of the group it came from (so the learning rate,
    momentum and betas stay the user's), and each scheduler of `optimizer` is told about it: any
    per-group list it keeps (`base_lrs`, `lr_lambdas`, `max_lrs`, ...) gets the source group's entry
    appended, so learning-rate schedules keep applying to the moved parameters.

    Example:
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([a, b], lr=0.1, weight_decay=1e-4)
        >>> split_param_group(opt, [b], weight_decay=1e-2)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.0001, 0.01]
    """
    moving = {id(p) for p in params}
    n_groups = len(optimizer.param_groups)
    for index in range(n_groups):
        group = optimizer.param_groups[index]
        moved = [p for p in group["params"] if id(p) in moving]
        if not moved:
            continue
        group["params"] = [p for p in group["params"] if id(p) not in moving]
        optimizer.add_param_group({**group, "params": moved, **overrides})
        for scheduler in schedulers:
            for value in vars(scheduler).values():
                if isinstance(value, list) and len(value) == n_groups:
                    value.append(value[index])
