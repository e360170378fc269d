"""STR's thresholds under every LR scheduler of torch, and what a schedule step is with several optimizers.

Real Trainers on TinyNet (8 optimizer steps an epoch): with `threshold_decay`, the user's param groups
follow exactly the learning rates (and momenta) they follow without the callback, the thresholds are
decayed as a param group of that weight decay would decay them, a resume mid-schedule ends where the
uninterrupted run ends, and an optimizer that cannot apply the decay is refused before anything changes.
Then a GAN-style module with two optimizers: one schedule step per batch, no false warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.optim import Optimizer, lr_scheduler
from torch.utils.data import DataLoader, TensorDataset

import lightning_sparse.optim
from lightning_sparse import ST3, STR, SparsityCallback
from lightning_sparse.layers import sparsity_parametrizations
from lightning_sparse.schedules import CubicSchedule
from models import Crash, TinyNet, make_trainer, model_tensors, zeros

EPOCHS, STEPS = 2, 16  # TinyNet: 8 optimizer steps an epoch
S_INIT, DECAY, GROUP_DECAY = -3.0, 0.05, 5e-4

MakeScheduler = Callable[[Optimizer], Any]
SCHEDULERS: dict[str, MakeScheduler] = {
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda step: 1 / (1 + step)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda step: 0.9),
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[3, 7, 12], gamma=0.5),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=5),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.85),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=12, power=2.0),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS, eta_min=1e-3),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=STEPS),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=1),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(  # linear warm-up, then cosine
        o,
        [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4), lr_scheduler.CosineAnnealingLR(o, T_max=12)],
        milestones=[4],
    ),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4), lr_scheduler.ExponentialLR(o, gamma=0.9)]
    ),
}


def test_every_scheduler_of_torch_is_covered() -> None:
    classes = {
        name
        for name in lr_scheduler.__all__
        if isinstance(getattr(lr_scheduler, name), type)
        and issubclass(getattr(lr_scheduler, name), lr_scheduler.LRScheduler)
    }
    assert classes - {"LRScheduler"} == set(SCHEDULERS)


class Scheduled(TinyNet):
    """TinyNet under `make_scheduler`, stepped after every optimizer step, in one or two param groups.

    With two groups (conv at lr 0.1, fc at 0.05) `configure_optimizers` leaves STR's thresholds out, so
    the callback puts each in its weight's group; with one, `self.parameters()` already holds them.
    """

    def __init__(self, make_scheduler: MakeScheduler, groups: int = 1, make_optimizer: Any = None) -> None:
        super().__init__()
        self.make_scheduler, self.groups, self.make_optimizer = make_scheduler, groups, make_optimizer

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.log("plateau", 1.0)  # a metric that never improves, for ReduceLROnPlateau
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        params: Any = self.parameters()
        if self.groups == 2:
            params = [
                {"params": [p for n, p in module.named_parameters() if not n.endswith(".s")], "lr": lr}
                for module, lr in ((self.conv, 0.1), (self.fc, 0.05))
            ]
        make = self.make_optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=GROUP_DECAY))
        optimizer = make(params)
        scheduler = self.make_scheduler(optimizer)
        config = {"scheduler": scheduler, "interval": "step", "monitor": "plateau"}
        return {"optimizer": optimizer, "lr_scheduler": config}


class Recorder(Callback):
    """Every param group's (lr, momentum) after each optimizer step, the lrs each step used, and the
    thresholds at start and end."""

    def __init__(self) -> None:
        self.hyperparameters: list[list[tuple[float, float]]] = []
        self.step_lrs: list[list[float]] = []
        self.thresholds: dict[str, list[float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.step_lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.thresholds["start"] = _thresholds(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        groups = trainer.optimizers[0].param_groups
        self.hyperparameters.append([(g["lr"], g.get("momentum", g.get("betas", (0.0,))[0])) for g in groups])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.thresholds["end"] = _thresholds(pl_module)


def _thresholds(model: nn.Module) -> list[float]:
    return [w.parametrization.s.item() for w in sparsity_parametrizations(model).values()]


def _fit(root: Path, model: pl.LightningModule, *callbacks: Callback, **trainer_args: Any) -> Recorder:
    recorder = Recorder()
    make_trainer(root, max_epochs=EPOCHS, callbacks=[*callbacks, recorder], **trainer_args).fit(model)
    return recorder


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_param_groups_follow_the_users_schedule_and_thresholds_their_decay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheduler: str, groups: int
) -> None:
    make = SCHEDULERS[scheduler]
    dense = _fit(tmp_path, Scheduled(make, groups))

    decays: list[tuple[float, float, int]] = []  # (decay, the group's lr, thresholds) of each call
    original = lightning_sparse.optim.decay_instead

    def spy(optimizer: Optimizer, group: dict[str, Any], params: Any, weight_decay: float) -> None:
        decays.append((weight_decay, group["lr"], len(params)))
        original(optimizer, group, params, weight_decay)

    monkeypatch.setattr(lightning_sparse.optim, "decay_instead", spy)
    sparse = _fit(tmp_path, Scheduled(make, groups), SparsityCallback(STR(s_init=S_INIT, threshold_decay=DECAY)))

    assert sparse.hyperparameters == dense.hyperparameters  # every group, every step, exactly
    assert len(dense.hyperparameters) == STEPS and len(dense.hyperparameters[0]) == groups
    assert len({lr for step in dense.hyperparameters for lr, _ in step}) > 1  # the schedule did something
    # Before each step, each group's thresholds (one per layer) got the decay, at the lr of that step.
    assert sparse.step_lrs == dense.step_lrs
    assert decays == [(DECAY, lr, 2 // groups) for step in dense.step_lrs for lr in step]
    assert sparse.thresholds["start"] == [S_INIT, S_INIT]
    assert all(end > S_INIT for end in sparse.thresholds["end"])  # decayed towards 0


# ------------------------------------------------------------------ the decay is that of a param group


class OwnGroup(Scheduled):
    """The reference: the thresholds in a param group of their own, of weight decay DECAY, set by the user."""

    def configure_optimizers(self) -> Any:
        named = dict(self.named_parameters())
        thresholds = [p for n, p in named.items() if n.endswith(".s")]
        others = [p for n, p in named.items() if not n.endswith(".s")]
        optimizer = self.make_optimizer([{"params": others}, {"params": thresholds, "weight_decay": DECAY}])
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"},
        }


OPTIMIZERS: dict[str, Callable[[Any], Optimizer]] = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=GROUP_DECAY),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=GROUP_DECAY),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, weight_decay=GROUP_DECAY),
}


@pytest.mark.parametrize("clip", [None, 0.05], ids=["", "clipped"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_threshold_decay_trains_as_a_param_group_of_that_weight_decay(
    tmp_path: Path, optimizer: str, clip: float | None
) -> None:
    # Clipped: the decay, like the optimizer's own, is applied after gradient clipping, not clipped.
    make = SCHEDULERS["SequentialLR"]

    def fit(model: Scheduled, method: STR) -> tuple[dict[str, Tensor], list[float]]:
        pl.seed_everything(0)
        model.load_state_dict(initial)
        recorder = _fit(tmp_path, model, SparsityCallback(method), gradient_clip_val=clip)
        return model_tensors(model), recorder.thresholds["end"]

    initial = TinyNet().state_dict()
    make_optimizer = OPTIMIZERS[optimizer]
    expected, expected_thresholds = fit(OwnGroup(make, make_optimizer=make_optimizer), STR(s_init=S_INIT))
    actual, thresholds = fit(Scheduled(make, make_optimizer=make_optimizer), STR(s_init=S_INIT, threshold_decay=DECAY))
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(thresholds, expected_thresholds, rtol=0, atol=1e-6)
    # The decay matters: with the group's own, the thresholds end lower (further from 0).
    _, undecayed = fit(Scheduled(make, make_optimizer=make_optimizer), STR(s_init=S_INIT))
    assert all(t > u + 1e-3 for t, u in zip(thresholds, undecayed, strict=True))


# ------------------------------------------------------------------------------------- resume, refusals


def test_a_resume_under_a_sequential_schedule_ends_where_the_uninterrupted_run_ends(tmp_path: Path) -> None:
    def warmup_cosine(o: Optimizer) -> Any:  # the milestone (step 12) falls after the resume (step 16)
        warmup = lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=12)
        return lr_scheduler.SequentialLR(o, [warmup, lr_scheduler.CosineAnnealingLR(o, T_max=20)], milestones=[12])

    def fit(root: Path, *callbacks: Callback, ckpt_path: Path | None = None) -> tuple[Scheduled, Recorder]:
        pl.seed_everything(0)
        model, recorder = Scheduled(warmup_cosine, groups=2), Recorder()
        saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
        sparsity = SparsityCallback(STR(s_init=S_INIT, threshold_decay=DECAY))
        trainer = make_trainer(
            root, max_epochs=4, enable_checkpointing=True, callbacks=[sparsity, saver, recorder, *callbacks]
        )
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, recorder

    reference, full = fit(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "crashed", Crash(2))
    resumed, tail = fit(tmp_path / "resumed", ckpt_path=tmp_path / "crashed" / "ckpt" / "epoch=1.ckpt")

    assert tail.hyperparameters == full.hyperparameters[16:]
    expected, actual = reference.state_dict(), resumed.state_dict()
    assert actual.keys() == expected.keys() == TinyNet().state_dict().keys()  # hardened at fit end
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5, msg=name)
    assert zeros(resumed.fc.weight) > 0


@pytest.mark.parametrize(
    ("make_optimizer", "match"),
    [
        (
            lambda ps: torch.optim.Rprop(ps, lr=0.01),
            r"^`threshold_decay` needs an optimizer with weight decay, and Rprop has none",
        ),
        (
            lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=0.01),
            r"^STR's thresholds are scalars and Muon trains only 2-D parameters",
        ),
    ],
    ids=["Rprop", "Muon"],
)
def test_an_optimizer_that_cannot_take_the_thresholds_is_refused_and_the_model_given_back(
    tmp_path: Path, make_optimizer: Callable[[Any], Optimizer], match: str
) -> None:
    model = Scheduled(SCHEDULERS["StepLR"], make_optimizer=lambda ps: make_optimizer(list(ps)))
    parameters, before = list(model.parameters()), model_tensors(model)
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, model, SparsityCallback(STR(s_init=S_INIT, threshold_decay=DECAY)))
    assert sparsity_parametrizations(model) == {}
    assert all(p is q for p, q in zip(model.parameters(), parameters, strict=True))
    after = model_tensors(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_rprop_without_threshold_decay_or_with_none_to_apply_trains(tmp_path: Path) -> None:
    def rprop(threshold_decay: float | None) -> Recorder:
        model = Scheduled(SCHEDULERS["StepLR"], make_optimizer=lambda ps: torch.optim.Rprop(ps, lr=0.01))
        return _fit(tmp_path, model, SparsityCallback(STR(s_init=S_INIT, threshold_decay=threshold_decay)))

    with pytest.warns(UserWarning, match="the model will stay dense"):
        rprop(None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*stay dense")
        recorder = rprop(0.0)  # no decay to apply: Rprop's own (none) is the one asked for
    assert recorder.thresholds["end"] != recorder.thresholds["start"]


def test_adamw_with_threshold_decay_trains_sparse(tmp_path: Path) -> None:
    model = Scheduled(
        SCHEDULERS["OneCycleLR"], make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)
    )
    recorder = _fit(tmp_path, model, SparsityCallback(STR(s_init=-2.0, threshold_decay=1.0)))
    assert all(end > -2.0 for end in recorder.thresholds["end"])
    assert zeros(model.conv.weight, model.fc.weight) > 0


# ---------------------------------------------------------------------------- several optimizers: a GAN


class TinyGAN(pl.LightningModule):
    """A generator and a discriminator of two Linear layers each, each with its own SGD stepping once a batch
    (manual optimization): Lightning's `global_step` counts two steps a batch."""

    def __init__(self, generator_decay: float = 1e-2, discriminator_decay: float = 0.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.decays = generator_decay, discriminator_decay
        self.generator = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.discriminator = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        generator_optimizer, discriminator_optimizer = self.optimizers()  # type: ignore[misc]
        (real,) = batch
        fake = self.generator(torch.randn(real.shape[0], 4))
        bce = nn.functional.binary_cross_entropy_with_logits
        ones, zeros_ = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros_)
        discriminator_optimizer.zero_grad()
        self.manual_backward(d_loss)
        discriminator_optimizer.step()
        generator_optimizer.zero_grad()
        self.manual_backward(bce(self.discriminator(fake), ones))
        generator_optimizer.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.SGD(module.parameters(), lr=0.05, weight_decay=decay)
            for module, decay in zip((self.generator, self.discriminator), self.decays, strict=True)
        ]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(64, 8, generator=torch.Generator().manual_seed(0))), batch_size=8)


def _weights(module: nn.Module) -> list[Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, nn.Linear)]


def test_with_two_optimizers_a_schedule_step_is_a_batch(tmp_path: Path) -> None:
    model = TinyGAN()
    n = sum(w.numel() for w in _weights(model.generator))  # 4 * 16 + 16 * 8 = 192
    counts: list[tuple[int, int]] = []

    class Count(Callback):  # after SparsityCallback's batch end: the zeros of each net after each batch
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
            counts.append((zeros(*_weights(model.generator)), zeros(*_weights(model.discriminator))))

    sparsity = SparsityCallback(ST3(0.5, start=0, end=1.0), include=["generator.*"], harden_on_fit_end=False)
    trainer = make_trainer(tmp_path, callbacks=[sparsity, Count()])
    trainer.fit(model)

    assert trainer.global_step == 2 * STEPS  # Lightning counts both optimizers' steps
    schedule = CubicSchedule(0.5, 0, STEPS)  # the schedule counts batches: `end=1.0` is the last one
    assert [g for g, _ in counts] == [round(schedule.sparsity_at(k) * n) for k in range(1, STEPS + 1)]
    assert counts[STEPS // 2 - 1][0] < round(0.5 * n) == counts[-1][0]
    assert all(d == 0 for _, d in counts)
    assert sparsity.state_dict()["schedule_step"] == STEPS


def _fit_gan(root: Path, model: TinyGAN, threshold_decay: float | None) -> tuple[list[str], Recorder]:
    """STR on the generator only; the warnings of the fit, and its thresholds."""
    sparsity = SparsityCallback(STR(s_init=-3.0, threshold_decay=threshold_decay), include=["generator.*"])
    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(root, callbacks=[sparsity, recorder]).fit(model)
    return [str(w.message) for w in caught], recorder


@pytest.mark.parametrize(
    ("decays", "threshold_decay", "dense"),
    [((1e-2, 0.0), None, False), ((0.0, 1e-2), 0.5, False), ((0.0, 1e-2), None, True)],
    ids=["generator-decays", "threshold-decay", "generator-undecayed"],
)
def test_str_on_the_generator_warns_only_when_nothing_decays_its_thresholds(
    tmp_path: Path, decays: tuple[float, float], threshold_decay: float | None, dense: bool
) -> None:
    messages, recorder = _fit_gan(tmp_path, TinyGAN(*decays), threshold_decay)
    assert any("will stay dense" in m for m in messages) == dense, messages
    assert len(recorder.thresholds["end"]) == 2 and all(t != -3.0 for t in recorder.thresholds["end"])


def test_a_generator_whose_optimizer_has_no_decay_gets_no_warning_about_name_based_grouping(tmp_path: Path) -> None:
    messages, _ = _fit_gan(tmp_path, TinyGAN(generator_decay=0.0, discriminator_decay=1e-2), threshold_decay=0.5)
    assert not [m for m in messages if "but not to the sparsified weights" in m], messages
