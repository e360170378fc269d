"""Sparsity and FLOPs logging through Lightning's loggers, and the per-layer budget report at fit end.

Lightning-facing, like `callback` and `checkpoint`; the only module that touches W&B, rich and
matplotlib. The numbers come from `stats` and from the method's own `metrics`.

Logged keys, grouped so a W&B workspace puts each family in its own section:

- ``sparsity/global``: fraction of zeros over all sparsified weights.
- ``sparsity/coverage``: fraction of the model's weight entries that are sparsified (`sparsified_fraction`).
- ``sparsity/fully_pruned_layers``: how many sparsified weights have no non-zero entry left. Each is also
  named in a warning (rank zero), once per fit, when a log first finds it so.
- ``layer_sparsity/<weight name>``: each sparsified weight's fraction of zeros.
- ``flops/dense``, ``flops/sparse`` (multiply-accumulates per sample) and ``flops/sparse_over_dense``.
- the method's own keys, under ``sparsity/`` or ``threshold/``: a scheduled target
  (``sparsity/target``) and threshold (``sparsity/threshold``), or learned per-layer thresholds
  (``threshold/<module name>``).

What rank zero alone does (logging, the table, the plot, the W&B table) never stops training: an error
there becomes a warning, once per kind, so that the ranks of a distributed run end the same way. What
must stop a run is decided by every rank together: sparsified weights that hold NaN or inf, which are
never reported as sparsity, raise `NonFiniteWeightsError` on all ranks at the next log.

Counts are global: under sharding (FSDP2) every rank counts the non-zeros of its shards and the counts are
summed over the ranks (`sparse_stats`), so every rank takes part and rank zero writes the totals.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.fabric.utilities import move_data_to_device
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from lightning_sparse.arguments import check_positive_int
from lightning_sparse.methods.base import SparseLayers
from lightning_sparse.sharding import is_sharded
from lightning_sparse.stats import LayerStats, dense_flops, non_finite_weights, sparse_stats
from lightning_sparse.thresholds import NonFiniteWeightsError

__all__ = ["KEY_PREFIXES", "PLOT_FILE", "STEP_KEY", "SparsityReport"]

STEP_KEY = "trainer/global_step"
"""The x-axis WandbLogger writes with every row; our keys are plotted against it."""
KEY_PREFIXES = ("sparsity", "layer_sparsity", "flops", "threshold")
PLOT_FILE = "sparsity_budget.png"
_T = TypeVar("_T")
# Typed as `wandb.Table` takes its columns.
_TABLE_COLUMNS: list[str | int] = ["layer", "shape", "params", "nonzeros", "density", "dense_flops", "sparse_flops"]


class SparsityReport:
    """What `SparsityCallback` logs every `every_n_steps` optimizer steps and reports at fit end.

    Dense FLOPs are measured once, on the first optimizer step, from `example_input_array` or else
    from the first element of the training batch; each log then only counts non-zeros (keep masks),
    never the effective weights. At the end of training, rank zero prints a per-layer table, saves
    `sparsity_budget.png` (per-layer budget and global sparsity over steps) in the trainer's log dir
    and, for each `WandbLogger`, logs the budget as a table with a bar chart of density per layer.

    Args:
        every_n_steps: Log every that many optimizer steps. Default: the trainer's `log_every_n_steps`.

    Example:
        >>> report = SparsityReport(every_n_steps=10)
        >>> SparsityReport(every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: `log_every_n_steps` must be a positive int, got 0
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        self.every_n_steps = None if every_n_steps is None else check_positive_int("log_every_n_steps", every_n_steps)
        self._dense: dict[str, int] | None = None
        self._coverage = 0.0
        self._history: list[tuple[int, float, float | None]] = []  # step, global sparsity, target
        self._failed: set[str] = set()  # what rank zero could not do, warned about once
        self._fully_pruned: set[str] = set()  # layers found fully pruned this fit, warned about once

    def on_train_start(self, trainer: pl.Trainer, coverage: float) -> None:
        """Plot our keys against the trainer's step in W&B, also in a run Lightning did not create.

        `coverage` is the fraction of the model's weight entries that are sparsified, logged with the sparsity.
        """
        # Measured afresh for each fit: it may run another model or other input shapes.
        self._coverage = coverage
        self._dense = None
        self._history = []
        self._failed = set()
        # Per fit: a resumed run (often a new process, with new logs) names a layer still fully pruned again.
        self._fully_pruned = set()
        if not trainer.is_global_zero:
            return
        for logger in _wandb_loggers(trainer):
            self._rank_zero("set up W&B's step axis for the sparsity keys", partial(_define_metrics, logger))

    def on_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        layers: SparseLayers,
        method_metrics: Callable[[], Mapping[str, float]],
    ) -> None:
        """After each optimizer step: measure dense FLOPs the first time, log when due.

        `method_metrics` gives the method's own values; it is called only on logging steps.
        """
        if self._dense is None:
            # Every rank runs the forward: a sharded model needs all of them in it.
            self._dense = _measure_dense_flops(trainer, pl_module, batch)
        # Set on the Trainer by Lightning's logger connector, outside the class body its type comes from.
        every = self.every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
        if trainer.global_step % every:
            return
        _check_finite(trainer, layers)
        stats = self._count(trainer, pl_module)
        if stats is not None and trainer.is_global_zero:
            self._log(trainer, stats, layers, method_metrics)

    def on_train_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        layers: SparseLayers,
        method_metrics: Callable[[], Mapping[str, float]],
    ) -> float | None:
        """Log the final values unless just logged, print the per-layer table, save the PNG and log the
        W&B budget table (rank zero). Returns the global sparsity reached (None on other ranks, or if
        the sparsified layers have no entries)."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        _check_finite(trainer, layers)
        stats = self._count(trainer, pl_module)
        if stats is None or not trainer.is_global_zero:
            return None
        if layers and (not self._history or self._history[-1][0] != trainer.global_step):
            # So the last logged values are the final model's, whatever the logging interval.
            self._log(trainer, stats, layers, method_metrics)
        sparsified = set(layers)
        self._rank_zero("print the per-layer budget table", lambda: _print_table(stats, sparsified, self._coverage))
        if log_dir is not None:
            path = os.path.join(log_dir, PLOT_FILE)
            self._rank_zero(f"save the budget plot {path}", lambda: _save_plot(stats, sparsified, self._history, path))
        for logger in _wandb_loggers(trainer):
            self._rank_zero(
                "log the budget table to W&B", partial(_log_wandb_budget, logger, stats, trainer.global_step)
            )
        if not any(s.params for s in stats if s.name in sparsified):
            return None  # nothing to prune: no sparsity to compare with a target
        return _metrics(stats, layers)["sparsity/global"]

    def _log(
        self,
        trainer: pl.Trainer,
        stats: Sequence[LayerStats],
        layers: SparseLayers,
        method_metrics: Callable[[], Mapping[str, float]],
    ) -> None:
        metrics = self._rank_zero(
            "compute the sparsity metrics",
            lambda: {**_metrics(stats, layers), "sparsity/coverage": self._coverage, **method_metrics()},
        )
        if metrics is None:
            return
        self._warn_fully_pruned(trainer.global_step, stats, layers)
        self._history.append((trainer.global_step, metrics["sparsity/global"], metrics.get("sparsity/target")))
        for logger in trainer.loggers:
            self._rank_zero(
                f"log sparsity metrics to {type(logger).__name__}",
                partial(logger.log_metrics, metrics, step=trainer.global_step),
            )

    def _warn_fully_pruned(self, step: int, stats: Sequence[LayerStats], layers: SparseLayers) -> None:
        """Name the sparsified layers found fully pruned for the first time in this fit, in one warning."""
        new = [s for s in stats if s.name in layers and s.fully_pruned and s.name not in self._fully_pruned]
        if not new:
            return
        self._fully_pruned.update(s.name for s in new)
        names = ", ".join(f"{s.name or '(root)'!r} ({s.params:,} weights)" for s in new)
        rank_zero_warn(
            f"lightning-sparse: {len(new)} sparsified layer{'s are' if len(new) > 1 else ' is'} fully pruned at step "
            f"{step}, every weight zero: {names}. Such a layer's output no longer depends on its input (a "
            "classifier's is constant). One global magnitude threshold empties layers whose weights are small next "
            "to the others' (e.g. initialised at a small std). If that is not intended: keep a minimum per layer "
            "(ST-3's `min_density`, e.g. 0.01), leave the layer dense with `exclude=[...]`, lower the target "
            "sparsity, or with ST-3 try `rescale=False` (its channel rescale amplifies nearly emptied channels, which "
            "can collapse training). `sparsity/fully_pruned_layers` logs how many layers are fully pruned."
        )

    def _count(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[LayerStats] | None:
        """The per-layer counts, on rank zero, and on every rank of a sharded model: each rank then counts its
        shards and the counts are summed over the ranks. None elsewhere, or if counting failed."""
        if not trainer.is_global_zero and not any(is_sharded(p) for p in pl_module.parameters()):
            return None
        return self._rank_zero(
            "count the sparsified weights' non-zeros", lambda: sparse_stats(pl_module, self._dense or {})
        )

    def _rank_zero(self, what: str, action: Callable[[], _T]) -> _T | None:
        """`action()`, part of what rank zero does alone; an error becomes a warning (once per `what`) and None.

        Raising would stop rank zero alone: the other ranks would wait for it at their next collective, or
        finish and save without it. A report is not worth a training run either.
        """
        try:
            return action()
        except Exception as error:
            if what not in self._failed:
                self._failed.add(what)
                rank_zero_warn(
                    f"lightning-sparse could not {what} ({type(error).__name__}: {error}); training goes on without "
                    f"it, and further such errors are not shown.\n{''.join(traceback.format_exception(error))}"
                )
            return None


def _check_finite(trainer: pl.Trainer, layers: SparseLayers) -> None:
    """Raise `NonFiniteWeightsError` on every rank if the sparsified weights of any rank hold NaN or inf.

    A collective under DDP (each rank checks its own weights): every rank calls it at the same steps.
    """
    non_finite = non_finite_weights(layers)
    if trainer.strategy.reduce_boolean_decision(bool(non_finite), all=False):
        raise NonFiniteWeightsError(non_finite, step=trainer.global_step)


def _define_metrics(logger: WandbLogger) -> None:
    run = logger.experiment
    run.define_metric(STEP_KEY)
    for prefix in KEY_PREFIXES:
        run.define_metric(f"{prefix}/*", step_metric=STEP_KEY)


def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def _measure_dense_flops(trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, int]:
    example = pl_module.example_input_array
    source = "`example_input_array`"
    if example is None:
        # Lightning's convention: in an `(input, target)` batch, the input is what `forward` takes.
        example = batch[0] if isinstance(batch, (tuple, list)) else batch
        source = "the first element of the training batch"
    precision = trainer.precision_plugin
    try:
        with precision.forward_context():
            return dense_flops(pl_module, precision.convert_input(move_data_to_device(example, pl_module.device)))
    except Exception as error:  # a FLOPs figure is not worth stopping a training run for
        rank_zero_warn(
            f"lightning-sparse could not measure FLOPs by calling the model on {source} "
            f"({type(error).__name__}: {error}). Set `example_input_array` on your LightningModule to what "
            "`forward` takes: a tensor, a tuple of positional arguments or a dict of keyword arguments (e.g. "
            "`self.example_input_array = (tokens, targets)`); sparsity is logged regardless, FLOPs are not."
        )
        return {}


def _metrics(stats: Sequence[LayerStats], layers: SparseLayers) -> dict[str, float]:
    sparsified = [s for s in stats if s.name in layers]
    params = sum(s.params for s in sparsified)
    # Layers without entries have nothing pruned: sparsity 0, as `LayerStats.sparsity` has it for each.
    metrics = {"sparsity/global": 1.0 - sum(s.nonzeros for s in sparsified) / params if params else 0.0}
    metrics["sparsity/fully_pruned_layers"] = float(sum(s.fully_pruned for s in sparsified))
    metrics.update({f"layer_sparsity/{s.name}": s.sparsity for s in sparsified})
    dense = sum(s.dense_flops for s in stats)
    if dense:
        sparse = sum(s.sparse_flops for s in stats)
        metrics.update(
            {"flops/dense": float(dense), "flops/sparse": float(sparse), "flops/sparse_over_dense": sparse / dense}
        )
    return metrics


def _table_rows(stats: Sequence[LayerStats]) -> list[list[Any]]:
    return [
        [
            s.name or "(root)",
            "x".join(map(str, s.shape)),
            s.params,
            s.nonzeros,
            s.density,
            s.dense_flops,
            s.sparse_flops,
        ]
        for s in stats
    ]


def _log_wandb_budget(logger: WandbLogger, stats: Sequence[LayerStats], step: int) -> None:
    import wandb  # here, not at the top: only runs with a WandbLogger pay for importing it

    table = wandb.Table(columns=_TABLE_COLUMNS, data=_table_rows(stats))
    chart = wandb.plot.bar(table, "layer", "density", title="Density per layer")
    # `log_metrics` is annotated `Mapping[str, float]`, but WandbLogger logs any W&B object this way
    # (its own `log_table` passes a `wandb.Table` to it).
    logger.log_metrics({"sparsity/budget": table, "sparsity/budget_chart": chart}, step=step)  # type: ignore[dict-item]


def _print_table(stats: Sequence[LayerStats], sparsified: set[str], coverage: float) -> None:
    table = Table(title="lightning-sparse: per-layer budget (FLOPs = multiply-accumulates per sample)")
    caption = f"Sparsified weights: {coverage:.1%} of the model's weight entries (parameters of 2 or more dimensions)"
    table.caption = caption + (". * not sparsified" if any(s.name not in sparsified for s in stats) else "")
    table.add_column("Layer")
    table.add_column("Shape")
    for column in ("Params", "Non-zeros", "Sparsity", "Dense FLOPs", "Sparse FLOPs"):
        table.add_column(column, justify="right")
    for s, (name, shape, params, nonzeros, density, dense, sparse) in zip(stats, _table_rows(stats), strict=True):
        marker = "" if s.name in sparsified else " *"
        table.add_row(
            name + marker, shape, f"{params:,}", f"{nonzeros:,}", f"{1 - density:.2%}", f"{dense:,}", f"{sparse:,}"
        )
    params, nonzeros = sum(s.params for s in stats), sum(s.nonzeros for s in stats)
    dense, sparse = sum(s.dense_flops for s in stats), sum(s.sparse_flops for s in stats)
    sparsity = 1 - nonzeros / max(params, 1)
    table.add_row(
        "Total", "", f"{params:,}", f"{nonzeros:,}", f"{sparsity:.2%}", f"{dense:,}", f"{sparse:,}", style="bold"
    )
    console = Console()
    if not console.is_terminal:
        # A log file has no width limit, and rich's 80-column default would cut the layer names.
        console.width = console.measure(table, options=console.options.update_width(10_000)).maximum
    console.print(table)


def _save_plot(
    stats: Sequence[LayerStats], sparsified: set[str], history: Sequence[tuple[int, float, float | None]], path: str
) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # The figure grows with the number of layers so every name stays readable.
    figure = Figure(figsize=(13, max(4.0, 0.22 * len(stats) + 1.5)), layout="constrained")
    budget, curve = figure.subplots(1, 2, width_ratios=(3, 2))
    names = [s.name or "(root)" for s in stats]
    colors = ["tab:blue" if s.name in sparsified else "tab:gray" for s in stats]
    bars = budget.barh(names, [100 * s.sparsity for s in stats], color=colors)
    labels = [f"{s.nonzeros:,}/{s.params:,} weights, {_short(s.sparse_flops)} FLOPs" for s in stats]
    budget.bar_label(bars, labels, fontsize=7, padding=2)
    budget.invert_yaxis()  # input layer on top
    budget.set_xlim(0, 135)  # room for the labels of fully pruned layers
    budget.set_xticks(range(0, 101, 20))
    budget.set_xlabel("sparsity (%)   [gray: not sparsified; FLOPs: multiply-accumulates per sample]")
    budget.tick_params(axis="y", labelsize=7)
    dense, sparse = sum(s.dense_flops for s in stats), sum(s.sparse_flops for s in stats)
    flops = f": {_short(sparse)} of {_short(dense)} dense FLOPs ({sparse / dense:.1%})" if dense else ""
    budget.set_title(f"Per-layer budget{flops}", fontsize=10)
    steps = [step for step, _, _ in history]
    curve.plot(steps, [100 * sparsity for _, sparsity, _ in history], marker=".", label="global sparsity")
    if any(target is not None for _, _, target in history):
        curve.plot(steps, [100 * (target or 0.0) for _, _, target in history], "--", label="target (schedule)")
    curve.set_xlabel("optimizer step")
    curve.set_ylabel("sparsity of sparsified weights (%)")
    curve.set_ylim(0, 100)
    curve.grid(alpha=0.3)
    curve.legend(loc="lower right")
    curve.set_title("Global sparsity", fontsize=10)
    figure.savefig(path, dpi=120)


def _short(count: float) -> str:
    """`4089184256` -> `4.09G`: counts readable at a glance in the plot."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.0f}"
