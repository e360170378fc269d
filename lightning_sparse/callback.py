"""`SparsityCallback`: the Lightning glue around the plain-PyTorch methods, schedules and hardening."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_sparse.checkpoint import (
    check_resume,
    describe_changes,
    harden_state_dict,
    read_checkpoint,
)
from lightning_sparse.hardening import harden
from lightning_sparse.layers import (
    LayerFilter,
    check_filters,
    original_weight,
    parametrize_layers,
    select_layers,
    sparsity_parametrizations,
    unparametrize_layers,
)
from lightning_sparse.methods import ST3, STR, update_st3
from lightning_sparse.optim import split_param_group
from lightning_sparse.reporting import SparsityReport
from lightning_sparse.schedules import ConstantSchedule, CubicSchedule, LinearSchedule, Schedule

Method = Literal["st3", "st3sigma", "str"]
METHODS: tuple[str, ...] = ("st3", "st3sigma", "str")
SCHEDULES = {"cubic": CubicSchedule, "linear": LinearSchedule, "constant": ConstantSchedule}
StepOrFraction = int | float
"""An optimizer step (int) or a fraction of `trainer.estimated_stepping_batches` (float in [0, 1])."""

_ST3_DEFAULTS: dict[str, Any] = {"start": 0.05, "end": 0.5, "schedule": "cubic", "rescale": True, "freeze_at": None}
_STR_DEFAULTS: dict[str, Any] = {"s_init": -100.0, "threshold_decay": None}


class SparsityCallback(Callback):
    """Sparse training of any LightningModule with STR or ST-3; hardened to a plain model at fit end.

    At `setup("fit")`, before the optimizer is built and a checkpoint restored, the conv and
    linear weights get a reparameterization (`STR` or `ST3`), so STR's thresholds are trained by
    your own optimizer and a resumed run finds the keys it saved. ST-3's global magnitude threshold
    follows its schedule and is recomputed after every optimizer step (not every micro-batch).

    Checkpoints written during `fit` hold the reparameterized weights, masks and thresholds, so
    `trainer.fit(ckpt_path=...)` resumes exactly; resuming with another method, other layers or
    another `rescale` is refused before anything is loaded. For inference, load such a checkpoint
    with `lightning_sparse.load_hardened(YourModule, path)`; `trainer.validate/test/predict(ckpt_path=...)`
    with this callback hardens it on the way in.

    Args:
        method: ``"st3"``, ``"st3sigma"`` (ST-3 with width-normalised magnitudes: more uniform
            per-layer budgets, fewer FLOPs) or ``"str"``.
        target_sparsity: ST-3 only. Final fraction of zeros over all sparsified weights, in [0, 1).
        start, end: ST-3 only. Where the schedule starts and reaches `target_sparsity`, as an
            optimizer step (int) or a fraction of the run's optimizer steps (float). Default 0.05, 0.5.
        schedule: ST-3 only. ``"cubic"`` (default), ``"linear"`` or ``"constant"`` (full target from `start`).
        freeze_at: ST-3 only. Step or fraction after which masks are fixed and only surviving
            weights train. Default: never.
        rescale: ST-3 only. Per-output-channel rescale by about 1/(kept L1 fraction). Default True.
        s_init: STR only. Initial threshold parameter; `sigmoid(s_init)` is the initial threshold. Default -100.
        threshold_decay: STR only. Weight decay of the thresholds `s`, which is what drives STR's
            sparsity. Default: whatever your optimizer applies to the weights around them.
        include: Module-name patterns or module types to sparsify, replacing the default
            (every Conv1d/2d/3d and Linear).
        exclude: Module-name patterns or module types to leave dense.
        harden_on_fit_end: At the end of `fit`, write the sparse weights into plain parameters and
            remove the reparameterizations (see `harden`).
        log_every_n_steps: Log sparsity and FLOPs to the trainer's loggers every that many optimizer
            steps. Default: the trainer's `log_every_n_steps`. See `lightning_sparse.reporting`.

    Example:
        >>> callback = SparsityCallback("st3", target_sparsity=0.9)
        >>> trainer = pl.Trainer(callbacks=[callback], max_epochs=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        method: Method,
        target_sparsity: float | None = None,
        *,
        start: StepOrFraction | None = None,
        end: StepOrFraction | None = None,
        schedule: Literal["cubic", "linear", "constant"] | None = None,
        freeze_at: StepOrFraction | None = None,
        rescale: bool | None = None,
        s_init: float | None = None,
        threshold_decay: float | None = None,
        include: Sequence[LayerFilter] | None = None,
        exclude: Sequence[LayerFilter] = (),
        harden_on_fit_end: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        st3_args = {"start": start, "end": end, "schedule": schedule, "freeze_at": freeze_at, "rescale": rescale}
        str_args = {"s_init": s_init, "threshold_decay": threshold_decay}
        own, foreign = (str_args, st3_args) if method == "str" else (st3_args, str_args)
        given_foreign = [name for name, value in foreign.items() if value is not None]
        if given_foreign:
            raise ValueError(
                f"{', '.join(f'`{n}`' for n in given_foreign)} do(es) not apply to method={method!r}; "
                "remove it, or pick the method it belongs to"
            )
        if method == "str":
            if target_sparsity is not None:
                raise ValueError(
                    "`target_sparsity` does not apply to method='str': STR has no target; its sparsity comes "
                    "from `threshold_decay` and `s_init` (see the README), or use method='st3'"
                )
        elif target_sparsity is None or not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"`target_sparsity` must be a number in [0, 1) for method={method!r}, got {target_sparsity}")
        defaults = _STR_DEFAULTS if method == "str" else _ST3_DEFAULTS
        self.method = method
        self.target_sparsity = target_sparsity
        self.hparams = {name: defaults[name] if value is None else value for name, value in own.items()}
        check_filters("include", include)
        check_filters("exclude", exclude)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.harden_on_fit_end = harden_on_fit_end
        self._report = SparsityReport(log_every_n_steps)
        if method == "str":
            self._check_str_args()
        else:
            self._check_st3_args()
        self._layers: dict[str, tuple[nn.Module, STR | ST3]] = {}
        self._added: list[nn.Module] = []  # layers this fit reparameterized, to undo if its resume is refused
        self._restore_hook: RemovableHandle | None = None
        self._schedule: Schedule | None = None
        self._freeze_step: int | None = None
        self._last_step = -1
        self._threshold: float | None = None  # ST-3's last global threshold, for logging

    def _check_str_args(self) -> None:
        if not math.isfinite(self.hparams["s_init"]):
            raise ValueError(f"`s_init` must be a finite number, got {self.hparams['s_init']}")
        decay = self.hparams["threshold_decay"]
        if decay is not None and decay < 0:
            raise ValueError(f"`threshold_decay` must be >= 0, got {decay}")

    def _check_st3_args(self) -> None:
        if self.hparams["schedule"] not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {', '.join(map(repr, SCHEDULES))}, got {self.hparams['schedule']!r}")
        for name in ("start", "end", "freeze_at"):
            _check_step_or_fraction(name, self.hparams[name])
        start, end, freeze_at = self.hparams["start"], self.hparams["end"], self.hparams["freeze_at"]
        if type(start) is type(end) and end <= start and self.hparams["schedule"] != "constant":
            raise ValueError(f"`end` ({end}) must come after `start` ({start})")
        if freeze_at is not None and type(freeze_at) is type(end) and freeze_at < end:
            raise ValueError(f"`freeze_at` ({freeze_at}) must not come before `end` ({end}): masks would freeze mid-schedule")

    @property
    def is_st3(self) -> bool:
        return self.method != "str"

    # ---------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning restores a checkpoint's module state right after `setup` and before any callback
        # state, and `trainer.ckpt_path` is only known from then on: the restore calls this hook first.
        self._restore_hook = pl_module.register_load_state_dict_pre_hook(partial(self._on_module_restore, trainer))
        if stage != "fit":
            return
        if self.is_st3:
            total = trainer.estimated_stepping_batches
            steps = {name: _to_step(name, self.hparams[name], total) for name in ("start", "end", "freeze_at")}
            self._schedule = _make_schedule(self.hparams["schedule"], self.target_sparsity, steps["start"], steps["end"])
            self._freeze_step = steps["freeze_at"]
        self._layers = self._reparameterize(pl_module)

    def _reparameterize(self, pl_module: pl.LightningModule) -> dict[str, tuple[nn.Module, STR | ST3]]:
        self._added = []
        existing = sparsity_parametrizations(pl_module)
        layers = select_layers(pl_module, self.include, self.exclude)
        if not layers:
            raise ValueError(
                f"{type(pl_module).__name__} has no layer to sparsify: no Conv1d/2d/3d or Linear "
                "(or nothing left after `include`/`exclude`); pass `include=[...]` naming the layers to sparsify"
            )
        if existing:
            # A second fit on a model that was not hardened: keep its reparameterization, don't stack one more.
            if set(existing) != set(layers) or not all(self._is_own(p) for _, p in existing.values()):
                raise ValueError(
                    f"{type(pl_module).__name__} already carries a different sparsity reparameterization "
                    f"(layers {sorted(existing)}); call `lightning_sparse.harden(model)` before training it "
                    f"with method={self.method!r} on layers {sorted(layers)}"
                )
            return existing
        if self.method == "str":
            parametrize_layers(layers, lambda weight: STR(self.hparams["s_init"]))
        else:
            parametrize_layers(layers, lambda weight: ST3(weight, rescale=self.hparams["rescale"]))
        self._added = list(layers.values())
        return sparsity_parametrizations(pl_module)

    def _is_own(self, parametrization: nn.Module) -> bool:
        """Whether this callback would have made `parametrization` (so a second fit can reuse it)."""
        if self.method == "str":
            return isinstance(parametrization, STR)
        return isinstance(parametrization, ST3) and parametrization.rescale == self.hparams["rescale"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.method == "str":
            self._configure_threshold_decay(trainer)

    def _configure_threshold_decay(self, trainer: pl.Trainer) -> None:
        thresholds = {id(p.s): p.s for _, p in self._layers.values()}
        decay = self.hparams["threshold_decay"]
        for optimizer in trainer.optimizers:
            if decay is not None:
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
                split_param_group(optimizer, thresholds.values(), schedulers, weight_decay=decay)
            elif not any(
                group.get("weight_decay", 0) > 0 and any(id(p) in thresholds for p in group["params"])
                for group in optimizer.param_groups
            ):
                rank_zero_warn(
                    "STR's sparsity comes from weight decay on its thresholds, and your optimizer applies none "
                    "to them: the model will stay dense. Pass `threshold_decay=` to SparsityCallback."
                )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._report.on_train_start(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        target = None
        if self._schedule is not None:
            target = self._schedule.sparsity_at(step)
            self._update_st3(step, target)
        self._report.on_optimizer_step(trainer, pl_module, batch, self._layers, target, self._threshold)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before `on_fit_end`: the loggers are still open and the model still on its device.
        self._report.on_train_end(trainer, pl_module, self._layers)

    def _update_st3(self, step: int, sparsity: float) -> None:
        unique = {id(p): (module, p) for module, p in self._layers.values()}
        if any(p.frozen for _, p in unique.values()):
            return
        # Re-read the raw weights at every update: cached references go stale under FSDP.
        layers = [p for _, p in unique.values()]
        weights = [original_weight(module) for module, _ in unique.values()]
        self._threshold = update_st3(layers, weights, sparsity, sigma=self.method == "st3sigma")
        if self._freeze_step is not None and step >= self._freeze_step:
            for layer, weight in zip(layers, weights):
                layer.freeze(weight)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.harden_on_fit_end:
            harden(pl_module)
            self._layers = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_restore_hook()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_restore_hook()

    # ---------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        # Masks, thresholds and ST-3's frozen flag travel in the module's state (parametrization
        # buffers) and the schedule position is `trainer.global_step`, so nothing here needs loading
        # back: these settings are what a resume is checked against, before the module restore.
        return {
            "method": self.method,
            "target_sparsity": self.target_sparsity,
            **self.hparams,
            "layers": sorted(self._layers),
        }

    def _on_module_restore(self, trainer: pl.Trainer, module: nn.Module, state_dict: dict[str, Any], *_: Any) -> None:
        """`load_state_dict` pre-hook on the LightningModule, run once: Lightning's restore of a checkpoint."""
        self._remove_restore_hook()
        if trainer.state.fn != TrainerFn.FITTING:
            # `trainer.test(ckpt_path="best")` after a fit that hardened the model: harden what comes in too.
            if not sparsity_parametrizations(module):
                hardened = harden_state_dict(state_dict)
                state_dict.clear()
                state_dict.update(hardened)
            return
        if trainer.ckpt_path is None:
            return
        # Lightning has just unpickled this same file to restore it, so reading it again runs nothing new.
        saved = read_checkpoint(trainer.ckpt_path, weights_only=False).get("callbacks", {}).get(self.state_key)
        try:
            changes = check_resume(saved, self.state_dict())
        except ValueError as error:
            unparametrize_layers(self._added)  # give the model back as it came
            self._layers, self._added = {}, []
            raise ValueError(f"Cannot resume from {trainer.ckpt_path} (nothing was loaded): {error}") from None
        if changes:
            rank_zero_warn(
                "Resuming with SparsityCallback settings that differ from the checkpoint's; training goes on "
                f"from the checkpoint's step with the new ones:\n{describe_changes(changes)}"
            )

    def _remove_restore_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook.remove()
            self._restore_hook = None


def _check_step_or_fraction(name: str, value: StepOrFraction | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be an optimizer step (int) or a fraction of training (float), got {value!r}")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}` as a step must be >= 0, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` as a fraction of training must lie in [0, 1], got {value}")


def _to_step(name: str, value: StepOrFraction | None, total: float) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if not math.isfinite(total):
        raise ValueError(
            f"`{name}={value}` is a fraction of training, but this Trainer has no known number of optimizer "
            f"steps; set `max_steps` or `max_epochs` on the Trainer, or give `{name}` as an int step"
        )
    return round(value * total)


def _make_schedule(kind: str, final: float, start: int, end: int) -> Schedule:
    if kind == "constant":
        return ConstantSchedule(final, start)
    if end <= start:
        raise ValueError(f"`end` (step {end}) must come after `start` (step {start}); the run has too few steps for them")
    return SCHEDULES[kind](final, start, end)
