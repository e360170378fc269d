"""ST-3's `min_density` against whole layers pruned away: torchvision MobileNetV3-Small and EfficientNet-B0.

With one global magnitude threshold, a layer whose weights are small next to the others' can lose every
weight: torchvision initialises MobileNetV3's classifier Linears at std 0.01 against He-initialised convs.
Each model (num_classes=10, no pretrained weights) trains on synthetic, learnable data three ways: dense,
ST-3 with its defaults at 90 % (cubic ramp from 5 % to 50 % of the run, rescale on), and the same with
`min_density`. Every run of a model: same seed, data, recipe (SGD Nesterov, cosine per step, batch 64); only
the callback differs. MobileNetV3-Small trains at two learning rates; EfficientNet-B0 also without ST-3's
channel rescale, with and without the minimum (see `RUNS`). Reported: the
training loss over the last epoch, the layers fully pruned at the end (hardened model) and the sparsest
layer, the accuracy on held-out data and the sparse FLOPs; and the cost of one threshold update with and
without the minimum, on each model's initial weights (where the minimum already binds).

Data: 10 classes, each a fixed random low-frequency 3x32x32 pattern; a sample is its class's pattern at a
random amplitude in [0.5, 1.5], shifted by up to 4 pixels, plus white noise of std 1. The held-out set is
drawn the same way from another generator.

    .venv/bin/python benchmarks/min_density.py             # both models, publishes RESULTS.md
    .venv/bin/python benchmarks/min_density.py --quick     # fewer steps; results/min_density_quick.json only
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
import warnings
from collections.abc import Sequence
from contextlib import redirect_stdout
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from common import RESULTS_DIR, command_line, machine, machine_line, markdown_table, publish, silence, trainer
from lightning_sparse import ST3, SparsityCallback, layer_stats
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds

# Learning rates per model: at 0.05 MobileNetV3's classifier grows out of reach of the threshold during the dense
# first 5 % of the run, at 0.005 it does not (dense trains to a low loss at both).
MIN_DENSITY = 0.02
# Each variant: ST3's settings besides the target (None: dense).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "st3": {},
    "st3_min_density": {"min_density": MIN_DENSITY},
    "st3_no_rescale": {"rescale": False},
    "st3_no_rescale_min_density": {"rescale": False, "min_density": MIN_DENSITY},
}
LABELS = {
    "dense": "Dense",
    "st3": "ST-3 90 %",
    "st3_min_density": f"ST-3 90 %, `min_density={MIN_DENSITY}`",
    "st3_no_rescale": "ST-3 90 %, `rescale=False`",
    "st3_no_rescale_min_density": f"ST-3 90 %, `rescale=False, min_density={MIN_DENSITY}`",
}
BASIC = ("dense", "st3", "st3_min_density")
# EfficientNet-B0 still fails to train with the minimum alone; the channel rescale turned out to be the cause.
RUNS = {
    "mobilenet_v3_small": [(lr, variant) for lr in (0.05, 0.005) for variant in BASIC],
    "efficientnet_b0": [(0.05, variant) for variant in VARIANTS],
}
MODELS = tuple(RUNS)
SPARSITY = 0.9
CLASSES, SIZE, TRAIN, TEST, BATCH = 10, 32, 2048, 1024, 64
STEPS = 480  # 15 epochs of 32 batches
SEED = 0


def make_data(count: int, seed: int) -> TensorDataset:
    """`count` samples of the class patterns (fixed by `SEED`), with amplitude, shift and noise from `seed`."""
    patterns = torch.nn.functional.interpolate(
        torch.randn(CLASSES, 3, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(SEED)),
        size=(SIZE, SIZE),
        mode="bilinear",
    )
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(CLASSES, (count,), generator=generator)
    amplitude = torch.empty(count, 1, 1, 1).uniform_(0.5, 1.5, generator=generator)
    shifts = torch.randint(-4, 5, (count, 2), generator=generator).tolist()
    shifted = torch.stack(
        [patterns[y].roll(tuple(s), dims=(1, 2)) for y, s in zip(labels.tolist(), shifts, strict=True)]
    )
    images = amplitude * shifted + torch.randn(count, 3, SIZE, SIZE, generator=generator)
    return TensorDataset(images, labels)


class Classifier(pl.LightningModule):
    """A torchvision model trained with SGD Nesterov (momentum 0.9, weight decay 5e-5) at `lr`, cosine per step."""

    def __init__(self, name: str, steps: int, lr: float) -> None:
        super().__init__()
        self.model = getattr(torchvision.models, name)(num_classes=CLASSES)
        self.steps, self.lr = steps, lr
        self.losses: list[float] = []
        self.example_input_array = torch.zeros(1, 3, SIZE, SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def run(name: str, lr: float, variant: str, steps: int, train: TensorDataset, test: TensorDataset) -> dict[str, Any]:
    """Train `name` at `lr` as `variant` (a key of `VARIANTS`) and measure the hardened model."""
    torch.manual_seed(SEED)
    module = Classifier(name, steps, lr)
    callbacks = []
    settings = VARIANTS[variant]
    if settings is not None:
        callbacks.append(SparsityCallback(ST3(SPARSITY, **settings)))
    loader = DataLoader(train, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    started = time.perf_counter()
    # Keep the per-layer table SparsityCallback prints out of the figures; count its dead-layer warnings.
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        trainer(callbacks, max_steps=steps, max_epochs=-1).fit(module, loader)
    seconds = time.perf_counter() - started
    dead_warnings = [str(w.message) for w in caught if "fully pruned" in str(w.message)]
    recalibrate_batch_norm(module, train)
    with torch.no_grad():
        x, y = test.tensors
        accuracy = sum(
            int((module(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256), strict=True)
        )
    stats = layer_stats(module, module.example_input_array)
    sparsified = [s for s in stats if s.params]
    per_epoch = len(loader)
    sparsest = min(sparsified, key=lambda s: s.density)
    return {
        "model": name,
        "lr": lr,
        "variant": variant,
        "train_loss": statistics.mean(module.losses[-per_epoch:]),
        "test_accuracy": accuracy / len(y),
        "sparsity": 1 - sum(s.nonzeros for s in sparsified) / sum(s.params for s in sparsified),
        "layers": len(sparsified),
        "fully_pruned": [s.name for s in sparsified if s.fully_pruned],
        "fully_pruned_weights": sum(s.params for s in sparsified if s.fully_pruned),
        "min_layer_density": sparsest.density,
        "min_density_layer": sparsest.name,
        "dense_flops": sum(s.dense_flops for s in stats),
        "sparse_flops": sum(s.sparse_flops for s in stats),
        "dead_layer_warnings": len(dead_warnings),
        "seconds": round(seconds, 1),
    }


@torch.no_grad()
def recalibrate_batch_norm(module: nn.Module, data: TensorDataset) -> None:
    """Running BatchNorm statistics as the exact average over `data` under the final weights, then eval mode.

    MobileNetV3's BatchNorm momentum is 0.01: after a short run its running statistics still lag the
    weights, and held-out accuracy would measure that lag rather than the model.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    module.train()
    for (x,) in zip(data.tensors[0].split(256), strict=True):
        module(x)
    module.eval()


def update_cost(name: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of one ST-3 threshold update at 90 % on `name`'s freshly initialised weights."""
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)(num_classes=CLASSES)
    # Every conv and linear weight, as SparsityCallback selects them in these models.
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parametrizations = [StraightThroughSoftThreshold(w) for w in weights]
    costs = {}
    for label, min_density in (("without", 0.0), ("with", MIN_DENSITY)):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            update_thresholds(parametrizations, weights, SPARSITY, min_density=min_density)
            times.append(time.perf_counter() - started)
        costs[label] = 1000 * statistics.median(times)
    return costs


def section(rows: Sequence[dict[str, Any]], costs: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    table = [
        [
            row["model"],
            f"{row['lr']:g}",
            LABELS[row["variant"]],
            f"{row['train_loss']:.3f}",
            f"{100 * row['test_accuracy']:.1f}",
            f"{100 * row['sparsity']:.2f}%",
            f"{len(row['fully_pruned'])} of {row['layers']}",
            f"{100 * row['min_layer_density']:.3f}% (`{row['min_density_layer']}`)",
            f"{row['sparse_flops'] / 1e6:.2f} M ({100 * row['sparse_flops'] / row['dense_flops']:.0f}%)",
        ]
        for row in rows
    ]
    headers = ["Model", "LR", "Run", "Train loss (last epoch)", "Held-out acc. (%)", "Sparsity", "Layers fully pruned",
               "Lowest layer density", "Sparse FLOPs (MACs)"]  # fmt: skip
    notes = []
    for row in rows:
        if row["fully_pruned"]:
            shown = ", ".join(f"`{n}`" for n in row["fully_pruned"][:12])
            more = f" and {len(row['fully_pruned']) - 12} more" if len(row["fully_pruned"]) > 12 else ""
            notes.append(
                f"- {row['model']}, lr {row['lr']:g}, {LABELS[row['variant']]}: {shown}{more} "
                f"({row['fully_pruned_weights']:,} weights), named by {row['dead_layer_warnings']} warning(s) of "
                "SparsityCallback during the fit as it found them."
            )
    step_ms: dict[str, float] = {}
    for row in rows:
        if row["variant"] == "dense":
            step_ms.setdefault(row["model"], 1000 * row["seconds"] / meta["steps"])
    costs_note = ", ".join(f"{name} {ms:.0f} ms" for name, ms in step_ms.items())
    cost_rows = [[name, f"{c['without']:.1f}", f"{c['with']:.1f}"] for name, c in costs.items()]
    findings = []
    by_run = {(row["model"], row["lr"], row["variant"]): row for row in rows}
    for (name, lr, variant), row in by_run.items():
        dense, floored = by_run.get((name, lr, "dense")), by_run.get((name, lr, variant + "_min_density"))
        if not variant.startswith("st3") or variant.endswith("min_density") or dense is None or floored is None:
            continue
        findings.append(
            f"- {name}, lr {lr:g}, {LABELS[variant]}: {len(row['fully_pruned'])} layers fully pruned, train loss "
            f"{row['train_loss']:.3f} (dense {dense['train_loss']:.3f}), held-out {100 * row['test_accuracy']:.1f} % "
            f"(dense {100 * dense['test_accuracy']:.1f} %); with `min_density={MIN_DENSITY}` "
            f"{len(floored['fully_pruned'])} fully pruned, train loss {floored['train_loss']:.3f}, held-out "
            f"{100 * floored['test_accuracy']:.1f} %."
        )
    return f"""## ST-3 minimum density per layer (`min_density`)

Command: `{meta["command"]}` ({meta["minutes"]:.1f} min wall time, one process, one torch thread).

{machine_line(meta["machine"], meta["machine_after"])}

torchvision models with `num_classes=10` and random initialisation, {SIZE}x{SIZE} synthetic inputs (10 fixed
random low-frequency patterns at a random amplitude and shift, plus noise of std 1; {TRAIN} training and {TEST}
held-out samples), {meta["steps"]} optimizer steps of batch {BATCH}, SGD Nesterov (momentum 0.9) at the LR
shown with cosine decay per step, weight decay 5e-5, seed {SEED}; BatchNorm statistics recomputed on the
training set before the held-out evaluation (MobileNetV3's BatchNorm momentum is 0.01). ST-3: `ST3({SPARSITY})`
with its defaults (cubic ramp 5 % to 50 % of the run, rescale on), then the same with
`min_density={MIN_DENSITY}`; EfficientNet-B0 also without the per-output-channel rescale. Train loss is the
mean over the last epoch; fully pruned layers and FLOPs are counted on the hardened model (FLOPs: conv and
linear MACs per sample).

{markdown_table(headers, table)}

{chr(10).join(findings)}
{chr(10).join(notes)}

ST-3's per-output-channel rescale multiplies a channel by `1.01 / (r + 0.01)`, `r` the fraction of its L1 mass
kept: up to about 100 for a channel with almost nothing kept, which a layer held at a small minimum has in
numbers. Compare the rows with and without `rescale=False` before reading a dead layer as the cause of a
failed run.

Cost of one threshold update at 90 % on each model's weights (`update_thresholds`, median of
{meta["repeats"]} calls, ms):

{markdown_table(["Model", "Without `min_density`", f"With `min_density={MIN_DENSITY}`"], cost_rows)}

For scale, a whole dense training step (batch {BATCH}, {SIZE}x{SIZE}, one thread, fit time / steps): {costs_note}.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps; results/min_density_quick.json only")
    parser.add_argument("--steps", type=int, help=f"optimizer steps per run (default {STEPS}, 96 with --quick)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--repeats", type=int, default=5, help="threshold updates timed per model")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite RESULTS.md's section from results/min_density.json"
    )
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS_DIR / "min_density.json").read_text())
        meta = {key: value for key, value in saved.items() if key not in ("update_ms", "runs")}
        publish("min_density", saved, section(saved["runs"], saved["update_ms"], meta))
        return
    silence()
    torch.set_num_threads(1)
    steps = args.steps or (96 if args.quick else STEPS)
    before, started = machine(), time.perf_counter()
    train, test = make_data(TRAIN, seed=1), make_data(TEST, seed=2)
    rows, costs = [], {}
    for name in args.models:
        costs[name] = update_cost(name, args.repeats)
        print(
            f"{name}: threshold update {costs[name]['without']:.1f} ms, {costs[name]['with']:.1f} ms with min_density"
        )
        for lr, variant in RUNS[name]:
            row = run(name, lr, variant, steps, train, test)
            rows.append(row)
            print(
                f"{name:20s} lr {lr:<5g} {variant:26s} loss {row['train_loss']:.3f}  "
                f"acc {100 * row['test_accuracy']:5.1f}%  "
                f"sparsity {100 * row['sparsity']:.2f}%  fully pruned {len(row['fully_pruned'])}/{row['layers']}: "
                f"{row['fully_pruned']}  ({row['seconds']:.0f} s)",
                flush=True,
            )
    meta = {
        "command": command_line(),
        "machine": before,
        "machine_after": machine(),
        "minutes": (time.perf_counter() - started) / 60,
        "steps": steps,
        "repeats": args.repeats,
        "sparsity": SPARSITY,
        "min_density": MIN_DENSITY,
    }
    name = "min_density_quick" if args.quick else "min_density"
    publish(name, {**meta, "update_ms": costs, "runs": rows}, None if args.quick else section(rows, costs, meta))


if __name__ == "__main__":
    main()
