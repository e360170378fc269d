"""The one tiny LightningModule of the test suite, with its own data, and its variants for special shapes.

Small enough that a few epochs take well under a second on one CPU core, yet it has a Conv1d and a
Linear so both kinds of sparsified layer are exercised. Also the helpers the tests share: a quiet
CPU Trainer, copies of a model's tensors and the check that a refused run left a model untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.layers import sparsity_parametrizations

SAMPLES, LENGTH, BATCH = 64, 8, 8  # 8 optimizer steps per epoch
N_WEIGHTS = 4 * 1 * 3 + 2 * 4 * LENGTH  # TinyNet's conv and fc weights: 12 + 64 = 76


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


class Crash(pl.Callback):
    """Raises at the start of epoch `epoch`, after the checkpoint of the epoch before was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


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


def zeros(*weights: Tensor) -> int:
    """How many entries of `weights` are exactly zero."""
    return sum(int((w == 0).sum()) for w in weights)


def assert_untouched(model: nn.Module, before: dict[str, Tensor]) -> None:
    """`model` holds no reparameterization and exactly the tensors of `before` (from `model_tensors`)."""
    after = model_tensors(model)
    assert not sparsity_parametrizations(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


class BatchNormNet(TinyNet):
    """TinyNet with a wider conv, a BatchNorm and a hidden linear layer."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.conv = nn.Conv1d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.hidden = nn.Linear(16 * LENGTH, 32)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.hidden(torch.relu(self.bn(self.conv(x))).flatten(1))))


class TiedNet(TinyNet):
    """TinyNet behind two Linear(8, 8) layers that share one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(LENGTH, LENGTH)
        self.b = nn.Linear(LENGTH, LENGTH)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.b(torch.relu(self.a(x))))


class NoLayers(TinyNet):
    """Nothing to sparsify: an Identity and a BatchNorm (whose weight is not a conv/linear weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Identity(), nn.BatchNorm1d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).flatten(1)[:, :2]
