"""Sparsity and FLOPs logging: real Trainer fits, an offline W&B run read back from its file, CSV, no logger."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import wandb
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_sparse import SparsityCallback
from lightning_sparse.reporting import PLOT_FILE
from models import LENGTH, N_WEIGHTS, TinyNet, make_trainer, zeros
from wandb_offline import history, read_records, run_file

TESTS = Path(__file__).parent
LAYERS = ("conv", "fc")
DENSE_MACS = 4 * 1 * 3 * LENGTH + 4 * LENGTH * 2  # Conv1d: 12 weights x 8 outputs; Linear: in x out = 96 + 64


def _tiny(example_input: bool = False) -> TinyNet:
    """TinyNet with 4 optimizer steps an epoch; with `example_input`, FLOPs are measured on that, not on a batch."""
    model = TinyNet(batch_size=16)
    if example_input:
        model.example_input_array = torch.zeros(1, 1, LENGTH)
    return model


def _fit(
    tmp_path: Path,
    callback: SparsityCallback,
    model: TinyNet,
    steps: int,
    logger: pl.loggers.Logger | bool,
    checkpoints: ModelCheckpoint | None = None,
    ckpt_path: str | None = None,
) -> None:
    trainer = make_trainer(
        tmp_path,
        max_epochs=-1,
        max_steps=steps,
        logger=logger,
        callbacks=[callback] + ([checkpoints] if checkpoints else []),
        enable_checkpointing=checkpoints is not None,
        log_every_n_steps=1,
    )
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    finally:
        # `finish` returns before wandb-core has written the whole run file; `teardown` waits for it.
        wandb.finish()
        wandb.teardown()


def _checkpoints(directory: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=directory, every_n_train_steps=2, save_last=True)


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    # WandbLogger(offline=True) sets WANDB_MODE in os.environ; monkeypatch puts it back afterwards.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_holds_sparsity_layer_and_flops_series_and_the_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    callback = SparsityCallback("st3", target_sparsity=0.8, start=0, end=6)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-sparse-test")
    # No example_input_array: FLOPs are measured on the first element of the first batch.
    _fit(tmp_path, callback, _tiny(), steps=8, logger=logger)
    records = read_records(run_file(str(tmp_path)))
    rows = history(records)

    series = [row for row in rows if "sparsity/global" in row]
    assert [row["trainer/global_step"] for row in series] == list(range(1, 9))
    sparsity = [row["sparsity/global"] for row in series]
    assert sparsity == sorted(sparsity) and sparsity[0] < 0.5
    assert sparsity[-1] == pytest.approx(0.8, abs=0.01)
    assert series[-1]["sparsity/target"] == pytest.approx(0.8)
    assert all(row["sparsity/threshold"] > 0 for row in series)
    for name in LAYERS:
        assert all(0 <= row[f"layer_sparsity/{name}"] <= 1 for row in series)
    assert {row["flops/dense"] for row in series} == {DENSE_MACS}
    assert series[-1]["flops/sparse"] < 0.5 * DENSE_MACS
    assert series[-1]["flops/sparse_over_dense"] == pytest.approx(series[-1]["flops/sparse"] / DENSE_MACS)

    (budget_row,) = [row for row in rows if "sparsity/budget" in row]
    assert budget_row["trainer/global_step"] == 8
    assert budget_row["sparsity/budget"]["_type"] == "table-file"
    table_path = os.path.join(os.path.dirname(run_file(str(tmp_path))), "files", budget_row["sparsity/budget"]["path"])
    with open(table_path) as f:
        table = json.load(f)
    assert table["columns"][:2] == ["layer", "shape"]
    assert [row[0] for row in table["data"]] == list(LAYERS)
    assert sum(row[table["columns"].index("dense_flops")] for row in table["data"]) == DENSE_MACS
    # Config records: TinyNet's hyperparameters, then the chart's panel.
    configs = [r.config for r in records if r.WhichOneof("record_type") == "config"]
    visualize = {"/".join(item.nested_key): json.loads(item.value_json) for c in configs for item in c.update}
    assert visualize["_wandb/visualize/sparsity/budget_chart"]["panel_config"]["panelDefId"] == "wandb/bar/v0"

    step_axes = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert step_axes["sparsity/*"] == step_axes["layer_sparsity/*"] == step_axes["flops/*"] == "trainer/global_step"

    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    assert "per-layer budget" in capsys.readouterr().out


def test_str_thresholds_and_the_step_axis_continue_after_a_resume(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = WandbLogger(offline=True, save_dir=str(tmp_path / "first"), project="lightning-sparse-test")
    callback = SparsityCallback("str", s_init=-3.0, threshold_decay=1.0)
    _fit(tmp_path, callback, _tiny(example_input=True), 4, first, checkpoints=_checkpoints(tmp_path / "ckpt"))
    run_id = first.version

    resumed = WandbLogger(offline=True, save_dir=str(tmp_path / "resumed"), id=run_id, project="lightning-sparse-test")
    callback = SparsityCallback("str", s_init=-3.0, threshold_decay=1.0)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    model = _tiny(example_input=True)
    _fit(tmp_path, callback, model, 8, resumed, checkpoints=_checkpoints(tmp_path / "ckpt2"), ckpt_path=last)

    records = read_records(run_file(str(tmp_path / "resumed")))
    series = [row for row in history(records) if "sparsity/global" in row]
    assert [row["trainer/global_step"] for row in series] == [5, 6, 7, 8]
    for name in LAYERS:
        thresholds = [row[f"threshold/{name}"] for row in series]
        assert all(0 < t < 1 for t in thresholds) and thresholds == sorted(thresholds)  # decay pushes s up
    step_axes = {r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"}
    assert step_axes["threshold/*"] == step_axes["sparsity/*"] == "trainer/global_step"


def test_csv_logger_gets_the_series_every_n_steps(tmp_path: Path) -> None:
    callback = SparsityCallback("st3sigma", target_sparsity=0.5, start=0, end=4, log_every_n_steps=3)
    logger = CSVLogger(tmp_path)
    _fit(tmp_path, callback, _tiny(example_input=True), 7, logger=logger)

    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["sparsity/global"]]
    # Every third step, and the last one, so the last logged values are the final model's.
    assert [int(row["step"]) for row in rows] == [3, 6, 7]
    assert float(rows[-1]["sparsity/global"]) == pytest.approx(0.5, abs=0.01)
    assert {f"layer_sparsity/{name}" for name in LAYERS} <= set(rows[0])
    assert float(rows[0]["flops/dense"]) == DENSE_MACS
    assert os.path.getsize(os.path.join(logger.log_dir, PLOT_FILE)) > 0


def test_without_a_logger_the_table_and_plot_still_appear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    callback = SparsityCallback("st3", target_sparsity=0.5, start=0, end=2)
    _fit(tmp_path, callback, _tiny(), 3, logger=False)

    assert (tmp_path / PLOT_FILE).stat().st_size > 0
    out = capsys.readouterr().out
    assert "per-layer budget" in out and re.search(r"\bfc\b.*\b2x32\b", out)  # the row of the last layer


@pytest.mark.parametrize(("every", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), (True, TypeError)])
def test_log_every_n_steps_is_checked_at_construction(every: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="log_every_n_steps"):
        SparsityCallback("st3", target_sparsity=0.5, log_every_n_steps=every)


def test_log_every_n_steps_takes_a_numpy_int() -> None:
    import numpy as np

    callback = SparsityCallback("st3", target_sparsity=0.5, log_every_n_steps=np.int64(3))
    assert callback._report.every_n_steps == 3 and type(callback._report.every_n_steps) is int


WITHOUT_WANDB = """
import sys
sys.modules["wandb"] = None  # as if not installed: `import wandb` raises ImportError
import lightning.pytorch as pl, torch
from torch import nn
from lightning_sparse import SparsityCallback
from models import TinyNet, make_trainer

class Net(TinyNet):  # no `forward`
    forward = pl.LightningModule.forward
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.fc(torch.relu(self.conv(batch[0])).flatten(1)), batch[1])

for logger in (False, pl.loggers.CSVLogger(sys.argv[1])):
    callback = SparsityCallback("st3", target_sparsity=0.5, start=0, end=2, log_every_n_steps=1)
    make_trainer(sys.argv[1], max_epochs=-1, max_steps=3, logger=logger, callbacks=[callback]).fit(Net())
print("fit done")
"""


def test_works_without_wandb_installed(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_WANDB, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "fit done" in result.stdout and "per-layer budget" in result.stdout
    assert len(list(tmp_path.rglob(PLOT_FILE))) == 2
    # `Net` has no `forward` to measure FLOPs with: a warning, and sparsity is logged regardless.
    assert "could not measure FLOPs" in result.stderr
    (metrics,) = tmp_path.glob("lightning_logs/*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "sparsity/global" in header and "flops/dense" not in header


class BrokenLogger(CSVLogger):
    """A CSV logger whose backend fails for lightning-sparse's metrics, from step `fail_from` on."""

    def __init__(self, save_dir: Path, fail_from: int) -> None:
        super().__init__(save_dir, name="broken")
        self.fail_from = fail_from

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "sparsity/global" in metrics and (step or 0) >= self.fail_from:
            raise ConnectionError("backend unreachable")
        super().log_metrics(metrics, step)


def test_a_failing_logger_is_a_warning_once_and_the_other_loggers_and_the_fit_go_on(tmp_path: Path) -> None:
    callback = SparsityCallback("st3", target_sparsity=0.5, start=0, end=4)
    broken, csv_logger = BrokenLogger(tmp_path, fail_from=3), CSVLogger(tmp_path)
    with pytest.warns(UserWarning) as warned:
        _fit(tmp_path, callback, _tiny(example_input=True), 6, logger=[broken, csv_logger])
    messages = [str(w.message) for w in warned if "could not" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(
        "lightning-sparse could not log sparsity metrics to BrokenLogger (ConnectionError: backend unreachable); "
        "training goes on without it"
    )
    assert "Traceback" in messages[0] and "raise ConnectionError" in messages[0]
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row["sparsity/global"]] == list(range(1, 7))
    with open(os.path.join(broken.log_dir, "metrics.csv")) as f:
        assert [int(row["step"]) for row in csv.DictReader(f) if row["sparsity/global"]] == [1, 2]
    assert os.path.getsize(os.path.join(broken.log_dir, PLOT_FILE)) > 0  # the rest of the report goes on


def test_a_plot_that_cannot_be_saved_is_a_warning_and_the_table_still_appears(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / PLOT_FILE).mkdir()  # a directory where the PNG should go
    callback = SparsityCallback("st3", target_sparsity=0.5, start=0, end=2)
    with pytest.warns(UserWarning, match=r"could not save the budget plot .*sparsity_budget.png \(IsADirectoryError"):
        _fit(tmp_path, callback, _tiny(), 3, logger=False)
    assert "per-layer budget" in capsys.readouterr().out


class SmallConv(TinyNet):
    """TinyNet whose conv weights start 1000 times smaller than its fc's: one global threshold empties the conv."""

    def __init__(self) -> None:
        super().__init__(lr=0.01, batch_size=16)
        with torch.no_grad():
            self.conv.weight.mul_(1e-3)


def _fully_pruned_warnings(warned: pytest.WarningsRecorder) -> list[str]:
    return [str(w.message) for w in warned if "fully pruned" in str(w.message)]


def test_a_fully_pruned_layer_is_named_once_with_its_step_and_counted_in_the_logs(tmp_path: Path) -> None:
    callback = SparsityCallback("st3", target_sparsity=0.8, start=0, end=2)
    logger = CSVLogger(tmp_path)
    with pytest.warns(UserWarning) as warned:
        _fit(tmp_path, callback, SmallConv(), 6, logger=logger)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["sparsity/global"]]
    counts = {int(row["step"]): float(row["sparsity/fully_pruned_layers"]) for row in rows}
    dead_from = min(step for step, count in counts.items() if count)
    assert counts[dead_from] == 1.0 and all(count == 0.0 for step, count in counts.items() if step < dead_from)
    assert float(rows[dead_from - 1]["layer_sparsity/conv"]) == 1.0
    # Logged at every step, warned at the first: once per layer and fit, whatever it does afterwards.
    (message,) = _fully_pruned_warnings(warned)
    assert message.startswith(
        f"lightning-sparse: 1 sparsified layer is fully pruned at step {dead_from}, every weight zero: 'conv' (12 "
        "weights). Such a layer's output no longer depends on its input"
    )
    assert "`min_density`" in message and "exclude=[...]" in message


def test_st3_min_density_keeps_every_layer_alive_in_a_fit_at_the_exact_target(tmp_path: Path) -> None:
    callback = SparsityCallback("st3", target_sparsity=0.8, start=0, end=2, min_density=0.1)
    logger = CSVLogger(tmp_path)
    model = SmallConv()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, callback, model, 6, logger=logger)
    assert not [w for w in caught if "fully pruned" in str(w.message)]
    # Hardened: the conv keeps ceil(0.1 x 12) = 2 weights, and 61 of all 76 weights are zero, as without the floor.
    assert int((model.conv.weight != 0).sum()) >= 2
    assert zeros(model.conv.weight, model.fc.weight) == round(0.8 * N_WEIGHTS)
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [row for row in csv.DictReader(f) if row["sparsity/global"]]
    assert {float(row["sparsity/fully_pruned_layers"]) for row in rows} == {0.0}
