"""STR with a target sparsity: the exact logit-shift calibration, its settings, and fits that end at the target."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_sparse import STR, SparsityCallback
from lightning_sparse.methods.str_method import LearnedSoftThreshold, calibrate_thresholds
from lightning_sparse.schedules import CubicSchedule, LinearSchedule
from lightning_sparse.thresholds import NonFiniteWeightsError

# ------------------------------------------------------------------------------------ settings


def test_target_settings_resolve_like_st3s():
    assert not STR().has_target and STR().target(10) is None
    method = STR(target_sparsity=0.9, start=0.1, end=0.5).for_run(total_steps=100)
    assert method.schedule == CubicSchedule(0.9, 10, 50) and method.has_target
    assert method.target(9) == 0.0 and method.target(50) == pytest.approx(0.9) and method.target(1000) == 0.9
    # STR's default span is its own, later than ST-3's 5 % to 50 %: 20 % to 80 % of the run.
    assert STR(target_sparsity=0.8, schedule="linear").for_run(100).schedule == LinearSchedule(0.8, 20, 80)
    assert STR(target_sparsity=0.8).for_run(100).target(50) == pytest.approx(0.8 * (1 - (1 - 30 / 60) ** 3))
    assert STR(schedule=CubicSchedule(0.5, 0, 10)).for_run(math.inf).target(10) == 0.5
    callback = SparsityCallback("str", target_sparsity=0.9, start=5, end=20, schedule="linear")
    assert callback.method == STR(target_sparsity=0.9, start=5, end=20, schedule="linear")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"start": 0.1}, "give `target_sparsity` too"),
        ({"schedule": "linear"}, "`target_sparsity` is required"),
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"target_sparsity": 0.9, "start": 0.5, "end": 0.2}, "must come after `start`"),
        ({"target_sparsity": 0.9, "schedule": CubicSchedule(0.9, 0, 10)}, "cannot be combined"),
    ],
)
def test_target_settings_are_checked(kwargs: dict[str, Any], error: str):
    with pytest.raises(ValueError, match=error):
        STR(**kwargs)


def test_fractions_need_a_run_length():
    with pytest.raises(ValueError, match="no known number of optimizer steps"):
        STR(target_sparsity=0.9).for_run(math.inf)


# ------------------------------------------------------------------------------------ the calibration


def test_calibration_is_exact_and_keeps_the_layers_differences():
    torch.manual_seed(0)
    layers = [LearnedSoftThreshold(s_init=s) for s in (-100.0, -4.0, -6.5)]
    weights = [torch.randn(64, 32) * 0.05, torch.randn(300) * 0.2, torch.rand(10, 10, 3) * 0.9]
    n = sum(w.numel() for w in weights)
    for sparsity in (0.0, 0.3, 0.9, 0.987):
        before = [p.s.item() for p in layers]
        delta = calibrate_thresholds(layers, weights, sparsity)
        pruned = sum(int((~p.keep_mask(w)).sum()) for p, w in zip(layers, weights, strict=True))
        assert pruned == round(sparsity * n)
        after = [p.s.item() for p in layers]
        # One common shift: the learned differences between layers (their budget split) are untouched.
        for b, a in zip(before, after, strict=True):
            assert a - b == pytest.approx(delta, abs=1e-4)
        assert all(p.s.dtype == torch.float32 for p in layers)


def test_calibration_refuses_nan_weights_before_changing_anything():
    layer = LearnedSoftThreshold(s_init=-3.0)
    with pytest.raises(NonFiniteWeightsError, match="'fc'"):
        calibrate_thresholds([layer], [torch.tensor([0.1, float("nan")])], 0.5, names=["fc"])
    assert layer.s.item() == -3.0


def test_thresholds_stay_float32_when_the_model_is_cast_to_bf16():
    layer = nn.Linear(4, 2)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=-100.0))
    layer.to(torch.bfloat16)
    s = layer.parametrizations.weight[0].s
    assert s.dtype == torch.float32 and layer.parametrizations.weight.original.dtype == torch.bfloat16
    # A decay step far below bf16's resolution at -100 (0.5) is kept.
    with torch.no_grad():
        s.add_(1e-3)
    assert s.item() == pytest.approx(-99.999, abs=1e-5)
    assert layer(torch.ones(1, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------ fits


class _AllMetrics(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "all"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _fit_mnist1d(tmp_path: Path, method: str, **kwargs: Any) -> tuple[nn.Module, _AllMetrics]:
    from mnist1d_sparse import Mnist1dCNN, Mnist1dData  # examples/ is on pytest's `pythonpath`

    pl.seed_everything(0, verbose=False)
    logger = _AllMetrics()
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, log_every_n_steps=5, default_root_dir=tmp_path,
        callbacks=[SparsityCallback(method, **kwargs)], enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )  # fmt: skip
    model = Mnist1dCNN()
    trainer.fit(model, Mnist1dData())
    return model, logger


def _layer_zeros(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (int((m.weight == 0).sum()), m.weight.numel())
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Linear))
    }


def test_str_target_ends_exactly_at_it_on_mnist1d_with_its_own_budget(tmp_path: Path):
    model, logger = _fit_mnist1d(tmp_path, "str", target_sparsity=0.9)
    layers = _layer_zeros(model)
    zeros, n = sum(z for z, _ in layers.values()), sum(size for _, size in layers.values())
    assert zeros == round(0.9 * n)  # exact, as ST-3's
    # Sparsity follows the schedule at every logged step.
    logged = [r for r in logger.rows if "sparsity/target" in r and "sparsity/global" in r]
    assert len(logged) > 10 and {round(r["sparsity/target"], 6) for r in logged} != {0.9}
    for row in logged:
        assert row["sparsity/global"] == pytest.approx(row["sparsity/target"], abs=2 / n)

    st3, _ = _fit_mnist1d(tmp_path / "st3", "st3", target_sparsity=0.9)
    st3_layers = _layer_zeros(st3)
    assert sum(z for z, _ in st3_layers.values()) == round(0.9 * n)
    # STR's learned per-layer budget, not ST-3's global magnitude cut.
    differences = [abs(layers[k][0] - st3_layers[k][0]) / layers[k][1] for k in layers]
    assert max(differences) > 0.05
