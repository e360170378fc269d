"""Cost of one ST-3 threshold update against the number of prunable weights, 1 M to 100 M.

The weights have ResNet-50's conv and fc shapes with every channel width scaled by the same factor
(input channels and classes kept), so each size has realistic layers in realistic proportions.
Each size runs in a fresh process: `update_thresholds` at 90 % sparsity (rescale on), its median time
over a few calls, and the memory its first call takes at its peak above what the weights and ST-3's
buffers already hold (`/proc/self/status` VmHWM after a reset, minus VmRSS before).

A training step of a model that size is measured two ways: the SGD step (momentum, weight decay)
over the same weights, which any training step of any model with that many weights includes, so a
strict lower bound; and torchvision ResNet-50's whole step (batch 8, 224x224) measured once and
scaled by weights / ResNet-50's weights, which is exact for width scaling (conv MACs and weights
both grow with width squared).

    .venv/bin/python benchmarks/threshold_scaling.py
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision
from torch import nn

from common import command_line, machine, markdown_table, publish, reset_peak_rss, rss_mib, section_head
from lightning_sparse.layers import select_weights, stored_tensor
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds

SIZES = (1_000_000, 10_000_000, 25_000_000, 100_000_000)
SPARSITY = 0.9
STEP_BATCH = 8


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Shapes of torchvision ResNet-50's conv and fc weights (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [tuple(stored_tensor(*weight.holders[0]).shape) for weight in select_weights(model).values()]


def scaled_shapes(target: int) -> list[tuple[int, ...]]:
    """ResNet-50's shapes with channel widths scaled by one factor so that the weights total about `target`."""
    base = resnet50_shapes()

    def shapes(factor: float) -> list[tuple[int, ...]]:
        # The RGB input (first conv's in-channels) and the 1000 classes (fc's out-features) stay as they are.
        def scale(channels: int, fixed: bool) -> int:
            return channels if fixed else max(1, round(channels * factor))

        last = len(base) - 1
        return [(scale(s[0], i == last), scale(s[1], i == 0), *s[2:]) for i, s in enumerate(base)]

    low, high = 0.01, 10.0  # the total grows monotonically with the factor: bisect on it
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(math.prod(s) for s in shapes(middle)) < target else (low, middle)
    return shapes(high)


def median_seconds(function: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `function` over `repeats` calls."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def probe(target: int, repeats: int) -> dict[str, Any]:
    """One size, in its own process: update time and memory, and the SGD step over the same weights."""
    torch.manual_seed(0)
    shapes = scaled_shapes(target)
    # Kaiming-normal magnitudes, as a freshly initialized conv net has.
    weights = [nn.Parameter(torch.randn(shape) * math.sqrt(2 / math.prod(shape[1:]))) for shape in shapes]
    layers = [StraightThroughSoftThreshold(weight) for weight in weights]
    state = sum(buffer.nbytes for layer in layers for buffer in layer.buffers())

    reset_peak_rss()
    before = rss_mib("VmRSS")
    started = time.perf_counter()
    update_thresholds(layers, weights, SPARSITY)
    first = time.perf_counter() - started
    peak = rss_mib("VmHWM") - before
    update = median_seconds(lambda: update_thresholds(layers, weights, SPARSITY), repeats)

    for weight in weights:
        weight.grad = torch.randn_like(weight)
    optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    optimizer.step()  # creates the momentum buffers
    sgd = median_seconds(optimizer.step, repeats)
    return {
        "weights": sum(w.numel() for w in weights),
        "layers": len(weights),
        "update_s": update,
        "first_update_s": first,
        "update_peak_mib": peak,
        "state_mib": state / 2**20,
        "sgd_step_s": sgd,
    }


def resnet50_step_seconds(repeats: int) -> tuple[int, float]:
    """Weights and median whole training step (forward, backward, SGD) of ResNet-50 at batch 8, 224x224."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images, labels = torch.randn(STEP_BATCH, 3, 224, 224), torch.randint(0, 1000, (STEP_BATCH,))

    def step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()  # warm-up: allocations, momentum buffers
    weights = sum(stored_tensor(*weight.holders[0]).numel() for weight in select_weights(model).values())
    return weights, median_seconds(step, repeats)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares `y = slope * x + intercept` and its R²."""
    mx, my = statistics.mean(x), statistics.mean(y)
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx
    intercept = my - slope * mx
    residual = sum((b - slope * a - intercept) ** 2 for a, b in zip(x, y, strict=True))
    total = sum((b - my) ** 2 for b in y)
    return slope, intercept, 1.0 - residual / total


def table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "Prunable weights", "Layers", "ST-3 update (ms)", "ns / weight", "Update peak memory (MiB)", "bytes / weight",
        "ST-3 state (MiB)", "SGD step (ms)", "Update / SGD step", "Est. ResNet-50-like step, batch 8 (s)",
        "Update / step",
    ]  # fmt: skip
    return markdown_table(
        headers,
        [
            [
                f"{r['weights'] / 1e6:.1f} M",
                r["layers"],
                f"{1000 * r['update_s']:.0f}",
                f"{1e9 * r['update_s'] / r['weights']:.1f}",
                f"{r['update_peak_mib']:.0f}",
                f"{r['update_peak_mib'] * 2**20 / r['weights']:.1f}",
                f"{r['state_mib']:.1f}",
                f"{1000 * r['sgd_step_s']:.0f}",
                f"{r['update_s'] / r['sgd_step_s']:.2f}",
                f"{r['step_estimate_s']:.1f}",
                f"{r['update_s'] / r['step_estimate_s']:.1%}",
            ]
            for r in rows
        ],
    )


def section(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    fit = meta["fit"]
    return "\n".join(
        [
            *section_head("ST-3 threshold update vs model size", meta),
            f"One `update_thresholds` at {SPARSITY:.0%} sparsity (global quantile, channel rescale, effective "
            "weights) over ResNet-50's conv and fc shapes with channel widths scaled to each size; median of "
            f"{meta['repeats']} calls, {meta['threads']} torch threads, one fresh process per size. Peak memory: "
            "what the first update took above the weights and ST-3's buffers (per-channel scales and thresholds: "
            "the 'ST-3 state' column; the keep mask is derived from the weights, not stored). SGD step: momentum + "
            "weight decay over the same "
            "weights, part of every training step, so a lower bound for one. Estimated step: torchvision ResNet-50 "
            f"(forward, backward, SGD at batch {STEP_BATCH}, 224x224) measured at {meta['resnet50_step_s']:.1f} s, "
            "scaled by the number of weights (width scaling grows MACs and weights alike); real batches are "
            "larger, so the real ratio is smaller still.",
            "",
            table(rows),
            "",
            f"Linear fit: update time = {1e9 * fit['slope']:.2f} ns × weights + {1000 * fit['intercept']:.1f} ms, "
            f"R² = {fit['r2']:.4f}.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.repeats)))
        return

    before = machine()
    rows = []
    for size in args.sizes:
        output = subprocess.run(
            [sys.executable, __file__, "--probe", str(size), "--repeats", str(args.repeats)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"{rows[-1]['weights']:,} weights: update {1000 * rows[-1]['update_s']:.0f} ms", flush=True)
    resnet50_weights, resnet50_step = resnet50_step_seconds(args.repeats)
    for row in rows:
        row["step_estimate_s"] = resnet50_step * row["weights"] / resnet50_weights
    slope, intercept, r2 = linear_fit([r["weights"] for r in rows], [r["update_s"] for r in rows])
    meta = {
        "command": command_line(),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "resnet50_weights": resnet50_weights,
        "resnet50_step_s": resnet50_step,
        "fit": {"slope": slope, "intercept": intercept, "r2": r2},
        "machine_before": before,
        "machine_after": machine(),
    }
    print(table(rows))
    publish("threshold_scaling", {**meta, "rows": rows}, section(rows, meta))


if __name__ == "__main__":
    main()
