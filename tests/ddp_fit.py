"""Two-process CPU DDP fits (gloo) for tests/test_scale.py; run as `python tests/ddp_fit.py OUT_DIR`.

`models` is found as a script's neighbour (Python puts the script's folder first on the path), and
test_scale.py also passes PYTHONPATH=tests, as pytest's `pythonpath` does for the tests.

Lightning's DDP launcher re-runs this script for rank 1, so it must be a script, not a test.
Each rank saves its model's state_dict after each fit (not hardened, so masks and thresholds are
there to compare) as OUT_DIR/<method>_rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import SparsityCallback
from models import TinyNet, make_trainer

RUNS = {
    "st3": (SparsityCallback("st3", 0.7, start=0, end=4, harden_on_fit_end=False), 5e-4),
    # No weight decay anywhere: the callback warns (once, from rank zero) that STR will not sparsify further.
    "str": (SparsityCallback("str", s_init=-3.0, harden_on_fit_end=False), 0.0),
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for method, (callback, weight_decay) in RUNS.items():
        pl.seed_everything(0)
        model = TinyNet(weight_decay=weight_decay)
        trainer = make_trainer(
            out,
            devices=2,
            strategy="ddp",
            max_epochs=2,
            callbacks=[callback],
            logger=CSVLogger(out, name=method),
            log_every_n_steps=1,
        )
        trainer.fit(model)
        torch.save(model.state_dict(), out / f"{method}_rank{trainer.global_rank}.pt")
