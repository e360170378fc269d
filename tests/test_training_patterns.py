"""Lightning training patterns with the callback: what a resume reads, failed fits, hook order, short runs,
weight averaging. Real Trainers and checkpoints throughout."""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from torch import Tensor, nn

from lightning_sparse import ST3, STR, SparsityCallback
from lightning_sparse.layers import sparsity_parametrizations
from models import N_WEIGHTS, Crash, TinyNet, make_trainer, model_tensors, zeros


def _given_back(model: nn.Module, parameters: list[nn.Parameter], before: dict[str, Tensor]) -> None:
    """The model is as it came: no reparameterization, the same Parameter objects, keys and values."""
    assert not sparsity_parametrizations(model)
    assert all(p is q for p, q in zip(model.parameters(), parameters, strict=True))
    after = model_tensors(model)
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------- a resume reads no file itself


class GzipCheckpointIO(TorchCheckpointIO):
    """Checkpoints as gzip-compressed `torch.save` bytes: what `torch.load` cannot mmap."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(gzip.compress(buffer.getvalue()))

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        data = io.BytesIO(gzip.decompress(Path(path).read_bytes()))
        return torch.load(data, map_location=map_location, weights_only=bool(weights_only))


def _fit_with_checkpoints(
    root: Path, *callbacks: pl.Callback, ckpt_path: Path | None = None, **trainer: Any
) -> TinyNet:
    pl.seed_everything(0)
    model = TinyNet(lr_halving_epochs=2)
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    args = {"max_epochs": 4, "enable_checkpointing": True, **trainer}
    make_trainer(root, callbacks=[saver, *callbacks], **args).fit(model, ckpt_path=ckpt_path)
    return model


def test_a_custom_checkpoint_io_resumes_exactly(tmp_path: Path) -> None:
    def sparse() -> SparsityCallback:
        return SparsityCallback(ST3(0.8, start=0.1, end=0.6))

    io_plugin = {"plugins": [GzipCheckpointIO()]}
    reference = _fit_with_checkpoints(tmp_path / "full", sparse(), **io_plugin)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit_with_checkpoints(tmp_path / "crashed", sparse(), Crash(2), **io_plugin)
    checkpoint = tmp_path / "crashed" / "ckpt" / "epoch=1.ckpt"
    assert checkpoint.read_bytes()[:2] == b"\x1f\x8b"  # gzip: only the plugin reads it, `torch.load` cannot

    resumed = _fit_with_checkpoints(tmp_path / "resumed", sparse(), ckpt_path=checkpoint, **io_plugin)

    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=1e-5, msg=name)


def test_a_resume_loads_the_checkpoint_as_often_as_without_the_callback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loads(name: str, *callbacks: pl.Callback) -> int:
        root = tmp_path / name
        _fit_with_checkpoints(root, *callbacks, max_epochs=1)
        calls = []
        real_load = torch.load

        def counting_load(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs.get("weights_only"))
            return real_load(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(torch, "load", counting_load)
            _fit_with_checkpoints(root / "again", *callbacks, ckpt_path=root / "ckpt" / "epoch=0.ckpt", max_epochs=2)
        return len(calls)

    assert loads("sparse", SparsityCallback(ST3(0.5, start=0, end=4))) == loads("dense")


# -------------------------------------------------------------------------------------- failed fits


class BrokenData(TinyNet):
    def train_dataloader(self) -> Any:
        raise OSError("the data set is not mounted")


@pytest.mark.parametrize("failure", ["missing-checkpoint", "truncated-checkpoint", "broken-dataloader"])
@pytest.mark.parametrize(
    "method", [ST3(0.5, start=0, end=4), STR(s_init=-3.0, threshold_decay=0.05)], ids=["st3", "str"]
)
def test_a_fit_that_fails_before_its_first_step_gives_the_model_back(tmp_path: Path, failure: str, method: Any) -> None:
    ckpt_path = None
    if failure == "truncated-checkpoint":
        make_trainer(tmp_path, max_epochs=1, callbacks=[SparsityCallback(method)]).fit(TinyNet())
        ckpt_path = tmp_path / "truncated.ckpt"
        trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[SparsityCallback(method, harden_on_fit_end=False)])
        trainer.fit(TinyNet())
        trainer.save_checkpoint(tmp_path / "full.ckpt")
        ckpt_path.write_bytes((tmp_path / "full.ckpt").read_bytes()[:2000])
    elif failure == "missing-checkpoint":
        ckpt_path = tmp_path / "no-such.ckpt"
    model = BrokenData() if failure == "broken-dataloader" else TinyNet()
    parameters, before = list(model.parameters()), model_tensors(model)

    with pytest.raises(Exception) as raised:
        make_trainer(tmp_path, callbacks=[SparsityCallback(method)]).fit(model, ckpt_path=ckpt_path)

    assert "harden" not in "".join(getattr(raised.value, "__notes__", []))
    _given_back(model, parameters, before)


def test_a_fit_that_fails_after_training_keeps_the_trained_state_and_says_how_to_go_on(tmp_path: Path) -> None:
    model = TinyNet()
    callback = SparsityCallback(ST3(0.5, start=0, end=4))
    advice = r"failed after 8 optimizer steps.*Resume from your last checkpoint.*harden"
    with pytest.warns(UserWarning, match=advice), pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(tmp_path, max_epochs=3, callbacks=[callback, Crash(1)]).fit(model)
    assert list(sparsity_parametrizations(model)) == ["conv", "fc"]  # nothing trained is lost
    assert zeros(model.conv.weight, model.fc.weight) == round(0.5 * N_WEIGHTS)


def test_resuming_str_with_another_threshold_decay_warns_and_trains(tmp_path: Path) -> None:
    _fit_with_checkpoints(tmp_path / "first", SparsityCallback(STR(s_init=-3.0, threshold_decay=0.05)), max_epochs=1)
    model = TinyNet(lr_halving_epochs=2)
    callback = SparsityCallback(STR(s_init=-3.0, threshold_decay=0.1))
    with pytest.warns(UserWarning, match=r"- threshold_decay: 0.05 in the checkpoint, 0.1 here"):
        trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[callback])
        trainer.fit(model, ckpt_path=tmp_path / "first" / "ckpt" / "epoch=0.ckpt")
    assert trainer.global_step == 16


# ----------------------------------------------------------------- the LightningModule's own hooks


class BuiltInConfigureModel(TinyNet):
    """Layers made in `configure_model`, Lightning's pattern for large models."""

    def __init__(self) -> None:
        super().__init__()
        del self.conv, self.fc

    def configure_model(self) -> None:
        if not hasattr(self, "fc"):
            self.conv = nn.Conv1d(1, 4, 3, padding=1)
            self.fc = nn.Linear(32, 2)


class BuiltInSetup(BuiltInConfigureModel):
    def configure_model(self) -> None:
        pass

    def setup(self, stage: str) -> None:
        super().configure_model()


PRETRAINED = {name: value + 1.0 for name, value in TinyNet().state_dict().items()}


class PretrainedInSetup(TinyNet):
    """Loads pretrained weights into the model as written, in `setup`."""

    def setup(self, stage: str) -> None:
        self.load_state_dict(PRETRAINED)


class StartingWeights(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.conv = pl_module.conv.parametrizations.weight.original.detach().clone()


@pytest.mark.parametrize("model_class", [BuiltInConfigureModel, BuiltInSetup, PretrainedInSetup])
def test_layers_built_or_loaded_in_setup_and_configure_model_are_sparsified(
    tmp_path: Path, model_class: type[TinyNet]
) -> None:
    model, spy = model_class(), StartingWeights()
    make_trainer(tmp_path, callbacks=[SparsityCallback(ST3(0.5, start=0, end=4)), spy]).fit(model)
    assert zeros(model.conv.weight, model.fc.weight) == round(0.5 * N_WEIGHTS)
    if model_class is PretrainedInSetup:
        assert torch.equal(spy.conv, PRETRAINED["conv.weight"])


class GroupedByName(TinyNet):
    """The common "decay only parameters whose name ends in `weight`" grouping."""

    def configure_optimizers(self) -> Any:
        named = dict(self.named_parameters())
        decay = [p for n, p in named.items() if n.endswith("weight")]
        other = [p for n, p in named.items() if not n.endswith("weight")]
        groups = [{"params": decay, "weight_decay": 1e-2}, {"params": other, "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=0.1)


def test_name_based_decay_grouping_is_named_in_a_warning(tmp_path: Path) -> None:
    named = r"not to the sparsified weights of conv, fc.*parametrizations.weight.original"
    with pytest.warns(UserWarning, match=named):
        make_trainer(tmp_path, callbacks=[SparsityCallback(ST3(0.5, start=0, end=4))]).fit(GroupedByName())


class MinGPTStyle(TinyNet):
    """minGPT's `configure_optimizers`: decay by module type and name suffix, every parameter accounted for."""

    def configure_optimizers(self) -> Any:
        decay, no_decay = set(), set()
        for module_name, module in self.named_modules():
            for name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{name}" if module_name else name
                if name.endswith("bias"):
                    no_decay.add(full)
                elif name.endswith("weight") and isinstance(module, (nn.Linear, nn.Conv1d)):
                    decay.add(full)
        params = dict(self.named_parameters())
        assert not params.keys() - (decay | no_decay), f"parameters {params.keys() - (decay | no_decay)} not grouped"
        groups = [
            {"params": [params[n] for n in sorted(decay)], "weight_decay": 0.1},
            {"params": [params[n] for n in sorted(no_decay)], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=1e-3)


def test_a_name_based_configure_optimizers_that_fails_says_why_and_gets_the_model_back(tmp_path: Path) -> None:
    model = MinGPTStyle()
    parameters, before = list(model.parameters()), model_tensors(model)
    with pytest.raises(AssertionError) as raised:
        make_trainer(tmp_path, callbacks=[SparsityCallback(ST3(0.5, start=0, end=4))]).fit(model)
    (note,) = raised.value.__notes__
    assert "named `<layer>.parametrizations.weight.original`" in note and "group them by module type" in note
    _given_back(model, parameters, before)


# -------------------------------------------------------------------------------- short and early ends


def test_fast_dev_run_trains_to_the_target(tmp_path: Path) -> None:
    model = TinyNet()
    make_trainer(tmp_path, fast_dev_run=True, callbacks=[SparsityCallback("st3", target_sparsity=0.5)]).fit(model)
    assert zeros(model.conv.weight, model.fc.weight) == round(0.5 * N_WEIGHTS)


def test_a_fit_that_stops_early_warns_with_target_reached_sparsity_and_step(tmp_path: Path) -> None:
    model = TinyNet()
    stop = EarlyStopping("train_loss", patience=0, min_delta=10.0, check_on_train_epoch_end=True)
    with pytest.warns(UserWarning, match=r"ended at optimizer step 16 with \d+\.\d% sparsity, below the 90\.0% target"):
        make_trainer(tmp_path, max_epochs=20, callbacks=[SparsityCallback("st3", 0.9), stop]).fit(model)


def test_a_fit_that_reaches_its_target_does_not_warn(tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, callbacks=[SparsityCallback(ST3(0.5, start=0, end=4))]).fit(TinyNet())
    assert not [w for w in caught if "target" in str(w.message)]


def test_resuming_with_a_longer_run_warns_that_the_schedule_moved(tmp_path: Path) -> None:
    _fit_with_checkpoints(tmp_path / "short", SparsityCallback(ST3(0.8)), max_epochs=4)
    with pytest.warns(UserWarning, match=r"- total_steps: 32 in the checkpoint, 160 here"):
        _fit_with_checkpoints(
            tmp_path / "long", SparsityCallback(ST3(0.8)), ckpt_path=tmp_path / "short" / "ckpt" / "epoch=3.ckpt",
            max_epochs=20,
        )  # fmt: skip


# ------------------------------------------------------------------------------------ weight averaging


@pytest.mark.parametrize(
    "averaging", [lambda: EMAWeightAveraging(decay=0.99), lambda: StochasticWeightAveraging(swa_lrs=0.01)],
    ids=["ema", "swa"],
)  # fmt: skip
def test_weight_averaging_is_refused_before_anything_changes(tmp_path: Path, averaging: Any) -> None:
    model = TinyNet()
    parameters, before = list(model.parameters()), model_tensors(model)
    with pytest.raises(ValueError, match=r"cannot train together with (EMAWeightAveraging|StochasticWeightAveraging)"):
        make_trainer(tmp_path, callbacks=[SparsityCallback(ST3(0.9)), averaging()]).fit(model)
    _given_back(model, parameters, before)


def test_a_module_loading_weights_in_setup_still_gets_its_resume_checked(tmp_path: Path) -> None:
    _fit_with_checkpoints(tmp_path / "st3", SparsityCallback(ST3(0.5, start=0, end=4)), max_epochs=1)
    model = PretrainedInSetup()
    with pytest.raises(ValueError, match=r"(?s)Cannot resume .*- method: 'st3' in the checkpoint, 'str' here"):
        trainer = make_trainer(tmp_path, callbacks=[SparsityCallback(STR(s_init=-3.0, threshold_decay=0.05))])
        trainer.fit(model, ckpt_path=tmp_path / "st3" / "ckpt" / "epoch=0.ckpt")
    assert not sparsity_parametrizations(model)
