"""Per-step cost of sparse training: whole Trainer steps of torchvision ResNet-18 on CPU.

Every variant trains its own copy of ResNet-18 (num_classes=10, 32x32 inputs, batch 128, SGD with
Nesterov momentum, weight decay and a per-step cosine schedule) in its own Trainer, each in a thread
of this one process. A baton lets one thread run at a time and hands it on every `--block` steps,
round by round, so a change in the machine's load hits every variant alike. A step is timed from one
`on_train_batch_start` to the next, by a callback placed before all others: that interval holds the
forward, backward, optimizer and scheduler steps, every callback's hooks and the next batch's fetch.

Each epoch is one batch, so Lightning's `ModelPruning`, which only prunes at epoch (or validation)
ends, prunes after every optimizer step here, with its own code; every variant has the same epoch
bookkeeping. Peak memory comes from separate processes, one per variant (see `measure_memory`).

    .venv/bin/python benchmarks/step_time.py                  # timing + memory, publishes RESULTS.md
    .venv/bin/python benchmarks/step_time.py --profile st3    # only the ops ST-3 adds to a dense step
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import redirect_stdout
from typing import Any

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
    machine_line,
    markdown_table,
    model_pruning,
    publish,
    reset_peak_rss,
    rss_mib,
    silence,
    trainer,
)
from lightning_sparse import CubicSchedule, SparsityCallback
from lightning_sparse.layers import select_layers

BATCH = 128
SPARSITY = 0.9
VARIANTS = ("dense", "st3", "str", "modelpruning", "modelpruning_masked", "weightnorm")
LABELS = {
    "dense": "Dense",
    "st3": "ST-3 (threshold update every step)",
    "str": "STR",
    "modelpruning": "ModelPruning, pruning every step",
    "modelpruning_masked": "ModelPruning between prunes (masks only)",
    "weightnorm": "WeightNormSparsifier.step() every step (fc only*)",
}


class Classifier(pl.LightningModule):
    """torchvision ResNet-18 for 10 classes, trained as the examples train theirs."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torchvision.models.resnet18(num_classes=10)
        self.example_input_array = torch.zeros(1, 3, 32, 32)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def one_batch_loader() -> DataLoader:
    """A data set of exactly one batch of random 32x32 images: each epoch is one optimizer step."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (BATCH,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH)


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
        layers = [f"{name}.weight" for name, layer in select_layers(pl_module).items() if layer.weight.dim() == 2]
        self.sparsifier.prepare(pl_module, [{"tensor_fqn": fqn} for fqn in layers])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.sparsifier.step()


def variant_callbacks(name: str, model: pl.LightningModule, steps: int) -> list[pl.Callback]:
    """The callbacks of one variant, every schedule spanning the whole run so each step does pruning work."""
    schedule = CubicSchedule(SPARSITY, 0, steps)
    if name == "dense":
        return []
    if name == "st3":
        return [SparsityCallback("st3", SPARSITY, start=schedule.start, end=schedule.end)]
    if name == "str":
        return [SparsityCallback("str", s_init=-5.0, threshold_decay=5e-3)]
    if name == "modelpruning":
        # ModelPruning calls `amount(epoch)` after epoch `epoch`, i.e. after optimizer step epoch + 1.
        amounts = cubic_increments(schedule, range(1, steps + 1))
        return [model_pruning(model, lambda epoch: amounts[epoch])]
    if name == "modelpruning_masked":
        # Pruned once, after the first (warm-up) step: later steps only pay for its masks.
        return [model_pruning(model, lambda epoch: SPARSITY if epoch == 0 else 0.0)]
    if name == "weightnorm":
        return [WeightNormEveryStep(SPARSITY)]
    raise ValueError(f"unknown variant {name!r}")


class Baton:
    """Lets one training thread run at a time, following a fixed list of turns (thread names)."""

    def __init__(self, turns: Sequence[str]) -> None:
        self._turns = list(turns)
        self._index = 0
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turns[self._index] == name)

    def pass_on(self) -> None:
        with self._condition:
            self._index += 1
            self._condition.notify_all()

    def finish(self, name: str) -> None:
        """Hand over for good: `name`'s remaining turns, if it stopped early on an error, are dropped."""
        with self._condition:
            later = [turn for turn in self._turns[self._index + 1 :] if turn != name]
            self._turns[self._index + 1 :] = later
            self._index += 1
            self._condition.notify_all()


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
    """Times whole steps (batch start to next batch start); hands the baton on every `block` steps."""

    def __init__(self, name: str, baton: Baton, block: int) -> None:
        self.name, self.baton, self.block = name, baton, block
        self.clock = HookClock()
        self.times: list[float] = []
        self.hook_times: list[float] = []  # the part of each step spent in the variant's mask-updating hooks
        self._last: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
            self.hook_times.append(self.clock.take())
            if len(self.times) % self.block == 0:
                self.baton.pass_on()
                self.baton.wait(self.name)
        self._last = time.perf_counter()  # the wait for the baton is not part of any step

    def edges(self) -> tuple[HookEdge, HookEdge]:
        """The callbacks to place just before and just after the variant's own."""
        return HookEdge(self.clock, opening=True), HookEdge(self.clock, opening=False)


def fit_variant(name: str, steps: int, first: Sequence[pl.Callback] = (), last: Sequence[pl.Callback] = ()) -> None:
    """Train variant `name` for `steps` optimizer steps, with `first` and `last` around its callbacks."""
    torch.manual_seed(0)  # the same initial weights for every variant
    model = Classifier()
    callbacks = [*first, *variant_callbacks(name, model, steps), *last]
    trainer(callbacks, max_epochs=steps).fit(model, one_batch_loader())


def measure_times(names: Sequence[str], steps: int, block: int) -> dict[str, StepTimer]:
    """Per-step seconds of each variant over `steps` steps (a multiple of `block`), in interleaved blocks.

    Round r runs one block of each variant, starting at variant r (a rotation), so no variant always
    follows the same other one; a last round runs each variant's final, untimed step and teardown.
    """
    rounds = steps // block + 1
    baton = Baton([name for r in range(rounds) for name in [*names[r % len(names) :], *names[: r % len(names)]]])
    timers = {name: StepTimer(name, baton, block) for name in names}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        baton.wait(name)
        try:
            # One step more than timed: the last step has no next batch start to end its interval.
            opening, closing = timers[name].edges()
            fit_variant(name, steps + 1, first=[timers[name], opening], last=[closing])
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=run, args=(name,), name=name) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return timers


def measure_memory(name: str, steps: int) -> dict[str, float]:
    """Peak RSS of a fresh process training `name` for `steps` steps, and its growth during training.

    The peak is reset after imports and data; growth = that peak minus the RSS before the model
    existed: what the model, optimizer state, activations and the sparsity method needed at their peak.
    """
    output = subprocess.run(
        [sys.executable, __file__, "--memory-probe", name, "--steps", str(steps)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def memory_probe(name: str, steps: int) -> None:
    """Body of the subprocess behind `measure_memory`: prints one JSON line."""
    one_batch_loader()  # the data, and torch's first allocations, belong to the baseline
    reset_peak_rss()
    baseline = rss_mib("VmRSS")
    with redirect_stdout(io.StringIO()):
        fit_variant(name, steps)
    peak = rss_mib("VmHWM")
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "growth_mib": peak - baseline}))


def op_seconds(name: str, steps: int) -> dict[str, float]:
    """Self CPU seconds per step of every op over `steps` steps of variant `name`, after two warm-up steps."""
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
        fit_variant(name, steps + 3, first=[profiled])
    return {event.key: event.self_cpu_time_total / 1e6 / steps for event in profiled.profiler.key_averages()}


def op_differences(names: Sequence[str], steps: int, top: int, rounds: int = 3) -> list[dict[str, Any]]:
    """For each variant, the `top` ops whose self CPU time per step grew most over dense's.

    Dense and the variants are profiled in turn, `rounds` times, and each op's time is the median over
    rounds, so a burst of load from other jobs during one profile does not land on one variant alone.
    """
    order = ["dense", *names]
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in order}
    for _ in range(rounds):
        for name in order:
            samples[name].append(op_seconds(name, steps))

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
    timers: dict[str, StepTimer], warmup: int, block: int, memory: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """Median step time, ratios to dense, the mask-update hooks' share and peak memory, one row per variant."""
    steps = {name: timer.times[warmup:] for name, timer in timers.items()}
    hooks = {name: timer.hook_times[warmup:] for name, timer in timers.items()}
    dense = statistics.median(steps["dense"])

    def per_block(values: list[float]) -> list[float]:
        return [statistics.median(values[i : i + block]) for i in range(0, len(values), block)]

    rows = []
    for name, values in steps.items():
        # Blocks of the same round ran back to back: their ratio shows how steady the comparison is.
        round_ratios = [v / d for v, d in zip(per_block(values), per_block(steps["dense"]), strict=True)]
        rest = [step - hook for step, hook in zip(values, hooks[name], strict=True)]
        rows.append(
            {
                "variant": name,
                "steps": len(values),
                "median_s": statistics.median(values),
                "mean_s": statistics.mean(values),
                "ratio": statistics.median(values) / dense,
                "round_ratio_min": min(round_ratios),
                "round_ratio_max": max(round_ratios),
                "hooks_s": statistics.median(hooks[name]),
                "rest_over_dense_s": statistics.median(rest) - dense,
                **{key: memory[name][key] for key in ("peak_mib", "growth_mib")},
                "peak_ratio": memory[name]["peak_mib"] / memory["dense"]["peak_mib"],
                "growth_ratio": memory[name]["growth_mib"] / memory["dense"]["growth_mib"],
            }
        )
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [
        "Variant", "Median step (ms)", "Ratio to dense", "Per-round ratios", "Mask-update hooks (ms)",
        "Rest of step vs dense (ms)", "Peak RSS (MiB)", "Peak ratio", "RSS growth (MiB)", "Growth ratio",
    ]  # fmt: skip
    return markdown_table(
        headers,
        [
            [
                LABELS[r["variant"]],
                f"{1000 * r['median_s']:.0f}",
                f"**{r['ratio']:.3f}**",
                f"{r['round_ratio_min']:.2f}–{r['round_ratio_max']:.2f}",
                f"{1000 * r['hooks_s']:.0f}",
                f"{round(1000 * r['rest_over_dense_s']):+d}",
                f"{r['peak_mib']:.0f}",
                f"{r['peak_ratio']:.3f}",
                f"{r['growth_mib']:.0f}",
                f"{r['growth_ratio']:.2f}",
            ]
            for r in rows
        ],
    )


def verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The step-time targets, in words: ratio <= 1.05, and not slower than ModelPruning pruning every step."""
    by_name = {r["variant"]: r for r in rows}
    lines = []
    for name in ("st3", "str"):
        if name not in by_name:
            continue
        ratio = by_name[name]["ratio"]
        met = "meets" if ratio <= 1.05 else "**misses**"
        line = f"- {LABELS[name].split(' (')[0]}: {ratio:.3f}x dense, {met} the 1.05 target"
        if "modelpruning" in by_name:
            faster = ratio <= by_name["modelpruning"]["ratio"]
            line += (
                f"; {'faster' if faster else '**slower**'} than ModelPruning pruning every step "
                f"({by_name['modelpruning']['ratio']:.3f}x)"
            )
        lines.append(line + ".")
    return lines


def section(rows: Sequence[dict[str, Any]], profile: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    return "\n".join(
        [
            "## Step time and memory overhead (ResNet-18, CPU)",
            "",
            f"Command: `{meta['command']}`",
            "",
            machine_line(meta["machine_before"], meta["machine_after"]),
            "",
            f"torchvision ResNet-18 (num_classes=10), 32x32 inputs, batch {BATCH}, SGD Nesterov + per-step cosine, "
            f"{meta['threads']} torch threads. All variants train in one process, one thread each, taking turns in "
            f"blocks of {meta['block']} steps (round r starts with the r-th variant, so none always follows the same "
            f"one); {meta['steps']} timed steps each after {meta['warmup']} warm-up steps. A step is timed from one "
            "`on_train_batch_start` to the next (forward, backward, optimizer and scheduler steps, every callback's "
            "hooks, the next batch). Ratio = median step / dense median step; per-round ratios compare each "
            "round's block medians with dense's in the same round and show the spread. Mask-update hooks = median "
            "time per step in the variant's `on_train_batch_end` and `on_train_epoch_end` (ST-3's threshold update, "
            "ModelPruning's pruning, `WeightNormSparsifier.step()`); rest of step vs dense = median of (step minus "
            "hooks) minus dense's median step: mostly what the reparameterization adds to forward and backward. "
            "Target sparsity 90 %. ST-3's and ModelPruning's cubic schedules span the whole run, so every timed step "
            "recomputes the masks of both; in real runs ST-3 keeps doing so at its final sparsity after `end`, while "
            "ModelPruning prunes once per epoch. Memory: peak RSS (VmHWM, reset after imports and data) of a "
            f"separate process per variant running {meta['memory_steps']} steps; growth = that peak minus the RSS "
            "before the model existed, i.e. what the model, optimizer state, activations and sparsity method needed.",
            "",
            table(rows),
            "",
            *verdict(rows),
            "",
            "Where the extra time goes: the ops whose self CPU time per step grew most over dense's "
            f"(`torch.profiler`, {meta['profile_steps']} steps per variant after two warm-up steps, dense and each "
            "variant profiled in turn three times, median per op; the profiler's own overhead inflates small ops).",
            "",
            profile_table(profile),
            "",
            NOTES,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before those")
    parser.add_argument("--block", type=int, default=5, help="steps per variant before handing over")
    parser.add_argument("--memory-steps", type=int, default=4)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--profile", choices=VARIANTS, help="only print the ops this variant adds to dense's step")
    parser.add_argument("--memory-probe", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    silence()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.steps)
        return
    if args.profile:
        print(profile_table(op_differences([args.profile], args.profile_steps, top=15)))
        return
    if args.warmup % args.block or args.steps % args.block:
        parser.error("--warmup and --steps must be multiples of --block, so that rounds align")

    names = ["dense", *(v for v in args.variants if v != "dense")]
    before = machine()
    with redirect_stdout(io.StringIO()):  # SparsityCallback's per-layer tables
        timers = measure_times(names, args.warmup + args.steps, args.block)
    memory = {name: measure_memory(name, args.memory_steps) for name in names}
    profile = op_differences([n for n in names if n in ("st3", "str")], args.profile_steps, top=6)
    rows = summarize(timers, args.warmup, args.block, memory)
    meta = {
        "command": command_line(),
        "steps": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "memory_steps": args.memory_steps,
        "profile_steps": args.profile_steps,
        "threads": torch.get_num_threads(),
        "machine_before": before,
        "machine_after": machine(),
    }
    print(table(rows))
    print("\n".join(verdict(rows)))
    print(profile_table(profile))
    raw = {
        "times": {name: timer.times for name, timer in timers.items()},
        "hook_times": {name: timer.hook_times for name, timer in timers.items()},
    }
    publish(
        "step_time", {**meta, "rows": rows, "memory": memory, "profile": profile, **raw}, section(rows, profile, meta)
    )


NOTES = """\
Notes:

- ResNet-18 on 32x32 inputs is a worst case for weight-proportional costs: 11.2 M weights but only
  37 M MACs per sample (`layer_stats`), so everything a method does per weight and per step weighs
  far more against the step than at 224x224 (49x the MACs for the same weights) or with the usual
  CIFAR stem (`examples/cifar_resnet.py`: 15x).
- ST-3's extra work per step is the threshold update after the optimizer step (the hooks column: |w|,
  a sampled bracket and the exact selection, `nonzero`/`index`, for the global quantile, the mask and
  the per-channel rescale sums: about ten passes over the weights, some three SGD steps' worth; the
  threshold-scaling section times it alone) and the soft threshold and rescale in the forward (`clamp`,
  `sub`, `mul`: three passes). Both scale with the weights, not with batch or input size: the same
  absolute cost would be well under 1 % of a step at 224x224.
- STR: under plain autograd, the clamp backward with tensor bounds of its forward `w - clamp(w, -g, g)`
  makes the reparameterization's forward + backward cost about 0.3 s per step here (1.27x dense in a
  short run of this script), against 0.1 s with the hand-written backward it uses, which gives the same
  gradients of `sign(w) * relu(|w| - g)`.
- ModelPruning has no per-step setting: it prunes in `on_train_epoch_end` (or `on_validation_epoch_end`).
  The one-batch epochs here make it prune after every step with its own code. "Between prunes" is its
  usual step: a forward pre-hook multiplies `weight_orig` by a float mask. Its memory holds `weight_orig`,
  the float mask and the masked weight for every pruned layer.
- ST-3 and STR memory: the effective weights are held for the backward (4 bytes per weight), ST-3 keeps a
  1-byte mask and its update takes |w| (4 bytes per weight) while it runs.
- \\* WeightNormSparsifier fails on 4-D conv weights (it builds its mask over a weight's last two
  dimensions: `RuntimeError: shape '[1, 1, N]' is invalid for input of size 9`), so on ResNet-18 it can
  only sparsify the fc layer; its row is not comparable per-step work.
"""


if __name__ == "__main__":
    main()
