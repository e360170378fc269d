"""Trainer lifecycles around fit, unusual models, bad arguments, and configuration from LightningCLI."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from models import TinyNet, make_trainer, model_tensors
from torch import Tensor, nn

from lightning_sparse import CubicSchedule, SparsityCallback, harden
from lightning_sparse.layers import sparsity_parametrizations

N_WEIGHTS = 12 + 64  # TinyNet's conv and fc weights
EXAMPLE_CONFIG = Path(__file__).parents[1] / "examples" / "sparse_cli.yaml"


def zeros(*weights: Tensor) -> int:
    return sum(int((w == 0).sum()) for w in weights)


def assert_untouched(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model_tensors(model)
    assert not sparsity_parametrizations(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("harden_on_fit_end", [True, False])
def test_validate_test_predict_before_and_after_fit(tmp_path: Path, harden_on_fit_end: bool) -> None:
    model = TinyNet()
    before = model_tensors(model)
    callback = SparsityCallback("st3", 0.5, start=0, end=4, harden_on_fit_end=harden_on_fit_end)
    trainer = make_trainer(tmp_path, limit_val_batches=None, callbacks=[callback])
    x = torch.cat([batch[0] for batch in model.predict_dataloader()])

    trainer.validate(model, verbose=False)
    trainer.test(model, verbose=False)
    dense = torch.cat(trainer.predict(model))
    assert_untouched(model, before)
    assert torch.equal(dense, model(x))

    trainer.fit(model)
    assert bool(sparsity_parametrizations(model)) is not harden_on_fit_end
    fitted = model_tensors(model)
    (validated,) = trainer.validate(model, verbose=False)
    (tested,) = trainer.test(model, verbose=False)
    sparse = torch.cat(trainer.predict(model))

    assert model_tensors(model).keys() == fitted.keys()
    assert all(torch.equal(value, fitted[name]) for name, value in model_tensors(model).items())
    assert torch.equal(sparse, model(x)) and not torch.equal(sparse, dense)
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
        assert all(second[name][1] is first[name][1] for name in second)
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


@pytest.mark.parametrize(
    ("args", "named"), [({}, "start"), ({"start": 0, "end": 0.5}, "end"), ({"start": 0, "end": 5, "freeze_at": 0.9}, "freeze_at")]
)
def test_unknown_run_length_with_fractions_is_refused_at_setup(
    tmp_path: Path, args: dict[str, Any], named: str
) -> None:
    model = TinyNet()
    before = model_tensors(model)
    trainer = make_trainer(tmp_path, max_epochs=-1, callbacks=[SparsityCallback("st3", 0.5, **args)])
    with pytest.raises(ValueError, match=rf"`{named}=0\.\d+` is a fraction of training.*set `max_steps`"):
        trainer.fit(model)
    assert_untouched(model, before)


class TiedNet(TinyNet):
    """TinyNet behind two Linear(8, 8) layers that share one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.b(torch.relu(self.a(x))))


def test_tied_weights_are_sparsified_once_and_stay_tied(tmp_path: Path) -> None:
    model = TiedNet()
    shared = model.a.weight
    unique = N_WEIGHTS + 64
    make_trainer(tmp_path, callbacks=[SparsityCallback("st3", 0.5, start=0, end=4, harden_on_fit_end=False)]).fit(model)

    layers = sparsity_parametrizations(model)
    assert layers["a"][1] is layers["b"][1]  # one parametrization, one mask
    assert model.a.parametrizations.weight.original is model.b.parametrizations.weight.original is shared
    assert zeros(model.a.weight, model.conv.weight, model.fc.weight) == round(0.5 * unique)  # counted once
    x = torch.randn(5, 1, 8)
    expected = model(x)

    harden(model)
    assert model.a.weight is model.b.weight is shared
    assert zeros(model.a.weight, model.conv.weight, model.fc.weight) == round(0.5 * unique)
    assert torch.equal(model(x), expected)
    assert not TiedNet().load_state_dict(model.state_dict(), strict=True).missing_keys


class NoLayers(TinyNet):
    """Nothing to sparsify: an Identity and a BatchNorm (whose weight is not a conv/linear weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Identity(), nn.BatchNorm1d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x).flatten(1)[:, :2]


@pytest.mark.parametrize(
    ("model_class", "args", "match"),
    [
        (NoLayers, {}, r"NoLayers has no layer to sparsify: no Conv1d/2d/3d or Linear"),
        (TinyNet, {"exclude": ["classifier"]}, r"`exclude` entry 'classifier' matches no module.*are: conv, fc"),
        (TinyNet, {"include": ["encoder.*"]}, r"`include` entry 'encoder.\*' matches no module"),
        (TinyNet, {"include": [nn.Conv2d]}, r"`include` entry <class 'torch.nn.modules.conv.Conv2d'> matches no"),
        (TinyNet, {"start": 0.9, "end": 3}, r"`end` \(step 3\) must come after `start` \(step 14\)"),
    ],
    ids=["no-layers", "exclude-typo", "include-typo", "include-type", "end-before-start-mixed"],
)
def test_setup_refuses_what_cannot_be_checked_earlier_and_leaves_the_model_untouched(
    tmp_path: Path, model_class: type[TinyNet], args: dict[str, Any], match: str
) -> None:
    model = model_class()
    before = model_tensors(model)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, callbacks=[SparsityCallback("st3", 0.5, **args)]).fit(model)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"method": "rigl"}, r"`method` must be one of 'st3', 'st3sigma', 'str', got 'rigl'"),
        ({"method": "st3"}, r"`target_sparsity` must be a number in \[0, 1\)"),
        ({"method": "st3", "target_sparsity": 1.0}, r"`target_sparsity` must be a number in \[0, 1\)"),
        ({"method": "st3sigma", "target_sparsity": -0.1}, r"`target_sparsity` must be a number in \[0, 1\)"),
        ({"method": "st3", "target_sparsity": math.nan}, r"`target_sparsity` must be a number in \[0, 1\)"),
        ({"method": "str", "target_sparsity": 0.9}, r"`target_sparsity` does not apply to method='str'"),
        ({"method": "st3", "target_sparsity": 0.9, "start": 10, "end": 5}, r"`end` \(5\) must come after `start`"),
        ({"method": "st3", "target_sparsity": 0.9, "start": 0.5, "end": 0.2}, r"`end` \(0.2\) must come after"),
        ({"method": "st3", "target_sparsity": 0.9, "end": 0.5, "freeze_at": 0.3}, r"`freeze_at` \(0.3\) must not"),
        ({"method": "st3", "target_sparsity": 0.9, "start": -1}, r"`start` as a step must be >= 0"),
        ({"method": "st3", "target_sparsity": 0.9, "end": 1.5}, r"`end` as a fraction of training must lie in"),
        ({"method": "st3", "target_sparsity": 0.9, "start": "0.1"}, r"`start` must be an optimizer step \(int\)"),
        ({"method": "st3", "target_sparsity": 0.9, "schedule": "exp"}, r"`schedule` must be one of 'cubic'"),
        ({"method": "st3", "target_sparsity": 0.9, "s_init": -5.0}, r"`s_init` do\(es\) not apply to method='st3'"),
        ({"method": "st3sigma", "target_sparsity": 0.9, "threshold_decay": 1e-4}, r"`threshold_decay` do\(es\) not"),
        ({"method": "str", "start": 0.1, "rescale": False}, r"`start`, `rescale` do\(es\) not apply to method='str'"),
        ({"method": "str", "schedule": "linear"}, r"`schedule` do\(es\) not apply to method='str'"),
        ({"method": "str", "s_init": math.inf}, r"`s_init` must be a finite number"),
        ({"method": "str", "threshold_decay": -1.0}, r"`threshold_decay` must be >= 0"),
        ({"method": "str", "include": [3]}, r"`include` takes module-name patterns \(str\) or nn.Module subclasses"),
        ({"method": "str", "exclude": [nn.functional.relu]}, r"`exclude` takes module-name patterns"),
    ],
)
def test_bad_constructor_input_raises_naming_the_argument(args: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SparsityCallback(**args)


def test_lightning_cli_configures_the_callback_from_the_example_yaml(tmp_path: Path) -> None:
    def cli(*args: str) -> LightningCLI:
        quiet = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
        return LightningCLI(
            TinyNet,
            args=["fit", "--config", str(EXAMPLE_CONFIG), f"--trainer.default_root_dir={tmp_path}", *quiet, *args],
            save_config_kwargs={"overwrite": True},
        )

    first = cli("--trainer.max_epochs=2")
    (callback,) = [c for c in first.trainer.callbacks if isinstance(c, SparsityCallback)]
    assert (callback.method, callback.target_sparsity, callback.exclude) == ("st3", 0.9, [])
    assert callback.hparams == {"start": 0.05, "end": 0.5, "schedule": "cubic", "freeze_at": None, "rescale": True}
    assert not sparsity_parametrizations(first.model)
    assert zeros(first.model.conv.weight, first.model.fc.weight) == round(0.9 * N_WEIGHTS)

    # Resuming from the config's `save_last` checkpoint, with the same config.
    resumed = cli("--trainer.max_epochs=3", f"--ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert resumed.trainer.global_step == 24
    assert zeros(resumed.model.conv.weight, resumed.model.fc.weight) == round(0.9 * N_WEIGHTS)


def test_lightning_cli_takes_module_types_and_name_patterns_in_filters(tmp_path: Path) -> None:
    config = tmp_path / "filters.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sparse.SparsityCallback\n      init_args:\n"
        "        method: str\n        include: [torch.nn.Conv1d, 'f*']\n        exclude: [torch.nn.Linear]\n"
    )
    cli = LightningCLI(TinyNet, run=False, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityCallback)]
    assert (callback.include, callback.exclude) == ([nn.Conv1d, "f*"], [nn.Linear])
