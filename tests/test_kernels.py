"""The fused CPU loops: where they serve, that they compute what the eager forms compute, and the fallback."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sparse import SparsityCallback, kernels
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from lightning_sparse.thresholds import _count_below_and_select
from models import LENGTH, Crash, TinyNet, make_trainer

LARGE = kernels.MIN_ELEMENTS * 4 + 5


@pytest.fixture
def eager_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine with no C compiler."""
    monkeypatch.setattr(kernels, "_loaded", {"library": None})


def test_the_loops_serve_only_large_contiguous_float32_cpu_tensors_outside_autograd():
    x = torch.linspace(-1, 1, LARGE)
    signs = kernels.signs_for(x)
    tracked = x.clone().requires_grad_()
    assert not kernels.soft_threshold_into(tracked, torch.empty_like(x), 0.5, signs)  # would not be differentiable
    assert not kernels.soft_threshold_into(x, torch.empty_like(x), 0.5, signs[1:])  # signs of another size
    assert kernels.soft_threshold_into(x, torch.empty_like(x), 0.5, signs)
    assert kernels.soft_threshold_backward_(tracked, signs) is None
    with torch.no_grad():
        assert kernels.soft_threshold_backward_(tracked, signs) is not None
        grad = torch.ones_like(x)
        small = grad[: kernels.MIN_ELEMENTS - 1]
        assert kernels.soft_threshold_backward_(small, signs[: len(small) // 16 + 1]) is None
        assert kernels.soft_threshold_backward_(grad.double(), signs) is None
        assert kernels.soft_threshold_backward_(grad[::2], signs[: len(grad[::2]) // 16 + 1]) is None
        assert kernels.soft_threshold_backward_(grad, signs.long()) is None
        assert torch.equal(grad, torch.ones_like(x))  # nothing written where the loop does not serve
        assert kernels.soft_threshold_backward_(grad, signs) is not None


@pytest.mark.parametrize(
    ("compiler", "reason"),
    [("no-such-cc", "no C compiler"), ("false", "failed to compile them")],
    ids=["missing", "failing"],
)
def test_a_missing_or_failing_compiler_warns_once_and_leaves_the_eager_forms(
    compiler: str, reason: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(kernels, "_loaded", {})
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    values = torch.rand(LARGE)
    with pytest.warns(RuntimeWarning, match=rf"could not build its fused CPU loops .*{reason}.*`CC`"):
        assert kernels.count_below_and_select(values, 0.2, 0.3, expected=10) is None
    assert kernels.count_below_and_select(values, 0.2, 0.3, expected=10) is None  # no second warning
    below, inside, _ = _count_below_and_select(values, 0.2, 0.3, expected=10)  # the eager form answers
    assert below == int((values < 0.2).sum()) and inside.numel() == int(((values >= 0.2) & (values <= 0.3)).sum())


def test_the_library_is_built_once_into_the_cache_and_loaded_from_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kernels._build()
    built = list((tmp_path / "lightning-sparse").glob("kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels._build()
    assert [p.stat().st_mtime_ns for p in (tmp_path / "lightning-sparse").glob("kernels-*.so")] == [stamp]


def _str_gradients(weight: torch.Tensor, grad: torch.Tensor, str_: LearnedSoftThreshold) -> list[torch.Tensor]:
    str_.s.grad = None
    w = weight.clone().requires_grad_()
    str_(w).backward(grad)
    assert w.grad is not None and str_.s.grad is not None
    return [w.grad, str_.s.grad.clone()]


@pytest.mark.parametrize("shape", [(LARGE,), (96, 64, 3, 3)], ids=["flat", "conv"])
def test_str_fused_backward_gives_the_eager_gradients(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch):
    str_ = LearnedSoftThreshold(s_init=math.log(0.1 / 0.9))
    g = str_.threshold().item()
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.2
    weight.view(-1)[:3] = torch.tensor([g, -g, 0.0])  # ties are pruned and give nothing, as relu'(0) = 0
    grad = torch.randn_like(weight)
    fused = _str_gradients(weight, grad, str_)
    monkeypatch.setattr(kernels, "_loaded", {"library": None})
    eager = _str_gradients(weight, grad, str_)
    torch.testing.assert_close(fused[0], eager[0], rtol=0, atol=0)  # elementwise: the same bits
    torch.testing.assert_close(fused[1], eager[1], rtol=1e-5, atol=0)  # a sum, in another order


@pytest.mark.parametrize("expected", [10**6, 1], ids=["room", "second-pass"])
def test_fused_selection_finds_what_the_eager_comparisons_find(expected: int, monkeypatch: pytest.MonkeyPatch):
    generator = torch.Generator().manual_seed(1)
    for values in (torch.rand(LARGE, generator=generator), torch.rand(LARGE, generator=generator).round(decimals=2)):
        lo, hi = 0.3, 0.31
        fused = kernels.count_below_and_select(values, lo, hi, expected)
        assert fused is not None
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_loaded", {"library": None})
            eager = _count_below_and_select(values, lo, hi, expected)
        assert fused[0] == eager[0] == int((values < lo).sum())
        assert torch.equal(fused[1].sort().values, eager[1].sort().values)


@pytest.mark.parametrize("portable", [False, True], ids=["native", "portable"])
def test_fused_selection_of_magnitudes_matches_the_eager_one(
    portable: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if portable:  # the plain C loop, as on a CPU with neither AVX-512 nor AVX2 (a build without `-march=native`)
        monkeypatch.setattr(kernels, "_FLAG_SETS", (("-O3",),))
        monkeypatch.setattr(kernels, "_loaded", {})
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    values = torch.randn(LARGE, generator=torch.Generator().manual_seed(3))
    # In vector blocks and in the tail (the last 5): each counted as neither below nor inside, but as non-finite.
    values[[7, 300, 301, LARGE - 2]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    for absolute, lo, hi in ((True, 0.5, 0.52), (False, -0.52, -0.5)):
        fused = kernels.count_below_and_select(values, lo, hi, expected=LARGE, absolute=absolute)
        assert fused is not None
        magnitudes = values.abs() if absolute else values
        assert fused[0] == int((magnitudes < lo).sum())
        assert torch.equal(fused[1], magnitudes[(magnitudes >= lo) & (magnitudes <= hi)])  # in their order
        assert fused[2] == 4
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "_loaded", {"library": None})
            eager = _count_below_and_select(values, lo, hi, expected=LARGE, absolute=absolute)
        assert eager[2] == (4 if absolute else 0)  # STR's keys (not magnitudes) may be infinite


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(LARGE, generator=torch.Generator().manual_seed(4)),
        torch.randn(LARGE, generator=torch.Generator().manual_seed(5)).round(),  # a few values, many ties
        torch.ones(LARGE),
        torch.arange(float(LARGE)),
        torch.arange(float(LARGE)).flip(0),
    ],
    ids=["random", "ties", "equal", "sorted", "reversed"],
)
def test_fused_quickselect_gives_kthvalue(values: torch.Tensor) -> None:
    ranks = [LARGE, 1, 7, LARGE // 3, LARGE // 2, LARGE // 2, LARGE - 1]
    assert kernels.select_ranks(values.clone(), ranks) == [values.kthvalue(k).values.item() for k in ranks]
    with_nan = values.flip(0)
    with_nan[LARGE // 3] = math.nan
    before = with_nan.clone()
    assert kernels.select_ranks(with_nan, [1]) is None  # `kthvalue` has its own order for NaN
    assert torch.equal(with_nan.isnan(), before.isnan()) and torch.equal(with_nan.nan_to_num(), before.nan_to_num())


# (300, 1001): large enough for non-temporal stores, with rows starting at every alignment. The fused loop's pruned
# entries are +0; torch's softshrink gives some negative ones -0 (its vector and scalar paths differ).
@pytest.mark.parametrize(
    ("rescale", "width", "shape"),
    [
        (True, 1.0, (128, 64, 3, 3)),
        (False, 1.0, (128, 64, 3, 3)),
        (True, 11.0, (128, 64, 3, 3)),
        (False, 1.0, (300, 1001)),
    ],
    ids=["st3", "plain", "sigma", "plain-streamed"],
)
def test_fused_st3_update_sets_the_eager_mask_rescale_and_effective_weight(
    rescale: bool, width: float, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.05
    threshold = weight.abs().flatten().kthvalue(weight.numel() * 9 // 10).values.item() * width
    results, unpruned = [], []
    for loops in (True, False):
        with monkeypatch.context() as patch:
            if not loops:
                patch.setattr(kernels, "_loaded", {"library": None})
            st3 = StraightThroughSoftThreshold(weight, rescale=rescale)
            st3.set_threshold(weight, 0.0, width)
            unpruned.append(st3.scale.clone())
            st3.set_threshold(weight, threshold, width)
            results.append((st3.keep_mask(weight), st3.scale.clone(), st3(weight).detach()))
    # A channel with nothing pruned keeps all of its sum, in either form: its rescale is the same for all.
    assert torch.equal(unpruned[0], unpruned[1]) and unpruned[0].unique().numel() == 1
    (mask, scale, effective), (eager_mask, eager_scale, eager_effective) = results
    assert torch.equal(mask, eager_mask) and int((~mask).sum()) == weight.numel() * 9 // 10
    torch.testing.assert_close(scale, eager_scale, rtol=1e-6, atol=0)  # from a sum, in another order
    torch.testing.assert_close(effective, eager_effective, rtol=1e-6, atol=0)
    if not rescale:  # no sum to round differently: the same bits, but for the sign of a pruned negative's zero
        assert torch.equal(effective.view(torch.int32), (eager_effective + 0.0).view(torch.int32))


@pytest.mark.parametrize("shape", [(kernels.MIN_ELEMENTS + 3,), (300, 1001)], ids=["small", "streamed"])
def test_fused_soft_threshold_gives_torchs_softshrink(shape: tuple[int, ...]) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    out, signs = torch.empty_like(weight), kernels.signs_for(weight)
    weight.view(-1)[:2] = torch.tensor([0.6, -0.6])  # ties are pruned
    assert kernels.soft_threshold_into(weight, out, 0.6, signs)
    # The same bits, but for the sign of a pruned negative's zero (+0 here, sometimes -0 in torch's kernel).
    assert torch.equal(out.view(torch.int32), (nn.functional.softshrink(weight, 0.6) + 0.0).view(torch.int32))
    # Bit j of a block's word: entry j kept; bit 16 + j: kept and negative.
    flat, lane = weight.flatten(), torch.arange(weight.numel()) % 16
    words = signs.repeat_interleave(16)[: weight.numel()]
    kept = flat.abs() > 0.6
    assert torch.equal(words >> lane & 1, kept.int())
    assert torch.equal(words >> (lane + 16) & 1, (kept & (flat < 0)).int())


HUGE = (1 << 20) + 5  # split among threads (from 2**18 entries)


@pytest.fixture
def threads():
    """Sets torch's number of threads for the test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_loops_split_among_threads_give_the_same_bits_as_one_thread(threads) -> None:
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(1024, HUGE // 1024, generator=generator)
    grad = torch.randn_like(weight)
    # Every entry inside the bracket lies in the last part: that part alone overflows its share of the room.
    values = torch.rand(HUGE, generator=generator)
    values[-1000:] = 0.5
    results = []
    for count in (1, 2, 3):
        threads(count)
        kept, effective, scale = grad.clone(), torch.empty_like(weight), torch.ones(1024, 1)
        shrunk, signs = torch.empty_like(weight), kernels.signs_for(weight)
        assert kernels.soft_threshold_into(weight, shrunk, 0.7, signs)
        d_threshold = kernels.soft_threshold_backward_(kept, signs)
        assert kernels.st3_apply(weight, effective, scale, 0.7, rescale=True, epsilon=1e-6)
        selected = kernels.count_below_and_select(values, 0.5, 0.5, expected=10)
        assert d_threshold is not None and selected is not None
        results.append((kept, d_threshold, effective, scale, shrunk, signs, *selected[:2]))
    for split in results[1:]:
        for one, many in zip(results[0], split, strict=True):
            assert torch.equal(torch.as_tensor(one), torch.as_tensor(many))
    below, inside = results[1][6:]
    assert below == int((values < 0.5).sum()) and inside.numel() == int((values == 0.5).sum()) >= 1000
    torch.testing.assert_close(results[0][1], -(grad * weight.sign())[weight.abs() > 0.7].sum(), rtol=1e-5, atol=0)


@pytest.mark.skipif("avx2" not in Path("/proc/cpuinfo").read_text(), reason="needs an x86 CPU with AVX2 on Linux")
def test_every_instruction_set_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The vector paths (AVX-512 where the CPU has it, AVX2) and the plain C one sum in the same lanes and order.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    base = [flag for flag in kernels._flag_sets()[0] if not flag.startswith("-march")]
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(300, 1001, generator=generator)  # rows that are no whole number of vectors
    grad = torch.randn_like(weight)
    results = []
    for isa in ("-march=native", "-march=haswell", "-mno-avx"):
        monkeypatch.setattr(kernels, "_flag_sets", lambda isa=isa: [(*base, isa)])
        monkeypatch.setattr(kernels, "_loaded", {"library": kernels._build()})
        kept, effective, shrunk = grad.clone(), torch.empty_like(weight), torch.empty_like(weight)
        scale, signs = torch.ones(300, 1), kernels.signs_for(weight)
        assert kernels.soft_threshold_into(weight, shrunk, 0.7, signs)
        d_threshold = kernels.soft_threshold_backward_(kept, signs)
        assert kernels.st3_apply(weight, effective, scale, 0.7, rescale=True, epsilon=1e-6)
        selected = kernels.count_below_and_select(weight.flatten(), 0.1, 0.2, expected=100_000, absolute=True)
        assert d_threshold is not None and selected is not None
        results.append((kept, d_threshold, effective, scale, shrunk, signs, *selected))
    for other in results[1:]:
        for one, same in zip(results[0], other, strict=True):
            assert torch.equal(torch.as_tensor(one), torch.as_tensor(same))


# ------------------------------------------------------------------ in a Trainer


class WideNet(TinyNet):
    """TinyNet with a hidden layer of 8,192 weights: large enough for the fused loops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 64, 3, padding=1)
        self.fc = nn.Sequential(nn.Linear(64 * LENGTH, 16), nn.ReLU(), nn.Linear(16, 2))


def _fit(root: Path, method: str, *extra: pl.Callback, ckpt_path: Path | None = None) -> WideNet:
    torch.manual_seed(0)
    model = WideNet()
    args = {"target_sparsity": 0.9, "end": 0.5} if method == "st3" else {"s_init": -5.0, "threshold_decay": 1e-2}
    checkpoints = ModelCheckpoint(dirpath=root, save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(root, max_epochs=4, enable_checkpointing=True, callbacks=[
        SparsityCallback(method, **args), checkpoints, *extra])  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("method", ["st3", "str"])
def test_a_fit_through_the_fused_loops_reaches_its_target_and_resumes_exactly(
    method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = []
    for name in ("st3_apply", "soft_threshold_backward_"):
        loop = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _loop=loop, _name=name: served.append(_name) or _loop(*a))
    full = _fit(tmp_path / "full", method)
    assert served.count("st3_apply" if method == "st3" else "soft_threshold_backward_") >= 4 * 8

    hidden = full.fc[0].weight
    if method == "st3":  # the exact target over every sparsified weight
        weights = [full.conv.weight, hidden, full.fc[2].weight]
        assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * sum(w.numel() for w in weights))
    assert (hidden == 0).any()

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "crashed", method, Crash(2))
    resumed = _fit(tmp_path / "resumed", method, ckpt_path=tmp_path / "crashed" / "epoch=1.ckpt")
    for name, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
