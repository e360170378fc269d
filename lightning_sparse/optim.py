"""Adding parameters to an optimizer someone else built, without touching its groups or schedulers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["add_beside", "decay_instead"]


def add_beside(optimizer: torch.optim.Optimizer, param: nn.Parameter, anchor: Tensor) -> dict[str, Any] | None:
    """Append `param` to the param group of `optimizer` that holds `anchor`; return that group.

    `param` then gets all of that group's hyperparameters and follows every LR scheduler exactly as
    the group does: no group is added, so schedulers that keep one entry per group stay valid.
    Returns None if no group holds `anchor`. A `param` the optimizer already holds stays where it is.

    Example:
        >>> weight, threshold = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(()))
        >>> optimizer = torch.optim.SGD([weight], lr=0.1)
        >>> add_beside(optimizer, threshold, weight)["lr"], len(optimizer.param_groups[0]["params"])
        (0.1, 2)
    """
    holder = None
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        if id(param) in ids:
            return group
        if id(anchor) in ids:
            holder = group
    if holder is not None:
        holder["params"].append(param)
    return holder


@torch.no_grad()
def decay_instead(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor], weight_decay: float
) -> None:
    """Make the next `optimizer.step()` decay `params` (members of `group`) by `weight_decay`, not the group's.

    Call right before the step, once per step. Coupled decay (SGD, Adam, RMSprop, ...: the step adds
    `decay * p` to the gradient) gets the difference added to the gradient; decoupled decay (AdamW:
    the step multiplies `p` by `1 - lr * decay`) gets `p` pre-scaled so the product is
    `1 - lr * weight_decay`.

    Example:
        >>> p = nn.Parameter(torch.ones(()))
        >>> optimizer = torch.optim.SGD([p], lr=0.1, weight_decay=0.0)
        >>> p.grad = torch.zeros(())
        >>> decay_instead(optimizer, optimizer.param_groups[0], [p], weight_decay=0.5)
        >>> optimizer.step(); round(p.item(), 6)
        0.95
    """
    own = float(group.get("weight_decay", 0.0))
    if weight_decay == own:
        return
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    if decoupled:
        lr = float(group["lr"])
        factor = (1.0 - lr * weight_decay) / (1.0 - lr * own)
        for p in params:
            p.mul_(factor)
    else:
        for p in params:
            if p.grad is not None:
                p.grad.add_(p, alpha=weight_decay - own)
