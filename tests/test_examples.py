"""The examples run as documented: MNIST-1D with STR's documented settings, CIFAR ResNet on generated images."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from mnist1d_sparse import parse_args, run  # examples/ is on pytest's `pythonpath`

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_str_prunes_the_mnist1d_model_with_its_documented_settings(tmp_path, capsys):
    # The example's own defaults for --method str (the README's short-run advice), on a shortened run.
    model, accuracy = run(parse_args(["--method", "str", "--epochs", "3", "--no-wandb", "--out-dir", str(tmp_path)]))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sparsity > 0.1
    assert accuracy > 0.5
    # The fit-end report: the per-layer table in the terminal and the budget picture in the log dir.
    assert "features.0" in capsys.readouterr().out
    assert list(tmp_path.rglob("sparsity_budget.png"))


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
