"""Sparse training of a small 1D CNN on MNIST-1D with lightning-sparse.

MNIST-1D is generated locally by the `mnist1d` package (4000 train / 1000 test sequences of
length 40), so this runs anywhere in a minute or two on a CPU:

    python examples/mnist1d_sparse.py --method st3 --sparsity 0.9
    python examples/mnist1d_sparse.py --method str

A progress bar follows each epoch with the current sparsity and ST-3's target (STR: its mean
threshold). At the end come the per-layer budget table and a summary: sparsity reached, test
accuracy, sparse and dense FLOPs, where the budget plot is, and the `wandb sync` command that
uploads the run, which is logged to Weights & Biases in offline mode unless --no-wandb is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
import wandb
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse import layer_stats
from sparsity_args import add_sparsity_args, make_callback

PLOT_FILE = "sparsity_budget.png"
"""Where lightning-sparse saves its budget plot at the end of training, in the trainer's log dir."""
METHOD_NAMES = {"st3": "ST-3", "st3sigma": "ST-3σ", "str": "STR", "dense": "dense baseline"}


class Mnist1dCNN(pl.LightningModule):
    """Four conv layers with BatchNorm and a linear classifier: about 56 K weights, ~94 % dense."""

    def __init__(self, lr: float = 0.1, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv1d(1, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Conv1d(32, 64, 3, stride=2, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 128, 3, stride=2, padding=1), nn.BatchNorm1d(128), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(128 * 10, 10)
        self.example_input_array = torch.zeros(1, 1, 40)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Mnist1dData(pl.LightningDataModule):
    """MNIST-1D from `mnist1d.data.make_dataset()`: generated on the fly, never downloaded."""

    def __init__(self, batch_size: int = 128, seed: int = 42) -> None:  # 42: the standard MNIST-1D draw
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        if hasattr(self, "train_set"):
            return
        args = get_dataset_args()
        args.seed = self.seed
        data = make_dataset(args)

        def tensors(x: object, y: object) -> TensorDataset:
            return TensorDataset(torch.as_tensor(x, dtype=torch.float32).unsqueeze(1), torch.as_tensor(y))

        self.train_set = tensors(data["x"], data["y"])
        self.test_set = tensors(data["x_test"], data["y_test"])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=500)

    test_dataloader = val_dataloader


class LatestMetrics(Logger):
    """A logger that only keeps the last value of every metric, for the progress bar.

    lightning-sparse logs its sparsity, ST-3's target and STR's thresholds to every logger of the
    trainer at its log steps, as numbers it has already read back from the device: showing them
    from here costs no extra synchronization.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "latest"

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.values.update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing to keep: the progress bar shows metrics only."""


class SparsityProgressBar(RichProgressBar):
    """Rich's progress bar, with the loss and the sparsity schedule as last logged (every 10 steps)."""

    def __init__(self, latest: LatestMetrics) -> None:
        super().__init__()
        self.latest = latest

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run's id: the summary names the run's directory instead
        values = self.latest.values
        ours = {}
        if "train/loss" in values:
            ours["loss"] = f"{values['train/loss']:.3f}"
        if "sparsity/global" in values:
            ours["sparsity"] = f"{values['sparsity/global']:.1%}"
        if "sparsity/target" in values:
            ours["target"] = f"{values['sparsity/target']:.1%}"
        thresholds = [value for key, value in values.items() if key.startswith("threshold/")]
        if thresholds:
            ours["mean threshold"] = f"{sum(thresholds) / len(thresholds):.3g}"
        return {**ours, **items}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before the sparsity callback's (this bar comes first among the callbacks): closing the
        # live display (what `teardown` does) puts the budget table it prints on lines of its own.
        self.teardown(trainer, pl_module, "fit")


@dataclass(frozen=True)
class RunSummary:
    """What a run reached, as `run` returns it and `report` prints it. FLOPs: multiply-accumulates per sample."""

    method: str
    target_sparsity: float | None  # ST-3's target; None for STR and the dense baseline
    epochs: int
    weights: int  # conv and linear weights, the ones the methods sparsify
    sparsity: float  # fraction of those weights that are exactly zero in the hardened model
    test_accuracy: float
    test_samples: int
    dense_flops: int
    sparse_flops: int
    log_dir: Path  # the trainer's log dir
    plot: Path | None  # the budget plot; None if none was written (as with --method dense)
    wandb_run_dir: Path | None  # the offline W&B run; None with --no-wandb
    model: Mnist1dCNN = field(repr=False, compare=False)

    @property
    def flops_ratio(self) -> float:
        return self.sparse_flops / self.dense_flops

    @property
    def wandb_sync(self) -> str | None:
        """The command that uploads the offline W&B run."""
        return None if self.wandb_run_dir is None else f"wandb sync {shlex.quote(str(self.wandb_run_dir))}"

    def report(self) -> str:
        """A few lines to read at a glance."""
        name = METHOD_NAMES[self.method]
        if self.target_sparsity is not None:
            name += f" to {self.target_sparsity:.1%} target sparsity"
        elif self.method == "str":
            name += " (no target: the decay on its thresholds sets the sparsity)"
        if self.wandb_sync is not None:
            logs = f"Upload to W&B:     {self.wandb_sync}"
        else:
            logs = f"Metrics (CSV):     {self.log_dir}"
        return "\n".join(
            [
                f"Summary: {name}, {self.epochs} epoch{'s' * (self.epochs != 1)}",
                f"  Sparsity reached:  {self.sparsity:.1%} of the {self.weights:,} conv/linear weights are exactly 0",
                f"  Test accuracy:     {self.test_accuracy:.1%} on the {self.test_samples:,} MNIST-1D test sequences",
                f"  FLOPs per sample:  {self.sparse_flops:,} sparse / {self.dense_flops:,} dense"
                f" = {self.flops_ratio:.1%} (multiply-accumulates)",
                f"  Budget plot:       {self.plot or 'none'}",
                f"  {logs}",
            ]
        )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default, and the module docstring as written."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; `--help` shows every option with its default."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    add_sparsity_args(parser, s_init=-5.0, threshold_decay=2e-2)
    parser.add_argument("--epochs", type=int, default=15, help="number of training epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialization and the batch order")
    parser.add_argument("--out-dir", default="runs", help=f"folder for the W&B run (or the CSV logs) and {PLOT_FILE}")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV files instead of an offline W&B run")
    return parser.parse_args(argv)


def make_logger(args: argparse.Namespace) -> CSVLogger | WandbLogger:
    """An offline W&B run in `args.out_dir`, or CSV logs there with `--no-wandb`."""
    if args.no_wandb:
        return CSVLogger(args.out_dir)
    # wandb looks for the git repository from `dir`, and warns when that folder does not exist yet.
    os.makedirs(args.out_dir, exist_ok=True)
    # wandb's info lines (where the run is, how to sync it) would repeat the summary; its warnings stay.
    wandb.setup(wandb.Settings(show_info=False))
    # Started here, not by WandbLogger: that always passes wandb's deprecated `anonymous` setting,
    # which wandb warns about.
    run = wandb.init(project="lightning-sparse-mnist1d", dir=args.out_dir, mode="offline")
    # As WandbLogger does for a run it starts: every metric plotted against the trainer's step.
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    return WandbLogger(experiment=run, save_dir=args.out_dir)


def run(args: argparse.Namespace) -> RunSummary:
    """Train and test as `args` say; returns the summary, with the (hardened) model."""
    pl.seed_everything(args.seed, verbose=False)
    logger, latest = make_logger(args), LatestMetrics()
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        log_every_n_steps=10,
        logger=[logger, latest],  # the first one's folder is the trainer's log dir, where the plot goes
        callbacks=[SparsityProgressBar(latest), *make_callback(args)],
        default_root_dir=args.out_dir,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    model, data = Mnist1dCNN(), Mnist1dData()
    trainer.fit(model, data)
    (result,) = trainer.test(model, data, verbose=False)
    wandb_run_dir = None
    if isinstance(logger, WandbLogger):
        wandb_run_dir = Path(logger.experiment.dir).parent  # `dir` is the run folder's `files`
        logger.experiment.finish()
    stats = layer_stats(model, model.example_input_array.to(model.device))
    weights = sum(s.params for s in stats)
    log_dir = Path(trainer.log_dir)
    plot = log_dir / PLOT_FILE
    return RunSummary(
        method=args.method,
        target_sparsity=args.sparsity if args.method in ("st3", "st3sigma") else None,
        epochs=args.epochs,
        weights=weights,
        sparsity=1.0 - sum(s.nonzeros for s in stats) / weights,
        test_accuracy=result["test/acc"],
        test_samples=len(data.test_set),
        dense_flops=sum(s.dense_flops for s in stats),
        sparse_flops=sum(s.sparse_flops for s in stats),
        log_dir=log_dir,
        plot=plot if plot.exists() else None,
        wandb_run_dir=wandb_run_dir,
        model=model,
    )


# Console lines from Lightning that a person running this example cannot act on, by the logger that writes them.
_LIGHTNING_CHATTER = {
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:",  # the accelerator is picked automatically
        "TPU available:",
        "HPU available:",
        "💡 Tip:",  # advertises another experiment tracker
        "Loading `train_dataloader` to estimate",
        "`Trainer.fit` stopped:",  # the summary says how many epochs ran
    ),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
}


def quiet_third_party_output() -> None:
    """Hide the messages of Lightning and PyTorch that this example's user cannot act on, and only those."""
    for name, prefixes in _LIGHTNING_CHATTER.items():
        logging.getLogger(name).addFilter(lambda record, hide=prefixes: not record.getMessage().startswith(hide))
    # Lightning's own code uses a PyTorch class that PyTorch deprecated.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning)
    # MNIST-1D is a few tensors in memory: worker processes would only add overhead.
    warnings.filterwarnings("ignore", r"The '\w+_dataloader' does not have many workers")


def main(argv: list[str] | None = None) -> None:
    """The command: train and test quietly, then print the summary."""
    quiet_third_party_output()
    summary = run(parse_args(argv))
    print(f"\n{summary.report()}")


if __name__ == "__main__":
    main()
