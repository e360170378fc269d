"""Trainer lifecycles around fit, tied weights, and configuration from LightningCLI (string and object forms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn

from lightning_sparse import ST3, CubicSchedule, LinearSchedule, SparsityCallback, harden
from lightning_sparse.layers import sparsity_parametrizations
from models import N_WEIGHTS, TiedNet, TinyNet, assert_untouched, make_trainer, model_tensors, zeros

EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "sparse_cli.yaml"


@pytest.mark.parametrize("harden_on_fit_end", [True, False])
def test_validate_test_predict_before_and_after_fit(tmp_path: Path, harden_on_fit_end: bool) -> None:
    model = TinyNet()
    before = model_tensors(model)
    callback = SparsityCallback("st3", 0.5, start=0, end=4, harden_on_fit_end=harden_on_fit_end)
    trainer = make_trainer(tmp_path, limit_val_batches=None, callbacks=[callback])
    batches = [batch[0] for batch in model.predict_dataloader()]

    def outputs() -> torch.Tensor:  # batch by batch, as predict runs: a matmul's rounding can depend on its batch size
        return torch.cat([model(x) for x in batches])

    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    dense = torch.cat(trainer.predict(model))
    assert_untouched(model, before)
    assert torch.equal(dense, outputs())

    trainer.fit(model)
    assert bool(sparsity_parametrizations(model)) is not harden_on_fit_end
    fitted = model_tensors(model)
    (validated,) = trainer.validate(model, verbose=False)
    (tested,) = trainer.test(model, verbose=False)
    sparse = torch.cat(trainer.predict(model))

    assert model_tensors(model).keys() == fitted.keys()
    assert all(torch.equal(value, fitted[name]) for name, value in model_tensors(model).items())
    assert torch.equal(sparse, outputs()) and not torch.equal(sparse, dense)
    assert validated["val_loss"] == tested["test_loss"]  # the same data and weights
    assert zeros(model.conv.weight, model.fc.weight) == round(0.5 * N_WEIGHTS)


@pytest.mark.parametrize("harden_on_fit_end", [True, False])
def test_two_fits_in_a_row(tmp_path: Path, harden_on_fit_end: bool) -> None:
    model = TinyNet()
    callback = SparsityCallback("st3", 0.6, start=0, end=4, harden_on_fit_end=harden_on_fit_end)
    make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model)
    first = sparsity_parametrizations(model)

    make_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model)

    second = sparsity_parametrizations(model)
    if harden_on_fit_end:
        assert not first and not second  # reparameterized afresh, hardened again
    else:  # the same reparameterization carried on, not a second one stacked on it
        assert list(second) == ["conv", "fc"]
        assert all(second[name].parametrization is first[name].parametrization for name in second)
        assert len(model.fc.parametrizations.weight) == 1
    assert zeros(model.conv.weight, model.fc.weight) == round(0.6 * N_WEIGHTS)


def test_max_steps_instead_of_max_epochs(tmp_path: Path) -> None:
    model = TinyNet()
    callback = SparsityCallback("st3", 0.5, start=0.0, end=0.5, harden_on_fit_end=False)
    steps: list[int] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            steps.append(zeros(pl_module.conv.weight, pl_module.fc.weight))

    trainer = make_trainer(tmp_path, max_epochs=-1, max_steps=12, callbacks=[callback, Record()])
    trainer.fit(model)
    assert trainer.global_step == 12
    # The ramp ends at step 6 = 0.5 * max_steps.
    assert steps == [round(CubicSchedule(0.5, 0, 6).sparsity_at(step) * N_WEIGHTS) for step in range(1, 13)]


def test_tied_weights_are_sparsified_once_and_stay_tied(tmp_path: Path) -> None:
    model = TiedNet()
    shared = model.a.weight
    unique = N_WEIGHTS + 64
    make_trainer(tmp_path, callbacks=[SparsityCallback("st3", 0.5, start=0, end=4, harden_on_fit_end=False)]).fit(model)

    layers = sparsity_parametrizations(model)
    assert "b" not in layers and layers["a"].holders == ((model.a, "weight"), (model.b, "weight"))  # one mask
    assert model.a.parametrizations.weight.original is model.b.parametrizations.weight.original is shared
    assert zeros(model.a.weight, model.conv.weight, model.fc.weight) == round(0.5 * unique)  # counted once
    x = torch.randn(5, 1, 8)
    expected = model(x)

    harden(model)
    assert model.a.weight is model.b.weight is shared
    assert zeros(model.a.weight, model.conv.weight, model.fc.weight) == round(0.5 * unique)
    assert torch.equal(model(x), expected)
    assert not TiedNet().load_state_dict(model.state_dict(), strict=True).missing_keys


def test_lightning_cli_configures_the_callback_from_the_example_yaml(tmp_path: Path) -> None:
    def cli(*args: str) -> LightningCLI:
        quiet = [
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"
        ]  # fmt: skip
        return LightningCLI(
            TinyNet,
            args=["fit", "--config", str(EXAMPLE_CONFIG), f"--trainer.default_root_dir={tmp_path}", *quiet, *args],
            save_config_kwargs={"overwrite": True},
        )

    first = cli("--trainer.max_epochs=2")
    (callback,) = [c for c in first.trainer.callbacks if isinstance(c, SparsityCallback)]
    assert (callback.method.name, callback.method.target_sparsity, callback.exclude) == ("st3", 0.9, [])
    assert callback.method == ST3(target_sparsity=0.9, start=0.05, end=0.5, schedule="cubic", freeze_at=None)
    assert (callback.method.rescale, callback.method.sigma, callback.harden_on_fit_end) == (True, False, True)
    assert not sparsity_parametrizations(first.model)
    assert zeros(first.model.conv.weight, first.model.fc.weight) == round(0.9 * N_WEIGHTS)

    # Resuming from the config's `save_last` checkpoint, with the same config.
    resumed = cli("--trainer.max_epochs=3", f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert resumed.trainer.global_step == 24
    assert zeros(resumed.model.conv.weight, resumed.model.fc.weight) == round(0.9 * N_WEIGHTS)


def _configured_callback(tmp_path: Path, init_args: str) -> SparsityCallback:
    """The SparsityCallback a LightningCLI builds from `init_args` (YAML, indented for its place)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sparse.SparsityCallback\n      init_args:\n" + init_args
    )
    cli = LightningCLI(TinyNet, run=False, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    return callback


def test_lightning_cli_takes_module_types_and_name_patterns_in_filters(tmp_path: Path) -> None:
    callback = _configured_callback(
        tmp_path, "        method: str\n        include: [torch.nn.Conv1d, 'f*']\n        exclude: [torch.nn.Linear]\n"
    )
    assert (callback.include, callback.exclude) == ([nn.Conv1d, "f*"], [nn.Linear])


def test_lightning_cli_takes_a_method_object(tmp_path: Path) -> None:
    callback = _configured_callback(
        tmp_path,
        "        method:\n"
        "          class_path: lightning_sparse.ST3\n"
        "          init_args: {target_sparsity: 0.8, freeze_at: 0.9}\n"
        "        exclude: fc\n",
    )
    assert callback.method == ST3(target_sparsity=0.8, freeze_at=0.9)
    assert callback.exclude == ["fc"]


def test_lightning_cli_takes_a_schedule_object(tmp_path: Path) -> None:
    callback = _configured_callback(
        tmp_path,
        "        method: st3\n"
        "        schedule:\n"
        "          class_path: lightning_sparse.LinearSchedule\n"
        "          init_args: {final: 0.5, start: 0, end: 4}\n",
    )
    assert callback.method == ST3(schedule=LinearSchedule(final=0.5, start=0, end=4))
