"""Sparse training of a small 1D CNN on MNIST-1D with lightning-sparse.

MNIST-1D is generated locally by the `mnist1d` package (4000 train / 1000 test sequences of
length 40), so this runs anywhere in a few minutes on a CPU:

    python examples/mnist1d_sparse.py --method st3 --sparsity 0.9
    python examples/mnist1d_sparse.py --method str

Runs log to Weights & Biases in offline mode by default (`wandb sync` uploads them later).
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torchmetrics
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from sparsity_args import add_sparsity_args, make_callback
from torch.utils.data import DataLoader, TensorDataset


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sparsity_args(parser, s_init=-5.0, threshold_decay=2e-2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="runs")
    parser.add_argument("--no-wandb", action="store_true", help="log to CSV instead of offline W&B")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[Mnist1dCNN, float]:
    """Train and test as `args` say; returns the (hardened) model and its test accuracy."""
    pl.seed_everything(args.seed)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.no_wandb:
        logger = pl.loggers.CSVLogger(args.out_dir)
    else:
        logger = pl.loggers.WandbLogger(project="lightning-sparse-mnist1d", save_dir=args.out_dir, offline=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        log_every_n_steps=10,
        logger=logger,
        callbacks=make_callback(args),
        default_root_dir=args.out_dir,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Mnist1dCNN()
    data = Mnist1dData()
    trainer.fit(model, data)
    (result,) = trainer.test(model, data, verbose=False)
    return model, result["test/acc"]


if __name__ == "__main__":
    _, accuracy = run(parse_args())
    print(f"test accuracy: {accuracy:.4f}")
