"""The examples run as documented: MNIST-1D's main job (its summary, its quiet output) and STR's documented
settings, CIFAR ResNet on generated images."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from mnist1d_sparse import parse_args, run  # examples/ is on pytest's `pythonpath`

EXAMPLES = Path(__file__).parents[1] / "examples"


def _zeros_and_weights(model: nn.Module) -> tuple[int, int]:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)


def test_str_prunes_the_mnist1d_model_with_its_documented_settings(tmp_path, capsys):
    # The example's own defaults for --method str (the README's short-run advice), on a shortened run.
    summary = run(parse_args(["--method", "str", "--epochs", "3", "--no-wandb", "--out-dir", str(tmp_path)]))
    zeros, weights = _zeros_and_weights(summary.model)
    assert zeros / weights > 0.1
    assert summary.sparsity == pytest.approx(zeros / weights)
    assert summary.test_accuracy > 0.5
    assert (summary.target_sparsity, summary.wandb_run_dir, summary.wandb_sync) == (None, None, None)
    # The fit-end report: the per-layer table in the terminal and the budget picture in the log dir.
    assert "features.0" in capsys.readouterr().out
    assert summary.plot is not None and summary.plot.is_file() and summary.plot.is_relative_to(tmp_path)


def test_the_main_job_returns_a_summary_of_what_it_reached(tmp_path):
    # The README's first command (ST-3 to 90 %, offline W&B), shortened to one epoch.
    summary = run(parse_args(["--epochs", "1", "--out-dir", str(tmp_path)]))
    assert (summary.method, summary.target_sparsity, summary.epochs) == ("st3", 0.9, 1)
    zeros, weights = _zeros_and_weights(summary.model)
    assert summary.weights == weights
    assert summary.sparsity == pytest.approx(zeros / weights)
    assert summary.sparsity == pytest.approx(0.9, abs=1e-3)
    assert summary.test_samples == 1000  # MNIST-1D's test split
    assert 0.2 < summary.test_accuracy <= 1.0  # well above chance (0.1) after one epoch
    # 90 % of the weights pruned leaves about a tenth of the multiply-accumulates.
    assert 0 < summary.sparse_flops < 0.2 * summary.dense_flops
    assert summary.flops_ratio == pytest.approx(summary.sparse_flops / summary.dense_flops)
    assert summary.plot == tmp_path / "sparsity_budget.png" and summary.plot.is_file()
    # The sync command names the offline run this job just wrote.
    program, verb, run_dir = shlex.split(summary.wandb_sync)
    assert (program, verb) == ("wandb", "sync")
    assert Path(run_dir) == summary.wandb_run_dir
    assert summary.wandb_run_dir.parent == tmp_path / "wandb"
    assert summary.wandb_run_dir.name.startswith("offline-run-")
    assert list(summary.wandb_run_dir.glob("run-*.wandb"))


def test_the_main_job_shows_progress_and_its_summary_and_no_foreign_noise(tmp_path):
    # Run as the README runs it: no W&B variable set (they could hide W&B's warnings), one epoch.
    env = {name: value for name, value in os.environ.items() if not name.startswith("WANDB_")}
    command = [sys.executable, "mnist1d_sparse.py", "--epochs", "1", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    for noise in ("warning", "wandb:", "GPU available", "TPU available", "Tip:", "LeafSpec"):
        assert noise.lower() not in result.stdout.lower()
    # The progress bar with ST-3's schedule on it, then the summary with the run's sync command.
    assert "Epoch 0" in result.stdout and "sparsity:" in result.stdout and "target:" in result.stdout
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert f"wandb sync {run_dir}" in result.stdout


@pytest.mark.parametrize("method", ["st3", "str"])
def test_cifar_resnet_example_runs_on_generated_images(tmp_path, method):
    command = [sys.executable, "cifar_resnet.py", "--synthetic", "32", "--max-steps", "2", "--batch-size", "16"]
    command += ["--workers", "0", "--method", method, "--out-dir", str(tmp_path)]
    result = subprocess.run(
        command, cwd=EXAMPLES, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test accuracy:" in result.stdout
    assert list(tmp_path.rglob("run-*.wandb"))
