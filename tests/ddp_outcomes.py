"""Two-process CPU DDP fits (gloo) that must end the same way on both ranks, for tests/test_odd_inputs.py.

Run as `python tests/ddp_outcomes.py OUT_DIR SCENARIO [SCENARIO ...]`; Lightning's DDP launcher re-runs
the script for rank 1. For each scenario, each rank writes OUT_DIR/<scenario>_rank<r>.json: how its fit
ended ("finished" or the exception's class), its global step, and the warnings it raised.

`DivergingNet` is also imported by the tests (the script's folder is on the path).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor

from lightning_sparse import SparsityCallback
from models import TinyNet, make_trainer


class DivergingNet(TinyNet):
    """TinyNet whose loss turns NaN at optimizer step `nan_at` and stays so, or whose gradient of `fc.weight` gets
    one infinite entry before step `inf_at`: a diverged run, which SGD writes into the raw weights."""

    def __init__(self, nan_at: int = 0, inf_at: int = 0) -> None:
        super().__init__()
        self.nan_at, self.inf_at = nan_at, inf_at

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.nan_at and self.trainer.global_step + 1 >= self.nan_at:
            return loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.inf_at and self.trainer.global_step + 1 == self.inf_at:
            self.fc.parametrizations.weight.original.grad[0, 0] = -float("inf")


class FailingLogger(Logger):
    """A logger whose backend is down from step `fail_from` on, on rank zero, for lightning-sparse's metrics."""

    def __init__(self, fail_from: int) -> None:
        super().__init__()
        self.fail_from = fail_from

    @property
    def name(self) -> str:
        return "failing"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if rank_zero_only.rank == 0 and "sparsity/global" in metrics and (step or 0) >= self.fail_from:
            raise RuntimeError(f"logger backend down at step {step}")


ST3 = {"method": "st3", "target_sparsity": 0.5, "start": 0, "end": 4}
# Each scenario: the model, the callback's settings and the logger; 4 optimizer steps per epoch on each rank.
SCENARIOS: dict[str, tuple[type[TinyNet], dict[str, Any], dict[str, Any], Logger | bool]] = {
    # Fails at its third log, mid-run: before, rank zero died there and rank one waited for it forever.
    "logger-fails-mid-run": (TinyNet, {}, {**ST3, "log_every_n_steps": 1}, FailingLogger(3)),
    # Fails at the final log, in `on_train_end`: before, rank zero died and rank one finished.
    "logger-fails-at-train-end": (TinyNet, {}, {**ST3, "log_every_n_steps": 3}, FailingLogger(8)),
    "nan-st3": (DivergingNet, {"nan_at": 3}, ST3, False),
    "nan-str": (DivergingNet, {"nan_at": 3}, {"method": "str", "s_init": -3.0, "log_every_n_steps": 3}, False),
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for scenario in sys.argv[2:]:
        model_class, model_args, callback_args, logger = SCENARIOS[scenario]
        pl.seed_everything(0)
        model = model_class(**model_args)
        trainer = make_trainer(
            out, devices=2, strategy="ddp", max_epochs=-1, max_steps=8,
            callbacks=[SparsityCallback(**callback_args)], logger=logger,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.fit(model)
                outcome = "finished"
            except Exception as error:
                outcome = type(error).__name__
        record = {
            "outcome": outcome,
            "global_step": trainer.global_step,
            "warnings": [str(w.message) for w in caught if "lightning-sparse" in str(w.message)],
        }
        (out / f"{scenario}_rank{trainer.global_rank}.json").write_text(json.dumps(record))
