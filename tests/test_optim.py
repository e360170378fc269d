"""`lightning_sparse.optim`: `add_beside` (a parameter joins the group of another) and `decay_instead`
(another weight decay for some parameters of a group), against the trajectories torch's own optimizers give."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_sparse.optim import add_beside, decay_at_each_step, decay_instead, weight_decay_style


def _params(n: int, shape: tuple[int, ...] = (2,)) -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(shape)) for _ in range(n)]


def _ids(group: dict[str, Any]) -> list[int]:
    return [id(p) for p in group["params"]]


# ------------------------------------------------------------------------------------------------ add_beside


def test_add_beside_joins_the_group_of_its_anchor_with_all_its_hyperparameters() -> None:
    a, b, c, added = _params(4)
    optimizer = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b, c], "lr": 0.5}], momentum=0.9)
    before = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    group = add_beside(optimizer, added, c)
    assert group is optimizer.param_groups[1]
    assert [_ids(g) for g in optimizer.param_groups] == [[id(a)], [id(b), id(c), id(added)]]
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == before


def test_add_beside_leaves_a_parameter_the_optimizer_already_holds_where_it_is() -> None:
    a, b = _params(2)
    optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
    assert add_beside(optimizer, b, a) is optimizer.param_groups[1]  # held, in another group than the anchor's
    assert add_beside(optimizer, a, a) is optimizer.param_groups[0]
    assert [_ids(g) for g in optimizer.param_groups] == [[id(a)], [id(b)]]


def test_add_beside_without_a_group_holding_the_anchor_changes_nothing() -> None:
    a, b, c = _params(3)
    optimizer = torch.optim.SGD([a], lr=0.1)
    assert add_beside(optimizer, b, c) is None
    assert [_ids(g) for g in optimizer.param_groups] == [[id(a)]]


def test_add_beside_keeps_the_optimizer_state_and_the_number_of_groups() -> None:
    a, b = _params(2)
    optimizer = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    a.sum().backward()
    optimizer.step()
    momentum = optimizer.state[a]["momentum_buffer"]
    saved = momentum.clone()
    add_beside(optimizer, b, a)
    assert len(optimizer.param_groups) == 1 and len(scheduler.base_lrs) == 1
    assert optimizer.state[a]["momentum_buffer"] is momentum and torch.equal(momentum, saved)
    assert b not in optimizer.state
    b.grad = torch.ones(2)
    optimizer.step()  # the added parameter trains, with the group's hyperparameters
    scheduler.step()
    assert torch.equal(b.detach(), torch.full((2,), 0.9)) and "momentum_buffer" in optimizer.state[b]


def test_add_beside_names_the_parameter_in_a_group_of_named_parameters() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.named_parameters(), lr=0.1)
    add_beside(optimizer, nn.Parameter(torch.zeros(())), model.weight)
    add_beside(optimizer, nn.Parameter(torch.zeros(())), model.bias, name=lambda anchor: f"{anchor}.s")
    (group,) = optimizer.param_groups
    assert group["param_names"] == ["weight", "bias", "weight.beside", "bias.s"]
    assert len(group["param_names"]) == len(group["params"])


# ------------------------------------------------------------------------------------------------ decay style


@pytest.mark.parametrize(
    ("make", "style"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), "coupled"),
        (lambda p: torch.optim.Adam(p), "coupled"),
        (lambda p: torch.optim.Adam(p, decoupled_weight_decay=True), "decoupled"),
        (lambda p: torch.optim.AdamW(p), "decoupled"),
        (lambda p: torch.optim.NAdam(p), "coupled"),
        (lambda p: torch.optim.NAdam(p, decoupled_weight_decay=True), "decoupled"),
        (lambda p: torch.optim.RAdam(p), "coupled"),
        (lambda p: torch.optim.RAdam(p, decoupled_weight_decay=True), "decoupled"),
        (lambda p: torch.optim.RMSprop(p), "coupled"),
        (lambda p: torch.optim.Adagrad(p), "coupled"),
        (lambda p: torch.optim.Adadelta(p), "coupled"),
        (lambda p: torch.optim.Adamax(p), "coupled"),
        (lambda p: torch.optim.ASGD(p), "coupled"),
        (lambda p: torch.optim.Adafactor(p), "decoupled"),
        (lambda p: torch.optim.Muon(p), "decoupled"),
        (lambda p: torch.optim.Rprop(p), None),
        (lambda p: torch.optim.SparseAdam(p), None),
        (lambda p: torch.optim.LBFGS(p), None),
    ],
    ids=lambda x: x if isinstance(x, str) or x is None else "",
)
def test_weight_decay_style_of_every_torch_optimizer(make: Callable[[Any], torch.optim.Optimizer], style: Any) -> None:
    optimizer = make([nn.Parameter(torch.ones(2, 2))])
    assert weight_decay_style(optimizer, optimizer.param_groups[0]) == style


class _Unknown(torch.optim.Optimizer):
    """A third-party optimizer with a `weight_decay` of its own kind: decoupled, as here."""

    def __init__(self, params: Any, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])


def test_an_optimizer_of_unknown_decay_is_refused_unless_its_groups_say() -> None:
    (p,) = _params(1)
    p.grad = torch.zeros(2)
    optimizer = _Unknown([p], weight_decay=0.1)
    (group,) = optimizer.param_groups
    assert weight_decay_style(optimizer, group) is None
    with pytest.raises(ValueError, match=r"^cannot change the weight decay of _Unknown: its kind is unknown$"):
        decay_instead(optimizer, group, [p], 0.5)
    decay_instead(optimizer, group, [p], 0.1)  # nothing to change: fine
    group["decoupled_weight_decay"] = True  # the user says how it decays
    decay_instead(optimizer, group, [p], 0.5)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.full((2,), 0.95), rtol=0, atol=1e-7)


# -------------------------------------------------------------------------------------------- decay_instead

LR = 0.05
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SGD": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9),
    "SGD-nesterov-maximize": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9, nesterov=True, maximize=True),
    "SGD-foreach": lambda groups: torch.optim.SGD(groups, lr=LR, momentum=0.9, dampening=0.1, foreach=True),
    "Adam": lambda groups: torch.optim.Adam(groups, lr=LR),
    "Adam-amsgrad-maximize": lambda groups: torch.optim.Adam(groups, lr=LR, amsgrad=True, maximize=True),
    "Adam-foreach": lambda groups: torch.optim.Adam(groups, lr=LR, foreach=True),
    "Adam-decoupled": lambda groups: torch.optim.Adam(groups, lr=LR, decoupled_weight_decay=True),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=LR),
    "AdamW-maximize-foreach": lambda groups: torch.optim.AdamW(groups, lr=LR, maximize=True, foreach=True),
    "NAdam": lambda groups: torch.optim.NAdam(groups, lr=LR),
    "NAdam-decoupled": lambda groups: torch.optim.NAdam(groups, lr=LR, decoupled_weight_decay=True),
    "RAdam": lambda groups: torch.optim.RAdam(groups, lr=LR),
    "RAdam-decoupled": lambda groups: torch.optim.RAdam(groups, lr=LR, decoupled_weight_decay=True),
    "RMSprop": lambda groups: torch.optim.RMSprop(groups, lr=LR, momentum=0.5, centered=True),
    "Adagrad": lambda groups: torch.optim.Adagrad(groups, lr=LR),
    "Adadelta": lambda groups: torch.optim.Adadelta(groups, lr=LR * 10),
    "Adamax": lambda groups: torch.optim.Adamax(groups, lr=LR),
    "ASGD": lambda groups: torch.optim.ASGD(groups, lr=LR),
}
STEPS = 20


def _trajectory(
    make: Callable[..., torch.optim.Optimizer], group_decay: float, decay: float, instead: bool
) -> list[Tensor]:
    """`w` and `s` after each of STEPS steps, both float64 and under a loss coupling them.

    With `instead`, both are in one group of weight decay `group_decay` and `decay_instead` gives `s`
    `decay` before each step; without, `s` is in a second group of weight decay `decay`.
    """
    generator = torch.Generator().manual_seed(0)
    w = nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64))
    s = nn.Parameter(torch.randn(3, 2, generator=generator, dtype=torch.float64))
    x = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    if instead:
        optimizer = make([{"params": [w, s], "weight_decay": group_decay}])
    else:
        optimizer = make([{"params": [w], "weight_decay": group_decay}, {"params": [s], "weight_decay": decay}])
    sign = -1.0 if optimizer.defaults.get("maximize") else 1.0  # the same descent under `maximize`
    trajectory = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        (sign * (torch.tanh(x @ (w * s)).sum() + (w.sin() * s).pow(2).sum())).backward()
        if instead:
            decay_instead(optimizer, optimizer.param_groups[0], [s], decay)
        optimizer.step()
        trajectory.append(torch.stack([w.detach().clone(), s.detach().clone()]))
    return trajectory


@pytest.mark.parametrize(
    ("group_decay", "decay"), [(0.0, 0.5), (0.4, 0.05), (0.1, 0.0)], ids=["up-from-0", "down", "to-0"]
)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_instead_follows_a_group_of_that_weight_decay(name: str, group_decay: float, decay: float) -> None:
    make = OPTIMIZERS[name]
    expected = _trajectory(make, group_decay, decay, instead=False)
    actual = _trajectory(make, group_decay, decay, instead=True)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12, msg=f"step {step + 1}")
    # The decay matters: the group's own decay would end elsewhere.
    ignored = _trajectory(make, group_decay, group_decay, instead=False)
    assert (ignored[-1][1] - expected[-1][1]).abs().max() > 1e-4


def test_adafactor_is_matched_up_to_its_parameter_scaled_step_size() -> None:
    # Adafactor's step size grows with the RMS of the parameter, which `decay_instead` pre-scales by
    # (1 - lr * decay) / (1 - lr * group decay): the documented, first-order difference.
    def make(groups: Any) -> torch.optim.Optimizer:
        return torch.optim.Adafactor(groups, lr=LR)

    expected = _trajectory(make, 0.4, 0.05, instead=False)[-1]
    actual = _trajectory(make, 0.4, 0.05, instead=True)[-1]
    ignored = _trajectory(make, 0.4, 0.4, instead=False)[-1]
    assert (actual - expected).abs().max() < 0.1 * (ignored - expected).abs().max()


def test_muon_decay_is_decoupled_and_followed() -> None:
    # Muon trains 2-D parameters only; with a gradient that does not depend on them, the updates are
    # equal and only the decay differs.
    def run(instead: bool) -> Tensor:
        w, s = _params(2, shape=(3, 2))
        groups = (
            [{"params": [w, s], "weight_decay": 0.1}]
            if instead
            else [{"params": [w], "weight_decay": 0.1}, {"params": [s], "weight_decay": 0.5}]
        )
        optimizer = torch.optim.Muon(groups, lr=LR)
        for step in range(5):
            w.grad = s.grad = torch.arange(6.0).reshape(3, 2) - step
            if instead:
                decay_instead(optimizer, optimizer.param_groups[0], [s], 0.5)
            optimizer.step()
        return torch.stack([w.detach(), s.detach()])

    torch.testing.assert_close(run(instead=True), run(instead=False), rtol=0, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
def test_the_decay_kind_is_the_optimizers(decoupled: bool) -> None:
    # With a zero gradient, AdamW's step only decays: p * (1 - lr * decay). Adam's L2 decay becomes
    # the gradient, which Adam normalises: a step of about lr, whatever the decay.
    p = nn.Parameter(torch.full((), 2.0, dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=0.01, weight_decay=0.0, decoupled_weight_decay=decoupled)
    p.grad = torch.zeros((), dtype=torch.float64)
    decay_instead(optimizer, optimizer.param_groups[0], [p], 0.5)
    optimizer.step()
    assert p.item() == pytest.approx(2.0 * (1 - 0.01 * 0.5) if decoupled else 2.0 - 0.01, rel=1e-9)


def test_decay_instead_leaves_parameters_without_a_gradient_as_the_step_does() -> None:
    a, b = _params(2)
    optimizer = torch.optim.AdamW([a, b], lr=0.1, weight_decay=0.1)
    a.grad = torch.ones(2)
    decay_instead(optimizer, optimizer.param_groups[0], [a, b], 0.5)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b.grad is None


def test_decay_instead_with_the_groups_own_decay_changes_nothing() -> None:
    (p,) = _params(1)
    p.grad = torch.zeros(2)
    optimizer = torch.optim.SGD([p], lr=0.1, weight_decay=0.1)
    decay_instead(optimizer, optimizer.param_groups[0], [p], 0.1)
    assert torch.equal(p.grad, torch.zeros(2)) and torch.equal(p.detach(), torch.ones(2))


# ------------------------------------------------------------------------------------- decay_at_each_step


def _sgd(groups: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1)


def _sgd_pair(
    decay_at_step: bool, make: Callable[[Any], torch.optim.Optimizer] = _sgd
) -> tuple[nn.Parameter, nn.Parameter, torch.optim.Optimizer]:
    """`w` and `s` in one group of weight decay 0.1 where `decay_at_each_step` gives `s` 0.5, or (the
    reference) with `s` in a group of weight decay 0.5."""
    w, s = (nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64)) for _ in range(2))
    if decay_at_step:
        optimizer = make([{"params": [w, s], "weight_decay": 0.1}])
        decay_at_each_step(optimizer, [s], 0.5)
    else:
        optimizer = make([{"params": [w], "weight_decay": 0.1}, {"params": [s], "weight_decay": 0.5}])
    return w, s, optimizer


@pytest.mark.parametrize("how", ["no closure", "closure", "closure keyword"])
def test_decay_at_each_step_decays_after_the_closure_and_its_clipping(how: str) -> None:
    def run(decay_at_step: bool) -> Tensor:
        w, s, optimizer = _sgd_pair(decay_at_step)

        def closure() -> Tensor:  # Lightning's closure: backward, then gradient clipping
            optimizer.zero_grad()
            loss = (w * s * 10).sum()
            loss.backward()
            nn.utils.clip_grad_norm_([w, s], max_norm=0.01)
            return loss

        for _ in range(5):
            if how == "no closure":
                closure()
                optimizer.step()
            else:
                optimizer.step(closure) if how == "closure" else optimizer.step(closure=closure)
        return torch.stack([w.detach(), s.detach()])

    torch.testing.assert_close(run(decay_at_step=True), run(decay_at_step=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_decay_at_each_step_skips_the_steps_a_grad_scaler_skips(name: str) -> None:
    def run(decay_at_step: bool) -> Tensor:
        w, s, optimizer = _sgd_pair(decay_at_step, OPTIMIZERS[name])
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for step in range(4):
            optimizer.zero_grad()
            scale = torch.tensor(torch.inf if step == 1 else 1.0, dtype=torch.float64)
            scaler.scale((w * s * scale).sum()).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)  # skips step 1, whose gradients are not finite
            scaler.update()
        return torch.stack([w.detach(), s.detach()])

    torch.testing.assert_close(run(decay_at_step=True), run(decay_at_step=False), rtol=0, atol=1e-12)


class _NestedSGD(torch.optim.SGD):
    """An SGD whose `step` calls its base's: with both hooked, step hooks run twice per step."""

    def step(self, closure: Any = None) -> Any:
        return super().step(closure)


def test_decay_at_each_step_decays_once_in_a_step_inside_a_step() -> None:
    torch.optim.SGD([nn.Parameter(torch.ones(()))])  # hooks SGD.step too
    reference = _sgd_pair(decay_at_step=False)
    w, s, _ = _sgd_pair(decay_at_step=False)
    optimizer = _NestedSGD([w, s], lr=0.1, momentum=0.9, weight_decay=0.1)
    decay_at_each_step(optimizer, [s], 0.5)
    for w_, s_, optimizer_ in (reference, (w, s, optimizer)):
        for _ in range(3):
            optimizer_.zero_grad()
            (w_ * s_).sum().backward()
            optimizer_.step()
    torch.testing.assert_close(s.detach(), reference[1].detach(), rtol=0, atol=1e-12)


def test_decay_at_each_step_ends_with_its_handle() -> None:
    p = nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD([p], lr=0.1)
    decay_at_each_step(optimizer, [p], 0.5).remove()
    p.grad = torch.zeros(())
    optimizer.step()
    assert p.item() == 1.0
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
