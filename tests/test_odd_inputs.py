"""Odd inputs end to end: diverged weights (NaN, inf), layers that cannot be sparsified, odd checkpoints, and
ranks that must end a DDP fit the same way. Real Trainer fits and real checkpoint files throughout."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ddp_outcomes import SCENARIOS, DivergingNet
from lightning_sparse import SparsityCallback, harden_state_dict, load_hardened
from lightning_sparse.layers import sparsity_parametrizations
from lightning_sparse.reporting import PLOT_FILE
from models import LENGTH, TinyNet, assert_untouched, make_trainer, model_tensors, zeros

TESTS = Path(__file__).parent


def _fit(root: Path, model: TinyNet, callback: SparsityCallback, **trainer_args: Any) -> None:
    trainer_args = {"max_epochs": -1, "max_steps": 6, "log_every_n_steps": 1, **trainer_args}
    make_trainer(root, callbacks=[callback, *trainer_args.pop("callbacks", [])], **trainer_args).fit(model)


# -------------------------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize(
    "callback_args",
    [
        {"method": "st3", "target_sparsity": 0.5, "start": 0, "end": 4},
        {"method": "st3", "target_sparsity": 0.5, "start": 0, "end": 4, "rescale": False},
        {"method": "st3", "target_sparsity": 0.5, "start": 4, "end": 6},  # sparsity 0 before `start`: no selection
    ],
    ids=["st3", "st3-no-rescale", "st3-before-start"],
)
def test_a_nan_loss_stops_st3_at_the_mask_update_naming_layers_and_step(
    tmp_path: Path, callback_args: dict[str, Any]
) -> None:
    model = DivergingNet(nan_at=3)
    logger = CSVLogger(tmp_path)
    with pytest.raises(FloatingPointError) as raised, pytest.warns(UserWarning, match="keeps its sparse training"):
        _fit(tmp_path, model, SparsityCallback(**callback_args), logger=logger)
    message = str(raised.value)
    assert "after optimizer step 3" in message
    assert "'conv' (12 of 12 entries)" in message and "'fc' (64 of 64 entries)" in message
    assert "gradient_clip_val" in message and "learning rate" in message
    assert model.trainer.global_step == 3
    # The last logged values are step 2's: no all-NaN model was ever reported as 100 % sparse.
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        logged = [float(row["sparsity/global"]) for row in csv.DictReader(file) if row["sparsity/global"]]
    assert len(logged) == 2 and max(logged) < 0.5
    assert not (Path(logger.log_dir) / PLOT_FILE).exists()


def test_one_inf_weight_stops_st3_at_the_mask_update_before_it_spreads_through_the_rescale(tmp_path: Path) -> None:
    model = DivergingNet(inf_at=2)
    callback = SparsityCallback("st3", target_sparsity=0.5, start=0, end=4)
    with pytest.raises(FloatingPointError, match=r"after optimizer step 2.*'fc' \(1 of 64 entries\)") as raised:
        _fit(tmp_path, model, callback, logger=False)
    assert "'conv'" not in str(raised.value)
    # Stopped before the mask update: step 1's masks and rescale, all finite.
    st3 = sparsity_parametrizations(model)["fc"].parametrization
    assert torch.isfinite(st3.scale).all()


@pytest.mark.parametrize(
    ("callback_args", "log_every", "step"),
    [
        ({"method": "str", "s_init": -3.0}, 2, 4),  # STR has no mask update: caught at the next log
        ({"method": "st3", "target_sparsity": 0.5, "start": 0, "end": 2, "freeze_at": 2}, 1, 3),  # frozen masks
    ],
    ids=["str", "st3-frozen"],
)
def test_nan_weights_without_a_mask_update_stop_the_fit_at_the_next_log(
    tmp_path: Path, callback_args: dict[str, Any], log_every: int, step: int
) -> None:
    model = DivergingNet(nan_at=3)
    callback = SparsityCallback(**callback_args, log_every_n_steps=log_every)
    with pytest.raises(FloatingPointError, match=rf"after optimizer step {step}: 'conv' \(\d+ of 12 entries\)"):
        _fit(tmp_path, model, callback, logger=False)
    assert model.trainer.global_step == step


def test_nan_weights_at_the_last_step_are_not_reported_at_train_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = DivergingNet(nan_at=6)
    callback = SparsityCallback("str", s_init=-3.0, log_every_n_steps=4)
    with pytest.raises(FloatingPointError, match=r"after optimizer step 6: 'conv'"):
        _fit(tmp_path, model, callback, logger=False)
    assert "per-layer budget" not in capsys.readouterr().out
    assert not (tmp_path / PLOT_FILE).exists()


# ------------------------------------------------------------------- layers that cannot be sparsified


class OddNet(TinyNet):
    """TinyNet with one odd module `odd` between its conv and its linear layer."""

    def __init__(self, odd: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.odd = odd()  # not an argument: `save_hyperparameters` would copy it

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.odd(torch.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize(
    ("make_odd", "include", "match"),
    [
        (lambda: nn.BatchNorm1d(4), [nn.BatchNorm1d], r"'odd': it is 1-D \(shape \(4,\)\)"),
        (lambda: nn.BatchNorm1d(4), ["*"], r"'odd': it is 1-D"),  # a pattern matching it and the others
        (lambda: nn.utils.spectral_norm(nn.Conv1d(4, 4, 1)), None, r"'odd': it is recomputed .*spectral_norm"),
        (lambda: nn.utils.spectral_norm(nn.Conv1d(4, 4, 1)), ["odd"], r"'odd': it is recomputed"),
        (lambda: nn.utils.weight_norm(nn.Conv1d(4, 4, 1)), None, r"'odd': it is recomputed .*weight_norm"),
        (lambda: nn.LazyConv1d(4, 1), None, r"'odd': .*lazy(?s:.*)run one forward pass"),
    ],
    ids=["batchnorm-by-type", "batchnorm-by-pattern", "spectral-norm-hook", "spectral-norm-by-name", "weight-norm-hook",
         "lazy"],
)  # fmt: skip
def test_a_layer_that_cannot_be_sparsified_is_refused_by_name_before_anything_changes(
    tmp_path: Path, make_odd: Callable[[], nn.Module], include: list[Any] | None, match: str
) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm` is deprecated", FutureWarning)
        model = OddNet(make_odd)
    lazy = isinstance(model.odd.weight, nn.parameter.UninitializedParameter)
    checked = [model.conv, model.fc] if lazy else [model]  # an uninitialized weight cannot be copied
    before = [model_tensors(module) for module in checked]
    with pytest.raises(ValueError, match=rf"Cannot sparsify (?s:.*){match}(?s:.*)exclude=\['odd'\]"):
        _fit(tmp_path, model, SparsityCallback("st3", 0.5, include=include), logger=False)
    for module, tensors in zip(checked, before, strict=True):
        assert_untouched(module, tensors)
    assert not parametrize.is_parametrized(model.odd)


def test_a_lazy_layer_materialized_in_configure_model_is_sparsified(tmp_path: Path) -> None:
    class LazyNet(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.LazyLinear(2)

        def configure_model(self) -> None:
            self(torch.zeros(1, 1, LENGTH))

    model = LazyNet()
    _fit(tmp_path, model, SparsityCallback("st3", 0.5, start=0, end=2, harden_on_fit_end=False), logger=False)
    assert set(sparsity_parametrizations(model)) == {"conv", "fc"}
    assert zeros(model.conv.weight, model.fc.weight) == 38  # half of 12 + 64


def test_new_api_spectral_norm_is_refused_without_running_its_power_iteration(tmp_path: Path) -> None:
    model = OddNet(lambda: nn.utils.parametrizations.spectral_norm(nn.Conv1d(4, 4, 1)))
    before = model_tensors(model)  # holds the spectral norm's `_u` and `_v` vectors
    with pytest.raises(ValueError, match=r"weight 'odd' already has a parametrization"):
        _fit(tmp_path, model, SparsityCallback("st3", 0.5), logger=False)
    assert_untouched(model, before)


class WeightlessLinear(nn.Linear):
    """A Linear whose weight is not its own (None): it borrows `source`'s at each call."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__(source.in_features, source.out_features)
        self.weight = None  # type: ignore[assignment]
        self.source = [source]  # a list, so it is not a submodule

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.source[0].weight, self.bias)


def test_a_layer_whose_weight_is_none_is_skipped_to_the_end_of_the_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Net(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.borrowing = WeightlessLinear(self.fc)

        def forward(self, x: Tensor) -> Tensor:
            return self.borrowing(torch.relu(self.conv(x)).flatten(1))

    model = Net()
    _fit(tmp_path, model, SparsityCallback("st3", 0.5, start=0, end=2), logger=CSVLogger(tmp_path))
    assert model.borrowing.weight is None and zeros(model.conv.weight, model.fc.weight) == 38
    table = capsys.readouterr().out
    assert "borrowing" not in table and "conv" in table


def test_a_model_whose_only_layer_is_empty_logs_zero_sparsity(tmp_path: Path) -> None:
    class Empty(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Identity()
            self.fc = nn.Linear(0, 2)  # a weight of shape (2, 0)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.flatten(1)[:, :0])

    logger = CSVLogger(tmp_path)
    callback = SparsityCallback("st3", 0.5, start=0, end=2)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _fit(tmp_path, Empty(), callback, logger=logger)
    assert not [w for w in warned if "below the" in str(w.message)]  # nothing to prune: the target is no target
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        header, *rows = [line.split(",") for line in file.read().splitlines()]
    column = header.index("sparsity/global")
    assert {row[column] for row in rows if row[column]} == {"0.0"}


class Double(nn.Module):
    """A user's own parametrization: twice the weight."""

    def forward(self, weight: Tensor) -> Tensor:
        return 2 * weight


class Before(pl.Callback):
    """Records `fc`'s effective weight, and what ours makes of its raw weight, before the fit's end hardens them."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fc = pl_module.fc
        self.effective = fc.weight.detach().clone()
        self.baked = (
            sparsity_parametrizations(pl_module)["fc"].parametrization(fc.parametrizations.weight.original).detach()
        )


def test_harden_keeps_a_users_parametrization_stacked_on_ours(tmp_path: Path) -> None:
    class Stacking(TinyNet):
        def on_train_start(self) -> None:  # after lightning-sparse has reparameterized `fc`
            parametrize.register_parametrization(self.fc, "weight", Double())

    model, before = Stacking(), Before()
    _fit(tmp_path, model, SparsityCallback("st3", 0.5, start=0, end=2), logger=False, callbacks=[before])

    assert not sparsity_parametrizations(model)
    assert [type(p) for p in model.fc.parametrizations.weight] == [Double]  # theirs, kept
    assert torch.equal(model.fc.parametrizations.weight.original, before.baked)  # ours, baked in
    assert torch.equal(model.fc.weight, before.effective)
    assert zeros(model.fc.weight) == zeros(before.baked) > 0


# ------------------------------------------------------------------------------------------- checkpoints


def _sparse_checkpoint(root: Path, method: str = "st3", **saver_args: Any) -> tuple[TinyNet, Path]:
    """A fit of TinyNet that ends at step 4 with a checkpoint saved there; the model is not hardened."""
    settings = {"s_init": -3.0} if method == "str" else {"target_sparsity": 0.5, "start": 0, "end": 2}
    saver = ModelCheckpoint(dirpath=root / "ckpt", filename="last", every_n_train_steps=4, **saver_args)
    callback = SparsityCallback(method, **settings, harden_on_fit_end=False)
    model = TinyNet()
    _fit(root, model, callback, max_steps=4, logger=False, enable_checkpointing=True, callbacks=[saver])
    return model, root / "ckpt" / "last.ckpt"


def test_load_hardened_takes_a_file_object(tmp_path: Path) -> None:
    _, path = _sparse_checkpoint(tmp_path)
    from_path = load_hardened(TinyNet, path)
    from_buffer = load_hardened(TinyNet, io.BytesIO(path.read_bytes()))
    with open(path, "rb") as file:
        from_file = load_hardened(TinyNet, file)
    expected = from_path.state_dict()
    for loaded in (from_buffer, from_file):
        state = loaded.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert zeros(from_buffer.conv.weight, from_buffer.fc.weight) == 38


def test_load_hardened_takes_a_weights_only_checkpoint(tmp_path: Path) -> None:
    model, path = _sparse_checkpoint(tmp_path, save_weights_only=True)
    assert "callbacks" not in torch.load(path, weights_only=True)
    loaded = load_hardened(TinyNet, path)
    assert not sparsity_parametrizations(loaded)
    assert torch.equal(loaded.fc.weight, model.fc.weight)


def test_harden_state_dict_refuses_a_group_missing_an_entry(tmp_path: Path) -> None:
    model, _ = _sparse_checkpoint(tmp_path)
    state = model.state_dict()
    del state["fc.parametrizations.weight.0.scale"]
    with pytest.raises(ValueError, match=r"'fc'.*fc\.parametrizations\.weight\.0\.scale"):
        harden_state_dict(state)


def test_load_hardened_refuses_a_checkpoint_missing_a_sparsified_layers_state(tmp_path: Path) -> None:
    _, path = _sparse_checkpoint(tmp_path, method="str")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["conv.parametrizations.weight.0.s"]
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=r"'conv'.*sparsified.*conv\.parametrizations\.weight\.0\."):
        load_hardened(TinyNet, path)


# --------------------------------------------------------------------------------------------------- DDP


DDP_TIMEOUT = 240  # about 30 s when nothing hangs


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[tuple[str, int], dict[str, Any]], str]:
    """Every scenario of tests/ddp_outcomes.py, run once on 2 CPU processes; the process group is killed if it hangs."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "ddp_outcomes.py"), str(out), *SCENARIOS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=DDP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # rank one, waiting for a rank zero that is gone
        output, _ = process.communicate()
        output += f"\n[killed after {DDP_TIMEOUT} s]"
    outcomes = {}
    for scenario in SCENARIOS:
        for rank in (0, 1):
            path = out / f"{scenario}_rank{rank}.json"
            outcomes[scenario, rank] = json.loads(path.read_text()) if path.exists() else {"outcome": "no end"}
    return outcomes, output


@pytest.mark.parametrize(
    ("scenario", "outcome"),
    [
        ("logger-fails-mid-run", "finished"),
        ("logger-fails-at-train-end", "finished"),
        ("nan-st3", "NonFiniteWeightsError"),
        ("nan-str", "NonFiniteWeightsError"),
    ],
)
def test_ddp_ranks_end_a_fit_the_same_way(
    ddp_outcomes: tuple[dict[tuple[str, int], dict[str, Any]], str], scenario: str, outcome: str
) -> None:
    outcomes, output = ddp_outcomes
    ranks = [outcomes[scenario, rank] for rank in (0, 1)]
    assert [r["outcome"] for r in ranks] == [outcome, outcome], output[-6000:]
    if outcome == "finished":
        assert [r["global_step"] for r in ranks] == [8, 8]
        # Rank zero says once what failed, naming the logger's error; training went on.
        (warning,) = [w for w in ranks[0]["warnings"] if "could not log" in w]
        assert "RuntimeError: logger backend down" in warning
        assert not [w for w in ranks[1]["warnings"] if "could not" in w]
    else:
        assert [r["global_step"] for r in ranks] == [3, 3]
