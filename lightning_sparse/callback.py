"""`SparsityCallback`: the Lightning glue around the plain-PyTorch methods, schedules and hardening."""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_sparse.arguments import StepOrFraction, check_bool
from lightning_sparse.checkpoint import (
    check_resume,
    describe_changes,
    harden_state_dict,
)
from lightning_sparse.hardening import harden
from lightning_sparse.layers import (
    Holder,
    LayerFilter,
    check_filters,
    check_output_axes,
    parametrize_weights,
    select_weights,
    sparsity_parametrizations,
    unparametrize,
)
from lightning_sparse.methods import SparsityMethod, make_method
from lightning_sparse.methods.base import SparseLayers
from lightning_sparse.reporting import SparsityReport
from lightning_sparse.schedules import Schedule
from lightning_sparse.sharding import retarget_fsdp_params
from lightning_sparse.stats import sparsified_fraction

__all__ = ["SparsityCallback"]


class SparsityCallback(Callback):
    """Sparse training of any LightningModule with STR or ST-3; hardened to a plain model at fit end.

    The weights are reparameterized right after your `setup` and `configure_model` (so layers built or
    weights loaded there are the ones sparsified), before a checkpoint is restored and before DDP wraps
    the model and `configure_optimizers` runs: learned thresholds are parameters of the model, trained
    by your optimizer and LR schedule. After every optimizer step (not every micro-batch) the method
    does its work, e.g. a scheduled global threshold.

    Checkpoints written during `fit` hold the reparameterized weights and the method's state, so
    `trainer.fit(ckpt_path=...)` resumes exactly; resuming with another method, other layers or
    settings that change what the saved tensors mean is refused before anything is loaded, from the
    checkpoint Lightning read (no second read). For inference, load such a checkpoint with
    `lightning_sparse.load_hardened(YourModule, path)`; `trainer.validate/test/predict(ckpt_path=...)`
    with this callback hardens it on the way in.

    A fit that fails before its first optimizer step gives the model back as it came (the same
    `Parameter` objects, no new keys); one that fails later keeps its sparse training state.

    Args:
        method: A method object (`ST3(...)`, `STR(...)`), or the name of one in the registry
            `lightning_sparse.methods.METHODS`, with its settings given as the arguments below.
        target_sparsity, start, end, schedule, freeze_at, rescale, min_density: ST-3's settings (see
            `ST3`), with a method name only.
        s_init, threshold_decay: STR's settings (see `STR`), with a method name only.
        include: Module types, or name patterns of modules or else of parameters, to sparsify (one, or a
            list), replacing the default (every Conv1d/2d/3d and Linear weight and MultiheadAttention
            projection). See `lightning_sparse.layers.select_weights`.
        exclude: The same, to leave dense (one, or a list).
        output_axes: The axis holding the output channels of the weights of some module types or name
            patterns, for a third-party layer that stores its weight transposed, e.g.
            `{transformers.pytorch_utils.Conv1D: 1}`; ConvTranspose's is known.
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
        min_density: float | None = None,
        s_init: float | None = None,
        threshold_decay: float | None = None,
        include: Sequence[LayerFilter] | LayerFilter | None = None,
        exclude: Sequence[LayerFilter] | LayerFilter | None = None,
        output_axes: dict[LayerFilter, int] | None = None,
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
            "min_density": min_density,
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
        self.output_axes = check_output_axes(output_axes)
        self.harden_on_fit_end = check_bool("harden_on_fit_end", harden_on_fit_end)
        self._report = SparsityReport(log_every_n_steps)
        self._run: SparsityMethod | None = None  # `method` with this fit's steps, from `setup("fit")`
        self._total_steps = math.inf
        self._step = 0  # optimizer steps of the schedule: batches in which the optimizers stepped
        self._last_global_step = -1
        self._stepped = False  # whether this fit made an optimizer step
        self._layers: SparseLayers = {}
        self._added: list[Holder] = []  # what this fit reparameterized, to undo if it fails early
        self._hooked: pl.LightningModule | None = None  # the module carrying our restore and configure hooks
        self._restore_hook: RemovableHandle | None = None

    # ---------------------------------------------------------------- hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(
                "SparsityCallback does not support `FSDPStrategy` (FSDP1, which flattens the weights into one "
                "parameter, so no weight can be reparameterized; and it needs a GPU, where this is untested). Use "
                "`ModelParallelStrategy` and shard the model with FSDP2's `fully_shard` in your LightningModule's "
                "`configure_model` (see the README's 'Running at scale'), or `strategy='ddp'`"
            )
        # Lightning restores a checkpoint's module state after `setup` and `configure_model` and before any
        # callback state: the restore calls this hook first, so a resume is checked before anything loads.
        self._hooked = pl_module
        self._restore_hook = pl_module.register_load_state_dict_pre_hook(partial(self._on_module_restore, trainer))
        if stage != "fit":
            return
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]  # set by its connector
        averaging = [type(c).__name__ for c in callbacks if isinstance(c, _WEIGHT_AVERAGING)]
        if averaging:
            raise ValueError(
                f"SparsityCallback cannot train together with {', '.join(averaging)}: averaging the weights of a "
                "sparse model averages their masks and thresholds too, and the averaged model is not sparse at "
                "the target. Remove one of the two callbacks."
            )
        self._total_steps = trainer.estimated_stepping_batches
        self._run = self.method.for_run(self._total_steps)
        self._step, self._stepped, self._added = 0, False, []
        # Lightning has no callback hook between the LightningModule's `configure_model` and DDP's wrap (after
        # which registering a parametrization detaches the weights from DDP's gradient hooks), so ours runs
        # as part of it. Not `functools.wraps`: Lightning calls `configure_model` only if it looks overridden.
        user_configure_model = pl_module.configure_model

        def configure_model() -> None:
            user_configure_model()
            self._layers = self._reparameterize(pl_module)

        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    def _reparameterize(self, pl_module: pl.LightningModule) -> SparseLayers:
        layers = select_weights(pl_module, self.include, self.exclude, self.output_axes)
        if not layers:
            raise ValueError(
                f"{type(pl_module).__name__} has no weight to sparsify: no Conv1d/2d/3d, Linear or "
                "MultiheadAttention (or nothing left after `include`/`exclude`); pass `include=[...]` naming the "
                "layers or parameters to sparsify"
            )
        existing = sparsity_parametrizations(pl_module)
        if existing:
            # A second fit on a model that was not hardened: keep its reparameterization, don't stack one more.
            if set(existing) != set(layers) or not all(self.method.owns(w.parametrization) for w in existing.values()):
                raise ValueError(
                    f"{type(pl_module).__name__} already carries a different sparsity reparameterization "
                    f"(layers {sorted(existing)}); call `lightning_sparse.harden(model)` before training it "
                    f"with method={self.method.name!r} on layers {sorted(layers)}"
                )
            return existing
        self._added = parametrize_weights(layers, self._run_method().parametrization)
        retarget_fsdp_params(pl_module)  # a weight FSDP2 shards now lives in its parametrization
        return sparsity_parametrizations(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        for message in self._run_method().on_fit_start(self._layers, trainer.optimizers):
            rank_zero_warn(message)
        undecayed = _undecayed_weights(self._layers, trainer.optimizers)
        if undecayed:
            rank_zero_warn(
                f"Your optimizer applies weight decay to some parameters but not to the sparsified weights of "
                f"{', '.join(undecayed)}. If `configure_optimizers` groups parameters by name (e.g. names ending in "
                "`weight`), note that a sparsified weight is named `<layer>.parametrizations.weight.original` "
                "during sparse training; group by module type or parameter identity instead."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_global_step = trainer.global_step
        self._report.on_train_start(trainer, sparsified_fraction(pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # One schedule step per batch in which the optimizers stepped: accumulating micro-batches don't
        # count, and several optimizers stepping in one batch (a GAN) count once.
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        self._step += 1
        self._stepped = True
        method = self._run_method()
        method.after_optimizer_step(self._step, self._layers)
        self._report.on_optimizer_step(
            trainer, pl_module, batch, self._layers, partial(method.metrics, self._step, self._layers)
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before `on_fit_end`: the loggers are still open and the model still on its device.
        method = self._run_method()
        reached = self._report.on_train_end(
            trainer, pl_module, self._layers, partial(method.metrics, self._step, self._layers)
        )
        target = method.target(sys.maxsize)
        if reached is not None and target is not None and reached < target - _TARGET_TOLERANCE:
            rank_zero_warn(
                f"Training ended at optimizer step {self._step} with {reached:.1%} sparsity, below the "
                f"{target:.1%} target (the schedule asks for {method.target(self._step):.1%} at this "
                "step): the run stopped before the schedule's end (early stopping, `max_time`, `start`/`end` "
                "beyond the run, or `max_steps` with several optimizers, which Lightning counts per optimizer: "
                "bound such runs with `max_epochs`). Give `end` as a fraction of the run, or train longer."
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.harden_on_fit_end:
            harden(pl_module)
            self._layers = {}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()
        if not self._stepped:
            if self._added and _raised_in(exception, "configure_optimizers"):
                exception.add_note(
                    "lightning-sparse: `configure_optimizers` ran on the reparameterized model, where a sparsified "
                    "weight is named `<layer>.parametrizations.weight.original` and STR adds `...weight.0.s`. If "
                    "it groups parameters by name (e.g. names ending in `weight`), group them by module type or "
                    "parameter identity instead (`module.parametrizations.weight.original` is the raw weight)."
                )
            self._give_back(pl_module)  # nothing trained
        elif self._layers:
            rank_zero_warn(
                f"The fit failed after {self._step} optimizer steps; the model keeps its sparse training state "
                "(reparameterized weights, masks and thresholds). Resume from your last checkpoint with "
                "`trainer.fit(model, ckpt_path=...)`, or call `lightning_sparse.harden(model)` for the plain "
                "sparse model as trained so far."
            )

    def _give_back(self, pl_module: nn.Module) -> None:
        """Undo this fit's reparameterization: the model as it came, its FSDP2 sharding pointing at it again."""
        unparametrize(self._added)
        retarget_fsdp_params(pl_module)
        self._layers, self._added = {}, []

    def _run_method(self) -> SparsityMethod:
        if self._run is None:
            raise RuntimeError("SparsityCallback's fit hooks ran without its `setup('fit')`")
        return self._run

    # ---------------------------------------------------------- checkpoints

    def _resume_settings(self, layers: list[str]) -> dict[str, Any]:
        """What a resume is checked against: the method's settings, the layers and the run's length."""
        return {**self.method.settings(), "layers": layers, "total_steps": self._total_steps}

    @override
    def state_dict(self) -> dict[str, Any]:
        # Masks, thresholds and frozen flags travel in the module's state (parametrization buffers and
        # parameters); the settings are what a resume is checked against, before the module restore.
        return {**self._resume_settings(sorted(self._layers)), "schedule_step": self._step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step = state_dict["schedule_step"]

    def _on_module_restore(self, trainer: pl.Trainer, module: nn.Module, state_dict: dict[str, Any], *_: Any) -> None:
        """`load_state_dict` pre-hook on the LightningModule, run once: Lightning's restore of a checkpoint."""
        # The checkpoint Lightning has just read, with the user's `weights_only` and `CheckpointIO`; empty when
        # the module loads a state dict of its own (pretrained weights in its `setup`), which is none of ours.
        checkpoint = trainer._checkpoint_connector._loaded_checkpoint
        if not checkpoint:
            return
        self._remove_restore_hook()
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if trainer.state.fn != TrainerFn.FITTING:
            # `trainer.test(ckpt_path="best")` after a fit that hardened the model: harden what comes in too.
            if not sparsity_parametrizations(module):
                hardened = harden_state_dict(state_dict, layers=(saved or {}).get("layers"))
                state_dict.clear()
                state_dict.update(hardened)
            return
        must_keep = {"method", "layers", *self.method.reparameterization_settings}
        try:
            if saved is None and any(_REPARAMETERIZED_KEY.search(key) for key in state_dict):
                raise ValueError(
                    "it was saved during sparse training but holds no SparsityCallback or optimizer state (a "
                    "`save_weights_only=True` checkpoint), so training cannot resume from it. Load it with "
                    "`lightning_sparse.load_hardened(YourModule, path)` for inference or to start a new sparse run"
                )
            if saved is not None and "schedule_step" not in saved:
                raise ValueError(
                    "it was written by lightning-sparse 0.1.0, whose checkpoints do not record the schedule's "
                    "step; load it with `lightning_sparse.load_hardened(YourModule, path)` and start a new fit"
                )
            if saved is not None:
                # A setting added since the checkpoint was written is absent from it: that run used its default.
                saved = {**self.method.default_settings(), **saved}
            changes = check_resume(saved, self._resume_settings(sorted(self._layers)), must_keep)
        except ValueError as error:
            self._give_back(module)
            raise ValueError(f"Cannot resume from {trainer.ckpt_path} (nothing was loaded): {error}") from None
        if changes:
            rank_zero_warn(
                "Resuming with SparsityCallback settings that differ from the checkpoint's; training goes on "
                f"from the checkpoint's step with the new ones:\n{describe_changes(changes)}"
            )

    def _remove_hooks(self) -> None:
        self._remove_restore_hook()
        if self._hooked is not None and "configure_model" in vars(self._hooked):
            del self._hooked.configure_model
        self._hooked = None

    def _remove_restore_hook(self) -> None:
        if self._restore_hook is not None:
            self._restore_hook.remove()
            self._restore_hook = None


_WEIGHT_AVERAGING = (StochasticWeightAveraging, WeightAveraging)
_REPARAMETERIZED_KEY = re.compile(r"(^|\.)parametrizations\.[^.]+\.original$")
_TARGET_TOLERANCE = 0.005  # fit ends within this of its target, up to exact ties at the threshold


def _raised_in(exception: BaseException, function: str) -> bool:
    traceback = exception.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_name == function:
            return True
        traceback = traceback.tb_next
    return False


def _undecayed_weights(layers: SparseLayers, optimizers: Sequence[Optimizer]) -> list[str]:
    """Sparsified layers whose weight gets no weight decay from an optimizer that decays other groups."""
    undecayed = []
    for optimizer in optimizers:
        if not any(g.get("weight_decay", 0) for g in optimizer.param_groups):
            continue
        decay = {id(p): g.get("weight_decay", 0) for g in optimizer.param_groups for p in g["params"]}
        undecayed += [name for name, weight in layers.items() if decay.get(id(weight.raw)) == 0]
    return undecayed
