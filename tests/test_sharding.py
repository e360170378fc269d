"""Sharded training under FSDP2: the sharded selection and method state on 2 gloo processes (no Trainer), and
real 2-process `ModelParallelStrategy` fits with `fully_shard` for every method (tests/fsdp_fit.py)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from fsdp_fit import METHODS, N_WEIGHTS, TARGET, ShardedNet
from lightning_sparse import SparsityCallback
from lightning_sparse.checkpoint import harden_state_dict
from lightning_sparse.layers import select_weights
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold, calibrate_thresholds
from lightning_sparse.sharding import local_shard
from lightning_sparse.thresholds import floored_magnitude_thresholds, kth_smallest
from models import TinyNet, assert_untouched, make_trainer, model_tensors

TESTS = Path(__file__).parent
WORLD = 2


def _inputs() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Weights big enough for the bracketed selection (over 2 x 2^16 entries), with odd row counts; and values
    whose strided sample is all zeros, so the sample's bracket misses and the selection must recover."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(rows, cols, generator=generator) * scale for rows, cols, scale in
               [(301, 256, 1.0), (97, 512, 0.3), (5, 7, 2.0), (1001, 64, 0.5)]]  # fmt: skip
    # 2 x 2^16 x 2 entries: stride 2, and each rank's shard of rows starts at an even entry.
    tricky = torch.rand(2 * 65536 * 2, generator=generator) + 1.0
    tricky[::2] = 0.0
    return weights, [tricky.reshape(-1, 8)]


def _selections(weights: list[torch.Tensor], tricky: list[torch.Tensor]) -> dict[str, Any]:
    """What the tests compare between one process and two: run on full tensors, or (sharded) on DTensors."""
    results: dict[str, Any] = {}
    magnitudes = [local_shard(w).abs() for w in weights]
    group = dist.group.WORLD if dist.is_initialized() else None
    n = sum(w.numel() for w in weights)
    results["kth"] = [kth_smallest(magnitudes, k, scales=[1.0, 2.0, 0.5, 1.5], group=group) for k in (1, 7, n // 3, n)]
    results["tricky"] = [kth_smallest([local_shard(t) for t in tricky], k, group=group) for k in (10, 200_000)]
    results["floored"] = floored_magnitude_thresholds(magnitudes, 0.95, [0, 100, 5, 0], group=group)
    st3 = [StraightThroughSoftThreshold(w) for w in weights]
    results["st3_tau"] = update_thresholds(st3, weights, 0.9, sigma=True, min_density=0.01)
    results["st3_state"] = [
        (_full(p.keep_mask(w)), _full(p.scale), p.threshold.clone()) for p, w in zip(st3, weights, strict=True)
    ]
    str_ = [LearnedSoftThreshold(s_init=s) for s in (-3.0, -4.0, -2.0, -3.5)]
    results["str_delta"] = calibrate_thresholds(str_, weights, 0.8)
    results["str_s"] = [p.s.detach().clone() for p in str_]
    return results


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _sharded_selections(rank: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    weights, tricky = _inputs()
    shard = [distribute_tensor(w, mesh, [Shard(0)]) for w in weights]
    results = _selections(shard, [distribute_tensor(t, mesh, [Shard(0)]) for t in tricky])
    results["local_sizes"] = [local_shard(w).numel() for w in shard]
    # Refused by name before anything changes: state that cannot be sharded like its weight, and a mix of sharded
    # and unsharded sparsified weights.
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    fully_shard(net[0], mesh=mesh)
    refusals = []
    for model, kwargs in ((net[0], {"output_axes": {nn.Linear: 1}}), (net, {})):
        try:
            select_weights(model, **kwargs)
        except ValueError as error:
            refusals.append(str(error))
    results["refusals"] = refusals
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sharded_selection_and_state_match_one_process_exactly(tmp_path: Path) -> None:
    # Real gloo collectives between 2 processes, each holding a block of rows of every weight (uneven blocks).
    mp.spawn(_sharded_selections, args=(_free_port(), tmp_path), nprocs=WORLD)
    expected = _selections(*_inputs())
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    weights, _ = _inputs()
    for rank in ranks:
        refusals = rank.pop("refusals")
        assert len(refusals) == 2
        assert "'': its output channels run along axis 1, and FSDP2 shards axis 0" in refusals[0]
        assert "must all be sharded over one device mesh, or none of them" in refusals[1]
        # Each rank stores half its rows of each weight, not a full copy.
        assert [sum(r["local_sizes"][i] for r in ranks) for i in range(len(weights))] == [w.numel() for w in weights]
        for key, value in expected.items():
            assert _equal(rank[key], value), key


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ------------------------------------------------------------------------------------- Trainer, 2 processes

FIT_TIMEOUT = 300  # about 40 s when nothing hangs


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, str(TESTS / "fsdp_fit.py"), str(out), *METHODS],
        env=env, capture_output=True, text=True, timeout=FIT_TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    (out / "output.txt").write_text(run.stdout + run.stderr)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_fit_reaches_the_target_and_hardens_to_a_plain_model(fsdp_runs: Path, method: str) -> None:
    hardened = torch.load(fsdp_runs / f"{method}_full_hardened.pt", weights_only=True)
    plain = ShardedNet()
    plain.load_state_dict(hardened, strict=True)  # the unmodified model's keys, gathered from the shards
    zeros = sum(int((layer.weight == 0).sum()) for layer in plain.net if isinstance(layer, torch.nn.Linear))
    sparse = torch.load(fsdp_runs / f"{method}_full_sparse.pt", weights_only=True)
    masks = [value for key, value in sparse.items() if key.endswith(".mask")]
    if masks:  # ST-3: exactly round(target x n) pruned over the full weights
        assert sum(int((~mask).sum()) for mask in masks) == round(TARGET * N_WEIGHTS)
    # The hardened zeros are exactly those (ST-3σ's too: its layers shrink at `shrink_for`).
    assert zeros == round(TARGET * N_WEIGHTS)
    # The sharded parametrizations computed what one process computes from the same full state.
    one_process = harden_state_dict(sparse)
    assert one_process.keys() == hardened.keys()
    assert all(torch.equal(one_process[key], hardened[key]) for key in hardened)


@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp2_ranks_agree_state_is_sharded_and_resume_is_exact(fsdp_runs: Path, method: str) -> None:
    records = [torch.load(fsdp_runs / f"{method}_full_rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    # Thresholds (ST-3's tau, STR's s) are replicated, and identical on both ranks.
    replicated = [record["replicated"] for record in records]
    assert replicated[0] and replicated[0].keys() == replicated[1].keys()
    assert all(torch.equal(replicated[0][key], replicated[1][key]) for key in replicated[0])
    # Masks and rescales are sharded like their weight: each rank holds its rows, together the whole.
    for key, (local, total, nbytes) in records[0]["sizes"].items():
        other_local, _, other_bytes = records[1]["sizes"][key]
        assert local + other_local == total and local < total, key
        if not key.endswith(".raw"):
            assert nbytes + other_bytes == total * (1 if key.endswith(".mask") else 4), key
    resumed = torch.load(fsdp_runs / f"{method}_resumed_hardened.pt", weights_only=True)
    full = torch.load(fsdp_runs / f"{method}_full_hardened.pt", weights_only=True)
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[key], full[key]) for key in full)


def test_fsdp2_logs_global_counts_once(fsdp_runs: Path) -> None:
    for method in METHODS:
        assert [p.name for p in (fsdp_runs / f"{method}_full").iterdir()] == ["version_0"]
        with open(fsdp_runs / f"{method}_full" / "version_0" / "metrics.csv") as file:
            rows = [row for row in csv.DictReader(file) if row["sparsity/global"]]
        assert float(rows[-1]["sparsity/global"]) == pytest.approx(round(TARGET * N_WEIGHTS) / N_WEIGHTS)
    output = (fsdp_runs / "output.txt").read_text()
    # The end-of-fit table, from rank zero only: once per fit, 3 fits per method.
    assert output.count("lightning-sparse: per-layer budget") == 3 * len(METHODS)


class _CPUFSDP(FSDPStrategy):
    """Lightning refuses `FSDPStrategy` on a CPU by its exact type; a subclass reaches the callback's setup."""


def test_fsdp1_is_refused_at_setup_naming_the_fix(tmp_path: Path) -> None:
    model = TinyNet()
    before = model_tensors(model)
    trainer = make_trainer(tmp_path, strategy=_CPUFSDP(), callbacks=[SparsityCallback("st3", 0.5)])
    with pytest.raises(ValueError, match=r"does not support `FSDPStrategy`.*ModelParallelStrategy.*fully_shard"):
        trainer.fit(model)
    assert_untouched(model, before)
