"""Two-process CPU FSDP2 fits (gloo, `ModelParallelStrategy` with `fully_shard`) for tests/test_sharding.py.

Run as `python tests/fsdp_fit.py OUT_DIR METHOD [METHOD ...]`; Lightning's launcher re-runs this script for
rank 1, so it must be a script, not a test. For each method, three fits of `ShardedNet`: an uninterrupted one,
one stopped after its first epoch and its (distributed) checkpoint, and the resume from that checkpoint. Each
fit hardens at its end (stopped, not crashed: an exception on rank zero makes Lightning kill rank one).
Written, for each method and fit (`full`, `stopped`, `resumed`):

- `<method>_<fit>_sparse.pt` (rank zero): the full, gathered state dict just before hardening, the method's
  state included, to harden on one process and compare;
- `<method>_<fit>_hardened.pt` (rank zero): the full, gathered state dict of the hardened model;
- `<method>_<fit>_rank<r>.pt` (each rank): its replicated values (thresholds, STR's `s`), what its shards hold
  (local and global sizes of weights and method state) and the sparsity it computed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

from lightning_sparse import SparsityCallback
from lightning_sparse.layers import sparsity_parametrizations
from lightning_sparse.sharding import local_shard
from models import make_trainer

# Odd row counts, so the two ranks' shards differ in size.
SHAPES = [(31, 16), (31, 31), (5, 31)]
N_WEIGHTS = sum(rows * cols for rows, cols in SHAPES)
TARGET = 0.9
METHODS: dict[str, dict[str, Any]] = {
    "st3": {"method": "st3", "target_sparsity": TARGET, "start": 0, "end": 6},
    "st3sigma": {"method": "st3sigma", "target_sparsity": TARGET, "start": 0, "end": 6},
    "st3-freeze": {"method": "st3", "target_sparsity": TARGET, "start": 0, "end": 6, "freeze_at": 10},
    # Frozen before the checkpoint after the first epoch: the resume restores sharded frozen masks.
    "st3-frozen-resume": {"method": "st3", "target_sparsity": TARGET, "start": 0, "end": 2, "freeze_at": 3},
    "str": {"method": "str", "target_sparsity": TARGET, "start": 0, "end": 6, "s_init": -5.0},
}


class ShardedNet(pl.LightningModule):
    """Three `Linear` layers, each sharded with FSDP2's `fully_shard` in `configure_model` (and the root);
    4 optimizer steps per epoch on each of 2 ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, 31), nn.ReLU(), nn.Linear(31, 31), nn.ReLU(), nn.Linear(31, 5)
        )  # fmt: skip

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=generator)
        y = x[:, :5].argmax(1)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class Record(pl.Callback):
    """At train end (before hardening): each rank's replicated values and shard sizes; rank zero's full state dict."""

    def __init__(self, out: Path, name: str) -> None:
        self.out, self.name = out, name

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record: dict[str, Any] = {"replicated": {}, "sizes": {}}
        for name, weight in sparsity_parametrizations(pl_module).items():
            state = dict(weight.parametrization.named_buffers()) | dict(weight.parametrization.named_parameters())
            for key, tensor in {"raw": weight.raw, **state}.items():
                local = local_shard(tensor)
                if tensor.dim() == 0:
                    record["replicated"][f"{name}.{key}"] = local.detach().clone()
                else:
                    storage = local.untyped_storage().nbytes()
                    record["sizes"][f"{name}.{key}"] = (local.numel(), tensor.numel(), storage)
        torch.save(record, self.out / f"{self.name}_rank{trainer.global_rank}.pt")
        full = get_model_state_dict(pl_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            torch.save(full, self.out / f"{self.name}_sparse.pt")


class StopAfterFirstEpoch(pl.Callback):
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.should_stop = True


def fit(out: Path, method: str, fit_name: str, ckpt_path: str | None = None, **kwargs: Any) -> pl.Trainer:
    pl.seed_everything(0)
    model = ShardedNet()
    name = f"{method}_{fit_name}"
    callbacks = [SparsityCallback(**METHODS[method]), Record(out, name), *kwargs.pop("callbacks", [])]
    # FSDP2 over both processes: a data-parallel mesh of 2 (the default would make them a tensor-parallel pair).
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = make_trainer(
        out, devices=2, strategy=strategy, max_epochs=3, callbacks=callbacks,
        logger=CSVLogger(out, name=name), log_every_n_steps=1, **kwargs,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_global_zero:
        torch.save(full, out / f"{name}_hardened.pt")
    return trainer


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for method in sys.argv[2:]:
        fit(out, method, "full")
        checkpoints = out / f"{method}_checkpoints"
        saving = ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1)
        fit(out, method, "stopped", callbacks=[saving, StopAfterFirstEpoch()], enable_checkpointing=True)
        fit(out, method, "resumed", ckpt_path=str(checkpoints / "epoch=0.ckpt"))
