"""Host time per sparsified layer: what a GPU's step waits on, measured on a CPU.

On a GPU the methods' arithmetic is cheap and their cost is the host's: the Python, dispatch and kernel
launches of every layer's forward, backward and update, which a step of a model with many layers
(ResNet-50 has 54) pays in series with its own. This measures that part alone: a chain of 54
`Linear(64, 64)` layers, so small that their arithmetic is negligible, trained by a plain PyTorch loop
(forward, backward, SGD with momentum, then the method's update: what SparsityCallback runs after each
optimizer step), with the fused CPU loops off (as if no C compiler were found) so that every layer takes
the eager torch ops a GPU runs. Dense, ST-3 (90 % target, threshold update every step) and STR are
interleaved for `--rounds` rounds; each figure is the median over rounds of a round's median step phase,
divided by the number of layers.

It does not time a GPU's kernel launches themselves (a few microseconds each on top of the dispatch
measured here), nor the waits on the device that ST-3's update makes (a handful per update).

    .venv/bin/python benchmarks/host_overhead.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Any

# Before lightning_sparse builds its loops: no compiler, so the eager forms (a GPU's) run everywhere.
os.environ["CC"] = "lightning-sparse-no-compiler"
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="lightning-sparse-host-")

import torch
from torch import nn

from common import command_line, machine, markdown_table, publish, section_head
from lightning_sparse import ST3, STR, SparsityMethod
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations

LAYERS, WIDTH, STEPS = 54, 64, 60
PHASES = ("forward", "backward", "optimizer", "update")
VARIANTS = ("dense", "st3", "str")
LABELS = {"dense": "Dense", "st3": "ST-3", "str": "STR"}


def method_for(name: str) -> SparsityMethod | None:
    if name == "dense":
        return None
    method = ST3(0.9, start=0, end=STEPS) if name == "st3" else STR(s_init=-5.0)
    return method.for_run(STEPS)


def phase_times(name: str) -> dict[str, float]:
    """Median seconds per step of each phase, over `STEPS` steps after ten untimed ones, for variant `name`."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    method = method_for(name)
    if method is not None:
        parametrize_weights(select_weights(model), method.parametrization)
        layers = sparsity_parametrizations(model)
        method.on_fit_start(layers, [optimizer])
    inputs = torch.randn(2, WIDTH)
    samples: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for step in range(10 + STEPS):
        marks = [time.perf_counter()]
        loss = model(inputs).sum()
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad()
        marks.append(time.perf_counter())
        if method is not None:
            method.after_optimizer_step(step, layers)
        marks.append(time.perf_counter())
        if step >= 10:
            for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
                samples[phase].append(end - start)
    return {phase: statistics.median(values) for phase, values in samples.items()}


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Each variant's phase medians per round, the variants interleaved (round r starts with the r-th)."""
    results: dict[str, dict[str, list[float]]] = {name: {phase: [] for phase in PHASES} for name in VARIANTS}
    for r in range(rounds):
        for name in [*VARIANTS[r % len(VARIANTS) :], *VARIANTS[: r % len(VARIANTS)]]:
            for phase, seconds in phase_times(name).items():
                results[name][phase].append(seconds)
    return results


def rows(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per variant: microseconds per layer of each phase (median over rounds), and the extra over dense's step."""
    per_layer = {
        name: {phase: 1e6 * statistics.median(values) / LAYERS for phase, values in phases.items()}
        for name, phases in results.items()
    }
    dense = sum(per_layer["dense"].values())
    return [{"variant": name, **us, "extra_us": sum(us.values()) - dense} for name, us in per_layer.items()]


def table(summary: list[dict[str, Any]]) -> str:
    headers = ["Variant", *(f"{phase.capitalize()} (µs/layer)" for phase in PHASES), "Extra over dense (µs/layer)"]
    body = [
        [
            LABELS[r["variant"]],
            *(f"{r[phase]:.1f}" for phase in PHASES),
            f"{r['extra_us']:+.1f} ({r['extra_us'] * LAYERS / 1000:.1f} ms/step)",
        ]
        for r in summary
    ]
    return markdown_table(headers, body)


def section(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    return "\n".join(
        [
            *section_head("Host time per sparsified layer (the cost a GPU step waits on)", meta),
            f"{LAYERS} `Linear({WIDTH}, {WIDTH})` layers (ResNet-50 has {LAYERS} sparsified layers), batch 2, one "
            "torch thread, a plain loop: forward, backward, SGD (momentum), then the method's update; the fused "
            f"CPU loops off, so every layer runs the eager ops a GPU runs. {meta['rounds']} rounds, variants "
            f"interleaved, {STEPS} timed steps each; medians over rounds of each round's median, per layer. The "
            f"extra column also gives it for a whole step of {LAYERS} layers.",
            "",
            table(summary),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # the one warning that the loops could not be built
    torch.set_num_threads(1)
    before = machine()
    results = measure(args.rounds)
    summary = rows(results)
    print(table(summary))
    meta = {"command": command_line(), "rounds": args.rounds, "machine_before": before, "machine_after": machine()}
    publish("host_overhead", {**meta, "rows": summary, "rounds_raw": results}, section(summary, meta))


if __name__ == "__main__":
    main()
