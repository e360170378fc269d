"""Helpers shared by the benchmark scripts: quiet Trainers, the ModelPruning baseline, result files."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_sparse import CubicSchedule
from lightning_sparse.layers import select_weights

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_DIR = BENCHMARKS / "results"
RESULTS_MD = BENCHMARKS / "RESULTS.md"
# ST-3's default schedule span (fractions of the run); every scheduled method here uses it explicitly.
START, END = 0.05, 0.5
SECTIONS = (
    "accuracy",
    "str_seeds",
    "st3_shape",
    "step_time",
    "threshold_scaling",
    "sharded_threshold",
    "min_density",
    "step_time_gpu",
    "host_overhead",
)
_HEADER = """# lightning-sparse benchmarks

Produced by the scripts in `benchmarks/`; each script regenerates its own section below (between the
`<!-- name -->` markers) and writes the raw figures to `benchmarks/results/<name>.json` and `.md`.
FLOPs are multiply-accumulates per sample of conv and linear layers (the papers' convention, see
`lightning_sparse.stats`).
"""


def silence() -> None:
    """Keep benchmark output to the figures: no Lightning info lines or library warnings."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def trainer(callbacks: Sequence[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, progress bar, checkpoints, summary or validation.

    `default_root_dir` is a fresh temporary directory: SparsityCallback saves its budget plot there.
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "default_root_dir": tempfile.mkdtemp(prefix="lightning-sparse-bench-"),
    }
    return pl.Trainer(callbacks=list(callbacks), **(settings | kwargs))


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights SparsityCallback sparsifies by default (every conv and linear), as ModelPruning wants them."""
    return [weight.holders[0] for weight in select_weights(model).values()]


def cubic_increments(schedule: CubicSchedule, call_steps: Sequence[int]) -> list[float]:
    """ModelPruning `amount`s so that its cumulative sparsity follows `schedule` (ST-3's cubic curve).

    ModelPruning calls `prune.global_unstructured`, whose float `amount` is the fraction of the
    weights *still unpruned* to prune now; the call after optimizer step `call_steps[i]` must take
    the sparsity from the schedule's value at the previous call to its value at this one.

    Example:
        >>> schedule = CubicSchedule(0.9, start=5, end=50)
        >>> [round(a, 4) for a in cubic_increments(schedule, [20, 50, 80])]  # 63.3 %, then 90 %, then done
        [0.6333, 0.7273, 0.0]
    """
    amounts, previous = [], 0.0
    for step in call_steps:
        current = schedule.sparsity_at(step)
        amounts.append(1.0 - (1.0 - current) / (1.0 - previous))
        previous = current
    return amounts


def model_pruning(model: nn.Module, amount: Callable[[int], float]) -> ModelPruning:
    """Lightning's ModelPruning as gradual magnitude pruning: global L1 over the same layers as ours.

    No lottery-ticket rewinding (its default) and no biases; the masks are made permanent at fit end.
    `amount(epoch)` is called at the end of each training epoch.
    """
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=prunable_weights(model),
        parameter_names=["weight"],
        use_global_unstructured=True,
        amount=amount,
        use_lottery_ticket_hypothesis=False,
        make_pruning_permanent=True,
    )


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (VmHWM) to the current one (Linux >= 4.0).

    torch has no CPU allocator statistics and tracemalloc does not see its allocations, so memory is
    the operating system's high-water mark; resetting it keeps import-time peaks out of the figure.
    """
    Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (peak resident since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def machine() -> dict[str, Any]:
    """What the figures were measured on, including the load other users put on it."""
    cpu, vector = "unknown CPU", "unknown"
    if os.path.exists("/proc/cpuinfo"):
        info = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
        cpu = found.group(1) if found else cpu
        # The widest vectors the fused loops are built for: the same model name can hide CPUs with and without.
        listed = re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE)
        flags = set(listed.group(1).split()) if listed else set()
        vector = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), "no AVX2")
    return {
        "cpu": cpu,
        "vector": vector,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One Markdown line naming the machine, versions and the load average around the run."""
    cpu = ", ".join(filter(None, [before["cpu"], before.get("vector")]))  # runs before `vector` was recorded lack it
    return (
        f"Machine: {before['cores']} CPU cores ({cpu}), torch {before['torch']}, "
        f"Lightning {before['lightning']}, Python {before['python']}. Load average (1/5/15 min) "
        f"{'/'.join(map(str, before['loadavg']))} before and {'/'.join(map(str, after['loadavg']))} after the run: "
        "the machine was shared with other jobs."
    )


def section_head(title: str, meta: dict[str, Any]) -> list[str]:
    """The first lines of a RESULTS.md section: its title, the command that produced it and the machine it ran on."""
    return [
        f"## {title}",
        "",
        f"Command: `{meta['command']}`",
        "",
        machine_line(meta["machine_before"], meta["machine_after"]),
        "",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers are expected already formatted as strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The command that reproduces this run, from the repository root."""
    script = Path(sys.argv[0]).resolve().relative_to(BENCHMARKS.parent)
    return " ".join([".venv/bin/python", str(script), *sys.argv[1:]])


def publish(name: str, payload: dict[str, Any], section: str | None) -> None:
    """Write `results/<name>.json` and `.md`; with a `section`, also replace it in RESULTS.md.

    `section` is the Markdown of this script's part of RESULTS.md (title, command, tables, notes);
    quick runs pass None so the published figures always come from full runs.
    """
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    if section is None:
        return
    (RESULTS_DIR / f"{name}.md").write_text(section.rstrip() + "\n")
    parts = _read_sections()
    parts[name] = section.rstrip()
    body = "\n\n".join(f"<!-- {key} -->\n{parts[key]}\n<!-- /{key} -->" for key in SECTIONS)
    RESULTS_MD.write_text(f"{_HEADER}\n{body}\n")
    print(f"wrote {RESULTS_DIR / name}.json/.md and the {name!r} section of {RESULTS_MD}")


def _read_sections() -> dict[str, str]:
    """The current sections of RESULTS.md (placeholders for those not produced yet)."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    parts = {key: f"## {key}\n\nNot produced yet." for key in SECTIONS}
    for key in SECTIONS:
        found = re.search(rf"<!-- {key} -->\n(.*?)\n<!-- /{key} -->", text, re.DOTALL)
        if found:
            parts[key] = found.group(1)
    return parts
