"""`lightning_sparse.optim.split_param_group`: own hyperparameters for some parameters of a built optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sparse.optim import split_param_group


def _params(n: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(2)) for _ in range(n)]


def _ids(group: dict) -> list[int]:
    return [id(p) for p in group["params"]]


def test_moved_parameters_keep_every_hyperparameter_but_the_overridden_ones() -> None:
    a, b, c = _params(3)
    optimizer = torch.optim.AdamW([a, b, c], lr=0.01, betas=(0.8, 0.9), weight_decay=0.1, amsgrad=True)
    split_param_group(optimizer, [b], weight_decay=0.0)
    source, moved = optimizer.param_groups
    assert _ids(source) == [id(a), id(c)] and _ids(moved) == [id(b)]
    assert {k: v for k, v in moved.items() if k != "params"} == {
        **{k: v for k, v in source.items() if k != "params"},
        "weight_decay": 0.0,
    }
    assert source["weight_decay"] == 0.1  # the source group keeps its own


def test_each_source_group_gets_its_own_new_group() -> None:
    a, b, c, d = _params(4)
    optimizer = torch.optim.SGD([{"params": [a, b], "lr": 0.1}, {"params": [c, d], "lr": 0.5}], momentum=0.9)
    split_param_group(optimizer, [b, d], weight_decay=1e-2)
    assert [_ids(g) for g in optimizer.param_groups] == [[id(a)], [id(c)], [id(b)], [id(d)]]
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.5, 0.1, 0.5]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0, 0, 1e-2, 1e-2]


def test_parameters_not_in_the_optimizer_change_nothing() -> None:
    a, b = _params(2)
    optimizer = torch.optim.SGD([a], lr=0.1)
    split_param_group(optimizer, [b], weight_decay=1.0)
    split_param_group(optimizer, [], weight_decay=1.0)
    assert len(optimizer.param_groups) == 1 and _ids(optimizer.param_groups[0]) == [id(a)]


def test_optimizer_state_of_moved_parameters_survives() -> None:
    a, b = _params(2)
    optimizer = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    (a.sum() + 2 * b.sum()).backward()
    optimizer.step()
    momentum = optimizer.state[b]["momentum_buffer"].clone()
    split_param_group(optimizer, [b], weight_decay=0.5)
    assert torch.equal(optimizer.state[b]["momentum_buffer"], momentum)
    optimizer.step()  # and the optimizer still steps both groups
    assert not torch.equal(optimizer.state[b]["momentum_buffer"], momentum)


def _learning_rates(make_scheduler, groups: int, split: bool) -> list[list[float]]:
    """The param groups' learning rates over 3 steps of an SGD with `groups` groups of two parameters each.

    With `split`, the second parameter of every group is moved to a group of its own.
    """
    params = [_params(2) for _ in range(groups)]
    optimizer = torch.optim.SGD([{"params": ps, "lr": 1.0 / (i + 1)} for i, ps in enumerate(params)], momentum=0.9)
    scheduler = make_scheduler(optimizer)
    if split:
        split_param_group(optimizer, [ps[1] for ps in params], [scheduler], weight_decay=0.1)
    lrs = []
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return lrs


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4),
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10),
    ],
    ids=["StepLR", "LambdaLR", "CosineAnnealingLR", "OneCycleLR"],
)
def test_learning_rate_schedules_keep_applying_to_moved_parameters(make_scheduler) -> None:
    # The moved group follows its source group's learning rate, step by step.
    expected = [[lr, lr] for (lr,) in _learning_rates(make_scheduler, groups=1, split=False)]
    assert _learning_rates(make_scheduler, groups=1, split=True) == expected


@pytest.mark.xfail(
    strict=True,
    reason="library bug: split_param_group appends to a scheduler's per-group lists only while their length "
    "equals the original number of groups, so after parameters move out of the first source group, those of "
    "the second get no `base_lrs`/`lr_lambdas` entry: a LambdaLR then fails at its next step",
)
def test_learning_rate_schedules_keep_applying_to_parameters_moved_from_several_groups() -> None:
    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 0.5**e, lambda e: 0.1**e])

    expected = [[first, second, first, second] for first, second in _learning_rates(make_scheduler, 2, split=False)]
    assert _learning_rates(make_scheduler, groups=2, split=True) == expected


def test_only_the_given_schedulers_are_told() -> None:
    a, b = _params(2)
    optimizer = torch.optim.SGD([a, b], lr=1.0)
    given, other = (torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5) for _ in range(2))
    split_param_group(optimizer, [b], [given], weight_decay=0.1)
    assert len(given.base_lrs) == 2 and len(other.base_lrs) == 1


@pytest.mark.xfail(
    strict=True,
    reason="library bug: split_param_group extends every list of the length of the param groups it finds on "
    "a scheduler, so a SequentialLR's `_milestones` (or `_schedulers`) gets an entry, while the schedulers "
    "inside it are not told about the new group: stepping then fails (STR with `threshold_decay` and a "
    "warmup + cosine SequentialLR crashes in fit)",
)
def test_a_sequential_schedule_keeps_applying_to_moved_parameters() -> None:
    def run(split: bool) -> list[list[float]]:
        a, b = _params(2)
        optimizer = torch.optim.SGD([a, b], lr=1.0)
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=2)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[2])
        if split:
            split_param_group(optimizer, [b], [scheduler], weight_decay=0.1)
        lrs = []
        for _ in range(4):
            optimizer.step()
            scheduler.step()
            lrs.append([g["lr"] for g in optimizer.param_groups])
        return lrs

    assert run(split=True) == [[lr, lr] for (lr,) in run(split=False)]


@pytest.mark.xfail(
    strict=True,
    reason="library bug: split_param_group copies a group's `param_names` (an optimizer built from "
    "`named_parameters()`) whole into the new group, so neither group's names match its parameters",
)
def test_parameter_names_follow_their_parameters() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1)
    split_param_group(optimizer, [model.bias], weight_decay=0.1)
    assert [g["param_names"] for g in optimizer.param_groups] == [["weight"], ["bias"]]
