"""A tiny LightningModule with its own data, shared by the resume, scale and lifecycle tests.

Small enough that a few epochs take well under a second on one CPU core, yet it has a Conv1d and a
Linear so both kinds of sparsified layer are exercised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, LENGTH, BATCH = 64, 8, 8  # 8 optimizer steps per epoch


class TinyNet(pl.LightningModule):
    """Conv1d(1, 4, 3) -> ReLU -> Linear(32, 2) on a fixed random data set; SGD with momentum.

    `lr_halving_epochs` > 0 adds a StepLR scheduler, so resumes also restore a scheduler.
    """

    def __init__(
        self, lr: float = 0.1, weight_decay: float = 5e-4, batch_size: int = BATCH, lr_halving_epochs: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * LENGTH, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x).float(), y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", nn.functional.cross_entropy(self(x).float(), y))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        if not self.hparams.lr_halving_epochs:
            return optimizer
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, self.hparams.lr_halving_epochs, gamma=0.5)]

    def _loader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(SAMPLES, 1, LENGTH, generator=generator)
        y = (x.sum((1, 2)) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    val_dataloader = test_dataloader = predict_dataloader = train_dataloader


def make_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    """A quiet, deterministic CPU Trainer writing under `root`; `kwargs` override the defaults."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "deterministic": True,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "default_root_dir": root,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def model_tensors(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of `module.state_dict()`, to compare models before and after something."""
    return {name: value.detach().clone() for name, value in module.state_dict().items() if isinstance(value, Tensor)}
