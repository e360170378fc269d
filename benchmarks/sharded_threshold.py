"""ST-3's threshold update on sharded weights (FSDP2 layout), 1 and 2 processes, at 10 M and 50 M weights.

The weights have ResNet-50's shapes scaled to each size (as `threshold_scaling.py`). With 2 processes
(gloo, one torch thread each, on this machine's CPU cores) each rank holds its block of rows of every weight
as a `DTensor` sharded `Shard(0)`, as `fully_shard` leaves it, and ST-3's state is sharded like it; with 1
process the weights are plain tensors (a single-device run). Per run:

- the median wall time of `update_thresholds` at 90 % sparsity (rescale on) over a few calls, slowest rank;
- the bytes each rank receives through collectives in one update (counted by wrapping
  `torch.distributed.all_gather` and `all_reduce` in this script), against the 4 bytes per weight that
  gathering the weights would take;
- per-rank memory: the bytes of ST-3's state each rank stores (its buffers' local storage: the rescale's shards and
  the threshold; the mask is derived from the weight until frozen),
  and the peak resident memory the first update takes above what the rank already holds (VmHWM after a
  reset, minus VmRSS before).

    .venv/bin/python benchmarks/sharded_threshold.py
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

from common import command_line, machine, machine_line, markdown_table, publish, reset_peak_rss, rss_mib
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.sharding import local_shard
from threshold_scaling import scaled_shapes

SIZES = (10_000_000, 50_000_000)
SPARSITY = 0.9


def _weights(target: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's rows of each weight (`torch.chunk`'s split, as FSDP2's), as DTensors when `world` > 1."""
    mesh = init_device_mesh("cpu", (world,)) if world > 1 else None
    weights = []
    for i, shape in enumerate(scaled_shapes(target)):
        generator = torch.Generator().manual_seed(i)
        full = torch.randn(shape, generator=generator) * (2 / max(1, torch.Size(shape[1:]).numel())) ** 0.5
        if mesh is None:
            weights.append(full)
            continue
        chunks = list(torch.chunk(full, world))
        local = chunks[rank].clone() if rank < len(chunks) else full[:0].clone()
        weights.append(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=full.shape,
                                          stride=full.stride()))  # fmt: skip
    return weights


class _Received:
    """Counts the bytes this rank receives through `all_gather` and `all_reduce`, by wrapping them."""

    def __init__(self) -> None:
        self.bytes = 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

        def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.bytes += sum(t.nbytes for t in outputs) - tensor.nbytes
            return self._gather(outputs, tensor, *args, **kwargs)

        def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.bytes += tensor.nbytes
            return self._reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce  # type: ignore[assignment]


def _run(rank: int, world: int, target: int, repeats: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    received = _Received() if world > 1 else None
    weights = _weights(target, rank, world)
    layers = [StraightThroughSoftThreshold(weight) for weight in weights]
    state = sum(local_shard(b).untyped_storage().nbytes() for layer in layers for b in layer.buffers())
    reset_peak_rss()
    before = rss_mib("VmRSS")
    update_thresholds(layers, weights, SPARSITY)
    peak = rss_mib("VmHWM") - before
    communicated = received.bytes if received is not None else 0
    times = []
    for _ in range(repeats):
        if world > 1:
            dist.barrier()
        started = time.perf_counter()
        update_thresholds(layers, weights, SPARSITY)
        times.append(time.perf_counter() - started)
    pruned = sum(int((~local_shard(layer.keep_mask(w))).sum()) for layer, w in zip(layers, weights, strict=True))
    result = {
        "rank": rank, "update_s": statistics.median(times), "received_bytes": communicated, "state_bytes": state,
        "update_peak_mib": peak, "pruned": pruned, "weights": sum(w.numel() for w in weights),
        "local_weights": sum(local_shard(w).numel() for w in weights),
    }  # fmt: skip
    torch.save(result, Path(out) / f"rank{rank}.pt")
    if world > 1:
        dist.destroy_process_group()


def measure(target: int, world: int, repeats: int) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_run, args=(world, target, repeats, port, out), nprocs=world)
        ranks = [torch.load(Path(out) / f"rank{rank}.pt") for rank in range(world)]
    weights = ranks[0]["weights"]
    assert sum(r["pruned"] for r in ranks) == round(SPARSITY * weights), "the sharded update missed the target"
    return {
        "weights": weights,
        "processes": world,
        "update_s": max(r["update_s"] for r in ranks),
        "received_bytes": max(r["received_bytes"] for r in ranks),
        "state_bytes": max(r["state_bytes"] for r in ranks),
        "local_weights": max(r["local_weights"] for r in ranks),
        "update_peak_mib": max(r["update_peak_mib"] for r in ranks),
    }


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["Prunable weights", "Processes", "Update (ms)", "Received per rank (KiB)",
               "Received / gathering the weights", "ST-3 state per rank (MiB)", "Weights per rank",
               "Update peak per rank (MiB)"]  # fmt: skip
    return markdown_table(headers, [[
        f"{r['weights'] / 1e6:.1f} M", r["processes"], f"{1000 * r['update_s']:.0f}",
        f"{r['received_bytes'] / 1024:.0f}",
        f"{r['received_bytes'] / (4 * r['weights']):.2%}" if r["processes"] > 1 else "-",
        f"{r['state_bytes'] / 2**20:.1f}", f"{r['local_weights'] / 1e6:.1f} M", f"{r['update_peak_mib']:.0f}",
    ] for r in rows])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    before = machine()
    rows = []
    for size in args.sizes:
        for world in (1, 2):
            rows.append(measure(size, world, args.repeats))
            print(f"{rows[-1]['weights']:,} weights, {world} process(es): {1000 * rows[-1]['update_s']:.0f} ms, "
                  f"{rows[-1]['received_bytes']:,} bytes received per rank", flush=True)  # fmt: skip
    after = machine()
    print(table(rows))
    section = f"""## ST-3 threshold update on sharded weights (FSDP2)

`{command_line()}`: one `update_thresholds` at 90 % sparsity over ResNet-50's shapes scaled to each size, on
plain tensors (1 process) or on `Shard(0)` DTensors split over 2 gloo processes as `fully_shard` leaves them
(one torch thread per process). Time is the median of {args.repeats} calls, slowest rank; "received" counts
the bytes a rank receives through collectives in one update (wrapping `all_gather`/`all_reduce`), against the
4 bytes per weight that gathering the weights would take; the state is the storage of the rank's ST-3 buffers
(rescale shards and threshold: the mask is derived from the weight until frozen); the peak is the first update's
resident-memory high-water mark above what the rank held.
Every run prunes exactly round(0.9 x n) weights over all ranks.

{table(rows)}

{machine_line(before, after)}
"""
    publish("sharded_threshold", {"command": command_line(), "rows": rows, "machine_before": before,
                                  "machine_after": after}, section)  # fmt: skip


if __name__ == "__main__":
    main()
