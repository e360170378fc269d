"""Adding parameters to an optimizer someone else built, without touching its groups or schedulers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["StepHooks", "add_beside", "decay_at_each_step", "decay_instead", "weight_decay_style"]

DecayStyle = Literal["coupled", "decoupled"]

# How torch's optimizers apply `weight_decay` when their groups don't say (`decoupled_weight_decay`, as
# Adam, AdamW, NAdam and RAdam do). Coupled: the step adds `decay * p` to the gradient (L2). Decoupled:
# the step multiplies `p` by `1 - lr * decay` before its update.
_COUPLED: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.Adamax,
    torch.optim.ASGD,
    torch.optim.RMSprop,
)
_DECOUPLED: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adafactor, torch.optim.Muon)


def add_beside(
    optimizer: torch.optim.Optimizer,
    param: nn.Parameter,
    anchor: Tensor,
    name: Callable[[str], str] = lambda anchor_name: f"{anchor_name}.beside",
) -> dict[str, Any] | None:
    """Append `param` to the param group of `optimizer` that holds `anchor`; return that group.

    `param` then gets all of that group's hyperparameters and follows every LR scheduler exactly as
    the group does: no group is added, so schedulers that keep one entry per group stay valid.
    Returns None if no group holds `anchor`. A `param` the optimizer already holds stays where it is.
    In a group that names its parameters (an optimizer built from `named_parameters()`), `param` is
    named `name(<anchor's name>)`.

    Example:
        >>> weight, threshold = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(()))
        >>> optimizer = torch.optim.SGD([weight], lr=0.1)
        >>> add_beside(optimizer, threshold, weight)["lr"], len(optimizer.param_groups[0]["params"])
        (0.1, 2)
    """
    holder = None
    for group in optimizer.param_groups:
        ids = [id(p) for p in group["params"]]
        if id(param) in ids:
            return group
        if id(anchor) in ids and holder is None:
            holder, anchor_index = group, ids.index(id(anchor))
    if holder is not None:
        if "param_names" in holder:
            holder["param_names"].append(name(holder["param_names"][anchor_index]))
        holder["params"].append(param)
    return holder


def weight_decay_style(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> DecayStyle | None:
    """How `optimizer` applies the weight decay of `group`, or None if it has none or applies it in an unknown way.

    A group's `decoupled_weight_decay` entry decides (Adam, AdamW, NAdam, RAdam have one; a group of any
    other optimizer may be given one to say how that optimizer decays); otherwise torch's optimizers are
    known: SGD, Adagrad, Adadelta, Adamax, ASGD, RMSprop couple it, Adafactor and Muon decouple it.

    Example:
        >>> p = nn.Parameter(torch.ones(()))
        >>> [weight_decay_style(o, o.param_groups[0]) for o in (torch.optim.Adam([p]), torch.optim.AdamW([p]))]
        ['coupled', 'decoupled']
        >>> print(weight_decay_style(torch.optim.Rprop([p]), torch.optim.Rprop([p]).param_groups[0]))
        None
    """
    if "weight_decay" not in group:
        return None
    if "decoupled_weight_decay" in group:
        return "decoupled" if group["decoupled_weight_decay"] else "coupled"
    if isinstance(optimizer, _DECOUPLED):
        return "decoupled"
    if isinstance(optimizer, _COUPLED):
        return "coupled"
    return None


@torch.no_grad()
def decay_instead(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], params: Sequence[Tensor], weight_decay: float
) -> None:
    """Make the next `optimizer.step()` decay `params` (members of `group`) by `weight_decay`, not the group's.

    Call once per step, after the gradients are final (clipped) and right before the step. Coupled
    decay (SGD, Adam, RMSprop, ...: the step adds `decay * p` to the gradient, after negating it under
    `maximize`) gets the difference added to the gradient; decoupled decay (AdamW, Adafactor, Adam with
    `decoupled_weight_decay=True`: the step multiplies `p` by `1 - lr * decay`) gets `p` pre-scaled so
    that the product is `1 - lr * weight_decay`. Parameters without a gradient are left alone, as the
    step leaves them. The trajectory is then that of `params` in a group with `weight_decay`, up to
    rounding; Adafactor's step size, which grows with `p`'s RMS, sees the pre-scaled `p` (a relative
    difference of `lr * (weight_decay - group decay)` per step).

    Raises ValueError if the optimizer's weight decay is unknown (see `weight_decay_style`) and would
    have to change.

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
    style = weight_decay_style(optimizer, group)
    if style is None:
        raise ValueError(f"cannot change the weight decay of {type(optimizer).__name__}: its kind is unknown")
    params = [p for p in params if p.grad is not None]
    if style == "decoupled":
        lr = float(group["lr"])
        kept = 1.0 - lr * own
        if kept == 0.0:  # the step zeroes `p` whatever it was: nothing to make up for
            return
        for p in params:
            p.mul_((1.0 - lr * weight_decay) / kept)
    else:
        difference = weight_decay - own
        for p in params:
            assert p.grad is not None
            p.grad.add_(p, alpha=-difference if group.get("maximize", False) else difference)


class StepHooks:
    """The step hooks `decay_at_each_step` registered; `remove()` removes them, like a `RemovableHandle`."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def decay_at_each_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], weight_decay: float) -> StepHooks:
    """From now on, decay `params` by `weight_decay` at each step of `optimizer`, in place of their groups' decay.

    `decay_instead` runs inside `optimizer.step()` (a step hook), right before the update: after the
    step's closure if it gets one (Lightning's, which runs the backward pass and gradient clipping), so
    the decay, like the optimizer's own, is neither clipped nor counted in the clipped norm; and not at
    all for a step a `GradScaler` skips. Returns a handle whose `remove()` ends it.

    Example:
        >>> p = nn.Parameter(torch.ones(()))
        >>> optimizer = torch.optim.SGD([p], lr=0.1, weight_decay=0.0)
        >>> handle = decay_at_each_step(optimizer, [p], weight_decay=0.5)
        >>> def closure():
        ...     p.grad = torch.zeros(())
        >>> optimizer.step(closure); round(p.item(), 6)
        0.95
        >>> handle.remove()
    """
    ids = {id(p) for p in params}
    # A step inside the step (a subclass's `step` calling its base's, both hooked by torch) decays once.
    # (A step that raises leaves this set, and the decay off, should training go on after it.)
    stepping = False

    def decay(opt: torch.optim.Optimizer) -> None:
        for group in opt.param_groups:
            held = [p for p in group["params"] if id(p) in ids]
            if held:
                decay_instead(opt, group, held, weight_decay)

    def before(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        nonlocal stepping
        if stepping:
            return None
        stepping = True
        positional = len(args) > 1  # `args` starts with the optimizer itself
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None:
            decay(opt)
            return None

        def closure_then_decay() -> Any:
            loss = closure()
            decay(opt)
            return loss

        if positional:
            return (args[0], closure_then_decay, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_decay}

    def after(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        nonlocal stepping
        stepping = False

    return StepHooks(optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after))
