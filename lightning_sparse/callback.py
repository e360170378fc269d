"""`SparsityCallback`: the Lightning glue around the plain-PyTorch methods, schedules and hardening."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_sparse.arguments import StepOrFraction, check_bool
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
    parametrize_layers,
    select_layers,
    sparsity_parametrizations,
    unparametrize_layers,
)
from lightning_sparse.methods import SparsityMethod, make_method
from lightning_sparse.methods.base import SparseLayers
from lightning_sparse.reporting import SparsityReport
from lightning_sparse.schedules import Schedule

__all__ = ["SparsityCallback"]


class SparsityCallback(Callback):
    """Sparse training of any LightningModule with STR or ST-3; hardened to a plain model at fit end.

    At `setup("fit")`, before the optimizer is built and a checkpoint restored, the conv and
    linear weights get the method's reparameterization, so learned thresholds are trained by your
    own optimizer and a resumed run finds the keys it saved. After every optimizer step (not every
    micro-batch) the method does its work, e.g. a scheduled global threshold.

    Checkpoints written during `fit` hold the reparameterized weights and the method's state, so
    `trainer.fit(ckpt_path=...)` resumes exactly; resuming with another method, other layers or
    settings that change what the saved tensors mean is refused before anything is loaded. For
    inference, load such a checkpoint with `lightning_sparse.load_hardened(YourModule, path)`;
    `trainer.validate/test/predict(ckpt_path=...)` with this callback hardens it on the way in.

    Args:
        method: A method object (`ST3(...)`, `STR(...)`), or the name of one in the registry
            `lightning_sparse.methods.METHODS`, with its settings given as the arguments below.
        target_sparsity, start, end, schedule, freeze_at, rescale: ST-3's settings (see `ST3`), with
            a method name only.
        s_init, threshold_decay: STR's settings (see `STR`), with a method name only.
        include: Module-name patterns or module types to sparsify (one, or a list), replacing the
            default (every Conv1d/2d/3d and Linear).
        exclude: Module-name patterns or module types to leave dense (one, or a list).
        harden_on_fit_end: At the end of `fit`, write the sparse weights into plain parameters and
            remove the reparameterizations (see `harden`).
        log_every_n_steps: Log sparsity and FLOPs to the trainer's loggers every that many optimizer
            steps. Default: the trainer's `log_every_n_steps`. See `lightning_sparse.reporting`.

    Example:
        >>> from lightning_sparse import ST3
        >>> trainer = pl.Trainer(callbacks=[SparsityCallback(ST3(target_sparsity=0.9))])  # doctest: +SKIP
    """

    def __init__(
        self,
        method: str | SparsityMethod,
        target_sparsity: float | None = None,
        *,
        start: StepOrFraction | None = None,
        end: StepOrFraction | None = None,
        schedule: str | Schedule | None = None,
        freeze_at: StepOrFraction | None = None,
        rescale: bool | None = None,
        s_init: float | None = None,
        threshold_decay: float | None = None,
        include: Sequence[LayerFilter] | LayerFilter | None = None,
        exclude: Sequence[LayerFilter] | LayerFilter | None = None,
        harden_on_fit_end: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        settings = {
            "target_sparsity": target_sparsity,
            "start": start,
            "end": end,
            "schedule": schedule,
            "freeze_at": freeze_at,
            "rescale": rescale,
            "s_init": s_init,
            "threshold_decay": threshold_decay,
        }
        if isinstance(method, SparsityMethod):
            given = [name for name, value in settings.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(f'`{n}`' for n in given)} given beside a method object: put the settings in the "
                    f"method object, e.g. SparsityCallback({type(method).__name__}(...)), or give the method by name"
                )
            self.method = method
        else:
            self.method = make_method(method, **settings)
        self.include = check_filters("include", include)
        self.exclude = check_filters("exclude", exclude) or []
        self.harden_on_fit_end = check_bool("harden_on_fit_end", harden_on_fit_end)
        self._report = SparsityReport(log_every_n_steps)
        self._run: SparsityMethod | None = None  # `method` with this fit's steps, from `setup("fit")`
        self._layers: SparseLayers = {}
        self._added: list[nn.Module] = []  # layers this fit reparameterized, to undo if its resume is refused
        self._restore_hook: RemovableHandle | None = None
        self._last_step = -1

    # ---------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning restores a checkpoint's module state right after `setup` and before any callback
        # state, and `trainer.ckpt_path` is only known from then on: the restore calls this hook first.
        self._restore_hook = pl_module.register_load_state_dict_pre_hook(partial(self._on_module_restore, trainer))
        if stage != "fit":
            return
        self._run = self.method.for_run(trainer.estimated_stepping_batches)
        self._layers = self._reparameterize(pl_module)

    def _reparameterize(self, pl_module: pl.LightningModule) -> SparseLayers:
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
            if set(existing) != set(layers) or not all(self.method.owns(p) for _, p in existing.values()):
                raise ValueError(
                    f"{type(pl_module).__name__} already carries a different sparsity reparameterization "
                    f"(layers {sorted(existing)}); call `lightning_sparse.harden(model)` before training it "
                    f"with method={self.method.name!r} on layers {sorted(layers)}"
                )
            return existing
        parametrize_layers(layers, self.method.parametrization)
        self._added = list(layers.values())
        return sparsity_parametrizations(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for message in self._method().on_fit_start(self._layers, trainer.optimizers, schedulers):
            rank_zero_warn(message)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._report.on_train_start(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a micro-batch of gradient accumulation: no optimizer step yet
            return
        self._last_step = step
        method = self._method()
        method.after_optimizer_step(step, self._layers)
        self._report.on_optimizer_step(
            trainer, pl_module, batch, self._layers, partial(method.metrics, step, self._layers)
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before `on_fit_end`: the loggers are still open and the model still on its device.
        self._report.on_train_end(trainer, pl_module, self._layers)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.harden_on_fit_end:
            harden(pl_module)
            self._layers = {}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_restore_hook()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_restore_hook()

    def _method(self) -> SparsityMethod:
        if self._run is None:
            raise RuntimeError("SparsityCallback's fit hooks ran without its `setup('fit')`")
        return self._run

    # ---------------------------------------------------------- checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        # Masks, thresholds and frozen flags travel in the module's state (parametrization buffers and
        # parameters) and the schedule position is `trainer.global_step`, so nothing here needs loading
        # back: these settings are what a resume is checked against, before the module restore.
        return {**self.method.settings(), "layers": sorted(self._layers)}

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
        must_keep = {"method", "layers", *self.method.reparameterization_settings}
        try:
            changes = check_resume(saved, self.state_dict(), must_keep)
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
