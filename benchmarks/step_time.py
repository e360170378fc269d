"""Per-step cost of sparse training: whole Trainer steps of a torchvision ResNet, as a user's run has them.

Every run trains its own ResNet (ResNet-18 by default, `--arch`; num_classes=10, 32x32 inputs by default,
`--image-size`; SGD with Nesterov momentum, weight decay and a per-step cosine schedule; `--precision`) with a
plain Trainer in a fresh process of its own, in ordinary multi-batch epochs (`--epoch-batches`, default 20), at
a given batch size and number of torch threads: every figure is a standalone run, nothing shares a process.
On a CPU each round runs every variant's process at once, in lockstep: turns of a few steps, one process at a
time, in a shuffled order, so a change in the machine's load (other jobs) hits every variant's steps alike,
which runs made one after the other cannot promise on a shared machine. One more run of each variant, alone and
uninterrupted, checks the rounds' figures against a run as a user makes it. A step is timed from one
`on_train_batch_start` to the next, by a callback placed before all others: that interval holds the forward,
backward, optimizer and scheduler steps, every callback's hooks and the next batch's fetch. Peak RSS growth comes
from the same runs. Runs on CUDA when present: the variants then run one after the other (round r starts with the
r-th), the images live on the GPU (no host-to-device copy in the step, as with a loader that keeps up), memory is
the CUDA allocator's peak, the target is 1.02x and the figures go to their own section of RESULTS.md.

ModelPruning prunes at epoch ends, as it does in a user's run (once every `--epoch-batches` steps).

    .venv/bin/python benchmarks/step_time.py                  # timing + memory, publishes RESULTS.md
    .venv/bin/python benchmarks/step_time.py --profile st3    # only the ops ST-3 adds to a dense step
    # on a GPU, the issue's setting:
    python benchmarks/step_time.py --arch resnet50 --image-size 224 --precision bf16-mixed --batches 64 --threads 4
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torch.ao.pruning import WeightNormSparsifier
from torch.utils.data import DataLoader, TensorDataset

from common import (
    command_line,
    cubic_increments,
    machine,
    markdown_table,
    model_pruning,
    publish,
    reset_peak_rss,
    rss_mib,
    section_head,
    silence,
    trainer,
)
from lightning_sparse import CubicSchedule, SparsityCallback
from lightning_sparse.layers import select_weights, stored_tensor

BATCH = 128
EPOCH_BATCHES = 20
SPARSITY = 0.9
VARIANTS = ("dense", "st3", "str", "modelpruning", "modelpruning_masked", "weightnorm")
LABELS = {
    "dense": "Dense",
    "st3": "ST-3 (threshold update every step)",
    "str": "STR",
    "modelpruning": "ModelPruning, pruning at epoch ends",
    "modelpruning_masked": "ModelPruning between prunes (masks only)",
    "weightnorm": "WeightNormSparsifier.step() every step (fc only*)",
}


CUDA = torch.cuda.is_available()
# Steps per turn of a lockstep round: the first of each is not timed (`StepTimer`).
TURN = 5


def memory_name(gpu: bool) -> str:
    """What the memory columns measure: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    return "CUDA memory" if gpu else "RSS"


@dataclass(frozen=True)
class Workload:
    """What every run of one benchmark trains: a torchvision ResNet for 10 classes, its inputs and precision.

    >>> Workload("resnet50", 224, "bf16-mixed").arguments()[:2]
    ['--arch', 'resnet50']
    """

    arch: str = "resnet18"
    image_size: int = 32
    precision: str = "32-true"
    epoch_batches: int = EPOCH_BATCHES

    def arguments(self) -> list[str]:
        """The command-line arguments that give this workload to another process of this script."""
        return [
            "--arch", self.arch, "--image-size", str(self.image_size), "--precision", self.precision,
            "--epoch-batches", str(self.epoch_batches),
        ]  # fmt: skip

    def title(self) -> str:
        name = self.arch.replace("resnet", "ResNet-")
        return f"{name}, {self.image_size}x{self.image_size}, {self.precision}"


class Classifier(pl.LightningModule):
    """A torchvision ResNet for 10 classes, trained as the examples train theirs."""

    def __init__(self, workload: Workload) -> None:
        super().__init__()
        self.model = getattr(torchvision.models, workload.arch)(num_classes=10)
        self.example_input_array = torch.zeros(1, 3, workload.image_size, workload.image_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def data_loader(batch: int, workload: Workload) -> DataLoader:
    """Random images, `epoch_batches` batches of `batch` per epoch: ordinary multi-batch epochs.

    On CUDA they are kept on the GPU, so that the step times the training step and not a host-to-device copy
    that a user's loader would overlap with it.
    """
    generator = torch.Generator().manual_seed(0)
    count, size = batch * workload.epoch_batches, workload.image_size
    images = torch.randn(count, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    device = "cuda" if CUDA else "cpu"
    dataset = TensorDataset(images.to(device), labels.to(device))
    return DataLoader(dataset, batch_size=batch, shuffle=True, generator=generator)


class WeightNormEveryStep(pl.Callback):
    """torch.ao.pruning's WeightNormSparsifier (unstructured, per layer), stepped after every optimizer step.

    It only accepts 2-D weights: it builds its mask over a weight's last two dimensions, so a Conv2d
    weight fails in `step()` (RuntimeError: shape '[1, 1, N]' is invalid for input of size 9). On
    ResNet-18 that leaves the fc layer.
    """

    def __init__(self, sparsity: float) -> None:
        self.sparsifier = WeightNormSparsifier(sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the optimizer is built, as SparsityCallback does: the parametrization keeps the same Parameter.
        layers = [
            f"{name}.weight"
            for name, weight in select_weights(pl_module).items()
            if stored_tensor(*weight.holders[0]).dim() == 2
        ]
        self.sparsifier.prepare(pl_module, [{"tensor_fqn": fqn} for fqn in layers])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.sparsifier.step()


def variant_callbacks(name: str, model: pl.LightningModule, steps: int, epoch_batches: int) -> list[pl.Callback]:
    """The callbacks of one variant, each doing its pruning work from the first step."""
    if name == "dense":
        return []
    if name == "st3":
        # At the target from the first step: what every step after `end` does, and close to what a ramp's step does
        # in a run of thousands of steps. A ramp over this run's few steps would move the target by up to a tenth of
        # the weights per step, as no real run does (see NOTES).
        return [SparsityCallback("st3", SPARSITY, schedule="constant", start=0)]
    if name == "str":
        return [SparsityCallback("str", s_init=-5.0, threshold_decay=5e-3)]
    if name == "modelpruning":
        # ModelPruning calls `amount(epoch)` after epoch `epoch`, i.e. after optimizer step (epoch + 1) * epoch_batches.
        schedule = CubicSchedule(SPARSITY, 0, steps)
        amounts = cubic_increments(schedule, range(epoch_batches, steps + epoch_batches + 1, epoch_batches))
        return [model_pruning(model, lambda epoch: amounts[epoch])]
    if name == "modelpruning_masked":
        # Pruned once, after the first (warm-up) step: later steps only pay for its masks.
        return [model_pruning(model, lambda epoch: SPARSITY if epoch == 0 else 0.0)]
    if name == "weightnorm":
        return [WeightNormEveryStep(SPARSITY)]
    raise ValueError(f"unknown variant {name!r}")


class HookClock:
    """Wall time spent between `open` and `close` calls, taken per step."""

    def __init__(self) -> None:
        self._opened = 0.0
        self._spent = 0.0

    def open(self) -> None:
        self._opened = time.perf_counter()

    def close(self) -> None:
        self._spent += time.perf_counter() - self._opened

    def take(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent


class HookEdge(pl.Callback):
    """Placed before (`opening`) or after the variant's callbacks: times their mask-updating hooks.

    Those are `on_train_batch_end` (ST-3's update, WeightNormSparsifier.step()) and
    `on_train_epoch_end` (ModelPruning's pruning).
    """

    def __init__(self, clock: HookClock, opening: bool) -> None:
        self._tick = clock.open if opening else clock.close

    def on_train_batch_end(self, *args: Any) -> None:
        self._tick()

    def on_train_epoch_end(self, *args: Any) -> None:
        self._tick()


class StepTimer(pl.Callback):
    """Times whole steps, from one `on_train_batch_start` to the next (an epoch boundary included when crossed).

    With a `turn` (lockstep runs), every `turn`-th step starts when `wait_for_turn` returns, and is not timed: it
    starts on caches another process has filled, which costs a step of ResNet-18 at batch 32 a fifth more. The others
    are timed as an uninterrupted run's are.
    """

    def __init__(self, turn: int = 0) -> None:
        self.clock = HookClock()
        self.times: list[float] = []
        self.hook_times: list[float] = []  # the part of each step spent in the variant's mask-updating hooks
        # The memory each step got fresh from the OS: the page faults it took, which the allocator's state decides.
        self.fresh_mib: list[float] = []
        self.training_peak_mib = 0.0  # VmHWM when training ends, before any callback's end-of-fit work
        self._turn = turn
        self._started = 0
        self._last: float | None = None
        self._faults = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._last is not None:
            spent, hooks, faults = time.perf_counter() - self._last, self.clock.take(), minor_faults() - self._faults
            if not self._turn or (self._started - 1) % self._turn:
                self.times.append(spent)
                self.hook_times.append(hooks)
                self.fresh_mib.append(faults * resource.getpagesize() / 2**20)
        if self._turn and self._started % self._turn == 0:
            wait_for_turn()
        self._started += 1
        self._faults = minor_faults()
        self._last = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.training_peak_mib = peak_memory()

    def edges(self) -> tuple[HookEdge, HookEdge]:
        """The callbacks to place just before and just after the variant's own."""
        return HookEdge(self.clock, opening=True), HookEdge(self.clock, opening=False)


def fit_variant(
    name: str,
    steps: int,
    loader: DataLoader,
    workload: Workload,
    first: Sequence[pl.Callback] = (),
    last: Sequence[pl.Callback] = (),
) -> None:
    """Train variant `name` for `steps` optimizer steps of `workload` in multi-batch epochs, as a user's run does."""
    torch.manual_seed(0)  # the same initial weights for every variant
    model = Classifier(workload)
    callbacks = [*first, *variant_callbacks(name, model, steps, workload.epoch_batches), *last]
    settings = {"max_steps": steps, "max_epochs": -1, "precision": workload.precision}
    trainer(callbacks, accelerator="gpu" if CUDA else "cpu", **settings).fit(model, loader)


def reset_peak_memory() -> float:
    """Start measuring peak memory (RSS, or the CUDA allocator's on a GPU) from now; the memory in use now, in MiB."""
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    reset_peak_rss()
    return rss_mib("VmRSS")


def peak_memory() -> float:
    """The peak since `reset_peak_memory`, in MiB."""
    return torch.cuda.max_memory_allocated() / 2**20 if CUDA else rss_mib("VmHWM")


def minor_faults() -> int:
    """The page faults this process has taken that the OS served without reading a disk: fresh memory, mostly."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_probe(name: str, steps: int, batch: int, threads: int, workload: Workload, turn: int) -> None:
    """Body of the subprocess behind `measure_run` and `measure_lockstep`: one standalone run of one variant;
    prints one JSON line.

    Times `steps` steps (plus one untimed last step) and records the peak memory growth over the run: peak
    (reset after imports and data) minus the memory in use before the model existed; and the same up to the end
    of training, before the callbacks' end-of-fit work (SparsityCallback's report and hardening). With a `turn`,
    the run is in lockstep: it trains `lockstep_turns(steps, turn)` turns of `turn` steps and one last step, and
    before each turn (and the last step) it prints `ready` and waits for a line to start.
    """
    torch.set_num_threads(threads)
    # The data, made before the baseline, is not the variant's memory (a second copy made after it would count).
    loader = data_loader(batch, workload)
    baseline = reset_peak_memory()
    timer = StepTimer(turn)
    opening, closing = timer.edges()
    length = lockstep_turns(steps, turn) * turn if turn else steps
    with redirect_stdout(io.StringIO()):
        fit_variant(name, length + 1, loader, workload, first=[timer, opening], last=[closing])
    peak = peak_memory()
    result = {
        "times": timer.times[:steps], "hook_times": timer.hook_times[:steps], "fresh_mib": timer.fresh_mib[:steps],
        "growth_mib": peak - baseline, "peak_mib": peak, "training_growth_mib": timer.training_peak_mib - baseline,
    }  # fmt: skip
    print(json.dumps(result))


def lockstep_turns(steps: int, turn: int) -> int:
    """How many turns of `turn` steps time at least `steps` steps: a turn's first step is not timed.

    >>> lockstep_turns(23, 5)
    6
    """
    return -(-steps // (turn - 1))


def wait_for_turn() -> None:
    """A lockstep probe's wait: tell the coordinator a turn is about to start, and start it when told to."""
    # The real stdout: the fit runs with `sys.stdout` redirected.
    print("ready", file=sys.__stdout__, flush=True)
    sys.stdin.readline()


def probe_command(name: str, steps: int, batch: int, threads: int, workload: Workload, turn: int = 0) -> list[str]:
    """The command line of a probe process (`run_probe`) that times `steps` steps, warm-up included."""
    command = [sys.executable, __file__, "--run-probe", name, "--steps", str(steps), "--warmup", "0"]
    return [*command, "--batch", str(batch), "--threads", str(threads), "--turn", str(turn), *workload.arguments()]


def measure_run(name: str, steps: int, batch: int, threads: int, workload: Workload) -> dict[str, Any]:
    """A fresh process training variant `name` alone and uninterrupted, as a user's script would: its step times
    and memory."""
    command = probe_command(name, steps, batch, threads, workload)
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return cast(dict[str, Any], json.loads(output.strip().splitlines()[-1]))


def measure_lockstep(
    names: Sequence[str], steps: int, batch: int, threads: int, workload: Workload, seed: int
) -> dict[str, dict[str, Any]]:
    """One standalone process per variant, all started at once and run in turns of `TURN` steps, one process at a
    time, in an order shuffled at every turn (seeded by `seed` and the turn): each process's step times and memory.

    Only one process computes at any moment, and the steps timed are those that follow a step of their own run
    (`StepTimer`), so each has the machine as an uninterrupted run's step has it, while a change in the machine's
    load (other jobs) lands on every variant's steps alike: ratios of steps interleaved this finely are far
    steadier than ratios of runs made one after the other.
    """
    processes = {}
    with tempfile.TemporaryDirectory() as logs:
        for name in names:
            command = probe_command(name, steps, batch, threads, workload, TURN)
            with open(Path(logs) / name, "w") as stderr:
                pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
                processes[name] = subprocess.Popen(command, stderr=stderr, text=True, **pipes)

        def answer(name: str) -> str:
            line = processes[name].stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"the {name} probe stopped:\n{(Path(logs) / name).read_text()[-3000:]}")
            return line.strip()

        try:
            for name in names:
                answer(name)  # ready for its first turn
            results: dict[str, dict[str, Any]] = {}
            turns = lockstep_turns(steps, TURN)
            # After the last turn, each probe's last step; then it prints its results.
            for turn in range(turns + 1):
                order = list(names)
                random.Random(seed * 100_003 + turn).shuffle(order)
                for name in order:
                    processes[name].stdin.write("go\n")  # type: ignore[union-attr]
                    processes[name].stdin.flush()  # type: ignore[union-attr]
                    line = answer(name)
                    if turn == turns:
                        results[name] = json.loads(line)
        finally:
            # A probe that failed leaves the others waiting for their turn.
            for process in processes.values():
                process.kill()
                process.wait()
    return results


def measure(
    names: Sequence[str], configs: Sequence[tuple[int, int]], rounds: int, steps: int, workload: Workload
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], dict[str, dict[str, dict[str, Any]]]]:
    """`rounds` runs of every variant for each (batch, threads) configuration, and then one standalone,
    uninterrupted run of each to check the rounds' figures against.

    On a CPU each round runs the variants in lockstep (`measure_lockstep`). On a GPU a process's queued work would
    run on into another's step, so each round runs the variants one after the other, uninterrupted, starting at
    the r-th (a rotation): a change in the machine's load hits every variant alike and none always follows the
    same other one.
    """
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    standalone: dict[str, dict[str, dict[str, Any]]] = {}
    for batch, threads in configs:
        key = f"b{batch}_t{threads}"
        results[key] = {name: [] for name in names}
        for r in range(rounds):
            if CUDA:
                rotation = [*names[r % len(names) :], *names[: r % len(names)]]
                runs = {name: measure_run(name, steps, batch, threads, workload) for name in rotation}
            else:
                runs = measure_lockstep(names, steps, batch, threads, workload, seed=r)
            for name, run in runs.items():
                results[key][name].append(run)
                print(f"{key} round {r} {name}: {statistics.median(run['times']) * 1000:.0f} ms", file=sys.stderr)
        standalone[key] = {name: measure_run(name, steps, batch, threads, workload) for name in names}
    return results, standalone


def op_seconds(name: str, steps: int, batch: int, workload: Workload) -> dict[str, float]:
    """Self CPU seconds per step of every op over `steps` steps of variant `name`, after two warm-up steps.

    On a GPU too: there the methods' kernels take little of the device's time, and the host's time is the cost.
    """
    from torch.profiler import ProfilerActivity, profile

    class Profiled(pl.Callback):
        def __init__(self) -> None:
            self.profiler = profile(activities=[ProfilerActivity.CPU])

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            # From the third step's start to the start of the step after the last profiled one.
            if trainer.global_step == 2:
                self.profiler.start()
            elif trainer.global_step == 2 + steps:
                self.profiler.stop()

    profiled = Profiled()
    with redirect_stdout(io.StringIO()):
        fit_variant(name, steps + 3, data_loader(batch, workload), workload, first=[profiled])
    return {event.key: event.self_cpu_time_total / 1e6 / steps for event in profiled.profiler.key_averages()}


def op_differences(
    names: Sequence[str], steps: int, batch: int, workload: Workload, top: int, rounds: int = 3
) -> list[dict[str, Any]]:
    """For each variant, the `top` ops whose self CPU time per step grew most over dense's.

    Dense and the variants are profiled in turn, `rounds` times, and each op's time is the median over
    rounds, so a burst of load from other jobs during one profile does not land on one variant alone.
    """
    order = ["dense", *names]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for _ in range(rounds):
        for name in order:
            samples[name].append(op_seconds(name, steps, batch, workload))

    def median_ops(name: str) -> dict[str, float]:
        ops = {op for sample in samples[name] for op in sample}
        return {op: statistics.median(sample.get(op, 0.0) for sample in samples[name]) for op in ops}

    dense = median_ops("dense")
    rows = []
    for name in names:
        ops = median_ops(name)
        extra = sorted(ops, key=lambda op: ops[op] - dense.get(op, 0.0), reverse=True)[:top]
        rows += [{"variant": name, "op": op, "dense_s": dense.get(op, 0.0), "variant_s": ops[op]} for op in extra]
    return rows


def profile_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["Variant", "Op", "Dense (ms/step)", "Variant (ms/step)", "Extra (ms/step)"]
    return markdown_table(
        headers,
        [
            [
                LABELS[r["variant"]].split(" (")[0],
                f"`{r['op']}`",
                f"{1000 * r['dense_s']:.1f}",
                f"{1000 * r['variant_s']:.1f}",
                f"{1000 * (r['variant_s'] - r['dense_s']):+.1f}",
            ]
            for r in rows
        ],
    )


def summarize(
    results: dict[str, list[dict[str, Any]]], standalone: dict[str, dict[str, Any]], warmup: int
) -> list[dict[str, Any]]:
    """One row per variant of one configuration: median step, ratio to dense, hooks, memory growth, and the
    standalone run's median step beside the rounds'."""
    steps = {name: [t for run in runs for t in run["times"][warmup:]] for name, runs in results.items()}
    hooks = {name: [t for run in runs for t in run["hook_times"][warmup:]] for name, runs in results.items()}
    per_round = {name: [statistics.median(run["times"][warmup:]) for run in runs] for name, runs in results.items()}
    fresh = {name: [statistics.median(run["fresh_mib"][warmup:]) for run in runs] for name, runs in results.items()}
    growth = {name: statistics.median(run["growth_mib"] for run in runs) for name, runs in results.items()}
    training = {name: statistics.median(run["training_growth_mib"] for run in runs) for name, runs in results.items()}
    dense = statistics.median(steps["dense"])
    rows = []
    for name, values in steps.items():
        round_ratios = [v / d for v, d in zip(per_round[name], per_round["dense"], strict=True)]
        rest = [step - hook for step, hook in zip(values, hooks[name], strict=True)]
        rows.append(
            {
                "variant": name,
                "steps": len(values),
                "median_s": statistics.median(values),
                "ratio": statistics.median(values) / dense,
                "standalone_s": statistics.median(standalone[name]["times"][warmup:]),
                "round_ratio_min": min(round_ratios),
                "round_ratio_max": max(round_ratios),
                "hooks_s": statistics.median(hooks[name]),
                "fresh_mib": statistics.median(fresh[name]),
                "fresh_mib_min": min(fresh[name]),
                "fresh_mib_max": max(fresh[name]),
                "rest_over_dense_s": statistics.median(rest) - dense,
                "growth_mib": growth[name],
                "growth_ratio": growth[name] / growth["dense"],
                "training_growth_mib": training[name],
                "training_growth_ratio": training[name] / training["dense"],
            }
        )
    return rows


def table(rows: Sequence[dict[str, Any]], gpu: bool) -> str:
    headers = [
        "Variant", "Median step (ms)", "Ratio to dense", "Per-round ratios", "Standalone run (ms, vs rounds)",
        "Mask-update hooks (ms)",
        "Rest of step vs dense (ms)", "Fresh memory per step (MiB, runs' range)", f"{memory_name(gpu)} growth (MiB)",
        "Growth ratio",
        "Growth by training's end (MiB, ratio)",
    ]  # fmt: skip
    return markdown_table(
        headers,
        [
            [
                LABELS[r["variant"]],
                f"{1000 * r['median_s']:.0f}",
                f"**{r['ratio']:.3f}**",
                f"{r['round_ratio_min']:.2f}–{r['round_ratio_max']:.2f}",
                f"{1000 * r['standalone_s']:.0f} ({r['standalone_s'] / r['median_s']:.2f})",
                f"{1000 * r['hooks_s']:.0f}",
                f"{round(1000 * r['rest_over_dense_s']):+d}",
                f"{r['fresh_mib']:.1f} ({r['fresh_mib_min']:.1f}–{r['fresh_mib_max']:.1f})",
                f"{r['growth_mib']:.0f}",
                f"{r['growth_ratio']:.2f}",
                f"{r['training_growth_mib']:.0f} ({r['training_growth_ratio']:.2f})",
            ]
            for r in rows
        ],
    )


def effective_weights_mib(workload: Workload) -> float:
    """What holding one float32 effective weight per sparsified weight of the model takes: ST-3's and STR's floor."""
    weights = select_weights(Classifier(workload)).values()
    return 4 * sum(stored_tensor(*weight.holders[0]).numel() for weight in weights) / 2**20


def verdict(rows: Sequence[dict[str, Any]], batch: int, effective_mib: float, gpu: bool) -> list[str]:
    """The targets, in words: step ratio <= 1.03 at batch 128 (1.05 at smaller batches, 1.02 on a GPU), growth
    <= 1.2x dense's.

    A miss says where it comes from: the time the target leaves over dense's step against the variant's hooks
    and the rest of its step, and what the effective weights alone (`effective_mib`) make of dense's growth.
    """
    goal = 1.02 if gpu else 1.03 if batch >= 128 else 1.05
    by_name = {r["variant"]: r for r in rows}
    dense = by_name["dense"]
    lines = []
    for name in ("st3", "str"):
        if name not in by_name:
            continue
        row = by_name[name]
        time = "meets the target"
        if row["ratio"] > goal:
            allowed = 1000 * (goal - 1) * dense["median_s"]
            time = (
                f"**misses** the target by {100 * (row['ratio'] - goal):.1f} points: it leaves {allowed:.0f} ms over "
                f"dense's step, the hooks take {1000 * row['hooks_s']:.0f} ms and the rest of the step "
                f"{round(1000 * row['rest_over_dense_s']):+d} ms"
            )
        memory = "meets the target"
        if row["growth_ratio"] > 1.2:
            floor = (dense["growth_mib"] + effective_mib) / dense["growth_mib"]
            memory = f"**misses** the target: the effective weights alone ({effective_mib:.0f} MiB) make {floor:.2f}x"
        lines.append(
            f"- {LABELS[name].split(' (')[0]}: {row['ratio']:.3f}x dense ({goal} target), {time}. "
            f"{memory_name(gpu)} growth {row['growth_ratio']:.2f}x dense's (1.2 target), {memory}."
        )
    return lines


def rounds_description(meta: dict[str, Any], gpu: bool) -> str:
    """How the rounds ran, in words: in lockstep on a CPU, one variant after the other on a GPU."""
    timed = f"{meta['steps']} timed steps per run of which the first {meta['warmup']} are left out"
    if gpu:
        return (
            f"{meta['rounds']} rounds, each running every variant once, uninterrupted (round r starts with the r-th), "
            f"{timed}."
        )
    return (
        f"{meta['rounds']} rounds; in each, every variant's process starts at once and they train in lockstep, in "
        f"turns of {meta['turn']} steps, one process at a time, in an order shuffled at every turn, so that the "
        "load of other jobs lands on every variant alike. The first step of each turn starts on caches another "
        f"process has filled and is not timed; {timed}."
    )


def section(tables: dict[str, list[dict[str, Any]]], profile: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    workload, gpu = Workload(**meta["workload"]), meta["device"] != "CPU"
    memory = (
        "peak CUDA memory (`torch.cuda.max_memory_allocated`, reset after imports and data) minus the memory "
        "allocated before the model existed"
        if gpu
        else "peak RSS (VmHWM, reset after imports and data) minus the RSS before the model existed"
    )
    parts = [
        *section_head(f"Step time and memory overhead ({workload.title()}, {meta['device']})", meta),
        f"torchvision {workload.arch} (num_classes=10), {workload.image_size}x{workload.image_size} inputs, "
        f"precision {workload.precision}, SGD Nesterov + weight decay + per-step cosine, "
        f"plain Trainer, epochs of {workload.epoch_batches} batches. Every run is a standalone process training one "
        f"variant. {rounds_description(meta, gpu)} A step is timed from one "
        "`on_train_batch_start` to the next (forward, backward, optimizer and scheduler steps, every callback's "
        "hooks, the next batch). Ratio = median step over all rounds / dense's; per-round ratios = each run's "
        "median / dense's run of the same round. Standalone run = one more run of each variant after the rounds, "
        "alone and uninterrupted: its median step, and that over the rounds' (the rounds' figures checked against "
        "a run as a user makes it). Mask-update hooks = median time per step in the variant's "
        "`on_train_batch_end` and `on_train_epoch_end`; rest of step vs dense = median (step minus hooks) minus "
        "dense's median. Fresh memory per step = the page faults a step took (memory the allocator got anew from "
        "the OS, zeroed on first touch), in MiB, median of the runs' medians, and their range. "
        f"{memory_name(gpu)} growth = {memory}, median over rounds; growth by training's end = "
        "the same at `on_train_end`, before any callback's end-of-fit work (SparsityCallback's report, its plot and "
        'hardening). Target sparsity 90 %; ST-3 holds it from the first step (`schedule="constant"`: every step '
        "recomputes its threshold, as it does after `end`), ModelPruning's cubic schedule spans the whole run. STR: "
        "s_init -5, threshold_decay 5e-3.",
        "",
    ]
    for key, rows in tables.items():
        batch, threads = key.removeprefix("b").split("_t")
        lines = verdict(rows, int(batch), meta["effective_mib"], gpu)
        parts += [f"### Batch {batch}, {threads} torch thread(s)", "", table(rows, gpu), "", *lines, ""]
    if profile:
        parts += [
            "Where the extra time goes: the ops whose self CPU time (the host's, on a GPU) per step grew most over "
            f"dense's (`torch.profiler`, batch {meta['profile_batch']}, {meta['profile_steps']} steps per variant "
            "after two warm-up steps, dense and each variant profiled in turn three times, median per op; the "
            "profiler's own overhead inflates small ops). Lightning runs the forward and backward inside "
            "`optimizer.step(closure)`, so `Optimizer.step#SGD.step`'s self time holds all of the closure's time "
            "that no op of its own accounts for: the fused loops called from a forward (STR's effective weight) "
            "and the Python of the parametrizations, as well as the update itself.",
            "",
            profile_table(profile),
            "",
        ]
    parts.append(GPU_NOTES if gpu else NOTES)
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run before those")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epoch-batches", type=int, default=EPOCH_BATCHES)
    parser.add_argument("--arch", choices=("resnet18", "resnet50"), default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    parser.add_argument("--profile-steps", type=int, default=3, help="0: no profile")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--profile", choices=VARIANTS, help="only print the ops this variant adds to dense's step")
    parser.add_argument("--run-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--turn", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-publish", action="store_true", help="print; write results/step_time_quick.json, not the published files"
    )
    args = parser.parse_args()
    silence()
    workload = Workload(args.arch, args.image_size, args.precision, args.epoch_batches)
    if args.run_probe:
        run_probe(args.run_probe, args.warmup + args.steps, args.batch, args.threads[0], workload, args.turn)
        return
    profile_batch = args.batches[0]
    if args.profile:
        print(profile_table(op_differences([args.profile], args.profile_steps, profile_batch, workload, top=15)))
        return

    names = ["dense", *(v for v in args.variants if v != "dense")]
    before = machine()
    configs = [(batch, threads) for batch in args.batches for threads in args.threads]
    results, standalone = measure(names, configs, args.rounds, args.warmup + args.steps, workload)
    tables = {key: summarize(runs, standalone[key], args.warmup) for key, runs in results.items()}
    profile = []
    if args.profile_steps:
        sparse = [n for n in names if n in ("st3", "str")]
        profile = op_differences(sparse, args.profile_steps, profile_batch, workload, top=6)
    meta = {
        "command": command_line(),
        "device": torch.cuda.get_device_name() if CUDA else "CPU",
        "workload": dataclasses.asdict(workload),
        "steps": args.warmup + args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "turn": TURN,
        "profile_steps": args.profile_steps,
        "profile_batch": profile_batch,
        "machine_before": before,
        "machine_after": machine(),
        "effective_mib": effective_weights_mib(workload),
    }
    for key, rows in tables.items():
        print(key)
        print(table(rows, CUDA))
        print("\n".join(verdict(rows, int(key.removeprefix("b").split("_t")[0]), meta["effective_mib"], CUDA)))
    if profile:
        print(profile_table(profile))
    # A quick run's figures go beside the published ones, never over them.
    name = "step_time_gpu" if CUDA else "step_time"
    publish(
        f"{name}_quick" if args.no_publish else name,
        {**meta, "tables": tables, "profile": profile, "runs": results, "standalone_runs": standalone},
        None if args.no_publish else section(tables, profile, meta),
    )


GPU_NOTES = """\
Notes:

- On a GPU a step's interval is host time: the host runs ahead of the GPU until a read-back (an `.item()`, a
  `nonzero`) or a full launch queue makes it wait, so the median interval of a steady run is the step's real
  cost, whichever of host and GPU is the slower. The hooks column is host time too, including any wait on the
  GPU's queued work that the hook's read-backs make (the forward, backward and optimizer step of the same step).
- The fused CPU loops are not used on a GPU: ST-3's update and STR's passes are eager torch ops, layer by layer.
  Their arithmetic takes the GPU little time; their cost is the host's Python, dispatch and launches per layer,
  paid in series with the step's own where the host is as slow as the GPU is fast (`benchmarks/host_overhead.py`
  measures that part on a CPU).
"""

NOTES = """\
Notes:

- ResNet-18 on 32x32 inputs is a worst case for weight-proportional costs: 11.2 M weights but only
  37 M MACs per sample (`layer_stats`), so everything a method does per weight and per step weighs
  far more against the step than at 224x224 (49x the MACs for the same weights); batch 32 is worse still.
- ST-3's forward serves one effective weight per change of the raw weight or of its threshold buffers
  (keyed on `Tensor._version`), with an identity backward, and the threshold update leaves the new
  effective weight ready: the forward costs nothing. Its cost is the update after each optimizer step
  (the hooks column): a bracket around where the last update's threshold and the weights' drift put the new
  one (`WarmBracket`; the first update, or a miss, takes a strided sample instead), one fused pass per layer
  that counts the magnitudes below the bracket (and the NaN or infinite ones) and copies out those inside it
  (taking |w| as it reads: no magnitude tensor), the exact selection among those (a fused quickselect), and one
  fused pass per layer for the channel sums, rescale and new effective weight (`lightning_sparse.kernels`: C
  loops built once per machine, which split large weights among torch's threads on torch's own OpenMP team:
  threads of their own measured no faster, as torch's workers spin on the other core after each of its parallel
  ops). The fused loops are not torch ops: the profile table shows only what stays eager. The passes that write
  an effective weight larger than the caches write it with non-temporal stores, which skip reading each line
  first, and the passes that read a weight from memory prefetch ahead of where they read.
- ST-3 holds its target from the first step. A cubic ramp over this run's 26 steps would move the target by up
  to a tenth of the weights per step, where a real run's ramp moves it by a few thousand weights per step
  (ResNet-18 to 90 % over 45 % of a 4,000-step run: under 17,000 at its steepest) and a step after `end` by none:
  the warm bracket then cannot predict the threshold, and each update takes the sample's bracket, about 1.3 ms
  more at one thread (measured in one process, ResNet-18's weights).
- STR's forward also serves one effective weight per change of the raw weight or of `s` (once per
  optimizer step), computed by a fused pass into the memory of the last one, which also writes which weights
  it kept and their signs (two bits per weight). Its backward is one fused pass that reads those, not the
  weight, and writes the kept gradient over the incoming one (where nothing else holds that, as in a plain
  step), which autograd then takes over as `.grad`: no new gradient tensor, whose fresh memory cost page
  faults at every step. Both passes are in the "rest of step" column.
- ModelPruning prunes only at epoch ends (here every `--epoch-batches` steps); between prunes a forward
  pre-hook multiplies `weight_orig` by a float mask. Its memory holds `weight_orig`, the float mask and
  the masked weight for every pruned layer.
- ST-3 and STR memory: the effective weights (4 bytes per weight, kept between steps), and STR's signs (a
  quarter byte per weight, 2.7 MiB here). ST-3's keep mask is
  derived from the weight and its threshold where it is read, not stored, until frozen. The end of the fit adds
  SparsityCallback's report (its budget plot, drawn with matplotlib) and hardening: the last column leaves them
  out.
- Fresh memory per step: glibc's malloc hands large freed blocks back to the OS and maps them anew (its
  mmap and trim thresholds move with what was freed), so a step can take thousands of page faults, each
  zeroing a page, for the optimizer's temporaries and the gradients. How much differs between runs of one
  variant (the column's range) with the allocator's state, not with what a method computes: a part of the
  noise between processes.
- Timings on a shared 2-core machine are noisy from process to process even in lockstep (the per-round
  ratios): the 2-thread runs, which need both cores, suffer most.
"""


if __name__ == "__main__":
    main()
