"""Checkpoints of sparse runs: exact resume, refused resumes, inference loading, dense starts."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import fsspec
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_sparse import ST3, SparsityCallback, harden, harden_state_dict, load_hardened
from lightning_sparse.checkpoint import changed_settings, check_resume, describe_changes, read_checkpoint
from lightning_sparse.layers import parametrize_weights, select_weights, sparsity_parametrizations
from lightning_sparse.methods.st3 import StraightThroughSoftThreshold, update_thresholds
from lightning_sparse.methods.str_method import LearnedSoftThreshold
from models import N_WEIGHTS, Crash, TinyNet, make_trainer, model_tensors, zeros

EPOCHS = 4  # 8 optimizer steps each
STR_ARGS: dict[str, Any] = {"method": "str", "s_init": -3.0, "threshold_decay": 0.05}
# Ramp over steps 3..13, masks frozen from step 19: a resume after epoch 1 lands mid-ramp, after epoch 3 frozen.
ST3_ARGS: dict[str, Any] = {"method": "st3", "target_sparsity": 0.8, "start": 0.1, "end": 0.4, "freeze_at": 0.6}
UNFROZEN_ST3_ARGS = {**ST3_ARGS, "freeze_at": None}


def fit(root: Path, callback_args: dict[str, Any], *callbacks: pl.Callback, ckpt_path: Path | None = None) -> TinyNet:
    """A fresh seeded TinyNet (with a scheduler) trained for EPOCHS under SparsityCallback, saving every epoch."""
    pl.seed_everything(0)
    model = TinyNet(lr_halving_epochs=2)
    saver = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}")
    callback = SparsityCallback(**callback_args)
    trainer = make_trainer(root, max_epochs=EPOCHS, enable_checkpointing=True, callbacks=[callback, saver, *callbacks])
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize(
    ("callback_args", "epochs_done"),
    [
        (STR_ARGS, 2),
        (ST3_ARGS, 1),
        (ST3_ARGS, 3),
        ({"method": "str", "target_sparsity": 0.75, "start": 2, "end": 20}, 1),
    ],
    ids=["str", "st3-mid-ramp", "st3-frozen", "str-target-mid-ramp"],
)
def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(
    tmp_path: Path, callback_args: dict[str, Any], epochs_done: int
) -> None:
    reference = fit(tmp_path / "full", callback_args)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "crashed", callback_args, Crash(epochs_done))
    checkpoint = tmp_path / "crashed" / "ckpt" / f"epoch={epochs_done - 1}.ckpt"
    assert not (tmp_path / "crashed" / "ckpt" / f"epoch={epochs_done}.ckpt").exists()

    resumed = fit(tmp_path / "resumed", callback_args, ckpt_path=checkpoint)

    expected, actual = reference.state_dict(), resumed.state_dict()  # both hardened at fit end
    assert actual.keys() == expected.keys() == TinyNet().state_dict().keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-5, msg=name)
    assert (resumed.fc.weight == 0).any()


def test_sparse_checkpoint_loads_for_inference_and_hardened_state_loads_strictly(tmp_path: Path) -> None:
    model = fit(tmp_path, ST3_ARGS)  # hardened at fit end, right after the last epoch's checkpoint
    last = tmp_path / "ckpt" / f"epoch={EPOCHS - 1}.ckpt"
    assert "fc.parametrizations.weight.original" in torch.load(last, weights_only=True)["state_dict"]

    loaded = load_hardened(TinyNet, last)

    assert type(loaded) is TinyNet and not sparsity_parametrizations(loaded)
    assert loaded.hparams.lr_halving_epochs == 2
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    fresh = TinyNet()
    assert not fresh.load_state_dict(model.state_dict(), strict=True).missing_keys
    x = torch.randn(3, 1, 8)
    assert torch.equal(fresh(x), model(x))


def test_test_with_best_checkpoint_after_a_hardening_fit(tmp_path: Path) -> None:
    # The standard `trainer.fit(...); trainer.test(ckpt_path="best")`: the checkpoint is sparse, the model hardened.
    model = TinyNet()
    saver = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss")
    trainer = make_trainer(
        tmp_path,
        limit_val_batches=None,
        enable_checkpointing=True,
        callbacks=[SparsityCallback("st3", 0.5, start=0, end=4), saver],
    )
    trainer.fit(model)
    best = torch.load(saver.best_model_path, weights_only=True)["state_dict"]

    trainer.test(model, ckpt_path="best", verbose=False)

    assert not sparsity_parametrizations(model)
    for name, value in harden_state_dict(best).items():
        assert torch.equal(model.state_dict()[name], value), name


# --------------------------------------------------------------------------------------- refused resumes


@pytest.fixture(scope="module")
def sparse_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One-epoch STR and ST-3 runs' checkpoints, by method."""
    paths = {}
    for args in (STR_ARGS, ST3_ARGS):
        root = tmp_path_factory.mktemp(args["method"])
        trainer = make_trainer(root, max_epochs=1, callbacks=[SparsityCallback(**args)])
        trainer.fit(TinyNet())
        trainer.save_checkpoint(root / "sparse.ckpt")  # after fit end, so from a hardened model
        paths[args["method"]] = root / "sparse.ckpt"
    return paths


def _fit_refused(tmp_path: Path, ckpt_path: Path, callback: SparsityCallback, match: str) -> None:
    model = TinyNet()
    weight, before = model.fc.weight, model_tensors(model)
    trainer = make_trainer(tmp_path, callbacks=[callback])
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, ckpt_path=ckpt_path)
    # Given back as it came: no reparameterization, the same Parameter objects, the same values.
    assert not sparsity_parametrizations(model) and model.fc.weight is weight
    after = model_tensors(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not model._load_state_dict_pre_hooks


def test_resume_from_a_hardened_checkpoint_is_refused(tmp_path: Path, sparse_checkpoints: dict[str, Path]) -> None:
    _fit_refused(
        tmp_path, sparse_checkpoints["st3"], SparsityCallback(**ST3_ARGS), r"layers: only here: \['conv', 'fc'\]"
    )


@pytest.fixture(scope="module")
def mid_run_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints written during one-epoch STR and ST-3 (never frozen) runs, by method."""
    paths = {}
    for args in (STR_ARGS, UNFROZEN_ST3_ARGS):
        root = tmp_path_factory.mktemp(args["method"])
        saver = ModelCheckpoint(dirpath=root, filename="mid")
        callbacks = [SparsityCallback(**args), saver]
        trainer = make_trainer(root, max_epochs=1, enable_checkpointing=True, callbacks=callbacks)
        trainer.fit(TinyNet())
        paths[args["method"]] = root / "mid.ckpt"
    return paths


@pytest.mark.parametrize(
    ("saved", "resumed_args", "match"),
    [
        ("str", ST3_ARGS, r"- method: 'str' in the checkpoint, 'st3' here"),
        ("st3", STR_ARGS, r"- method: 'st3' in the checkpoint, 'str' here"),
        ("st3", {**ST3_ARGS, "method": "st3sigma"}, r"- method: 'st3' in the checkpoint, 'st3sigma' here"),
        ("st3", {**ST3_ARGS, "rescale": False}, r"- rescale: True in the checkpoint, False here"),
        ("st3", {**ST3_ARGS, "exclude": ["conv"]}, r"- layers: only in the checkpoint: \['conv'\]"),
        ("str", {**STR_ARGS, "include": ["fc"]}, r"- layers: only in the checkpoint: \['conv'\]"),
    ],
    ids=["str-to-st3", "st3-to-str", "st3-to-st3sigma", "rescale", "st3-layers", "str-layers"],
)
def test_mismatched_resume_is_refused_before_any_weight_is_loaded(
    tmp_path: Path, mid_run_checkpoints: dict[str, Path], saved: str, resumed_args: dict[str, Any], match: str
) -> None:
    _fit_refused(tmp_path, mid_run_checkpoints[saved], SparsityCallback(**resumed_args), match)


def test_resume_from_a_dense_checkpoint_is_refused_with_the_way_to_start_from_it(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(TinyNet())
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    refusal = r"no SparsityCallback state.*load_from_checkpoint"
    _fit_refused(tmp_path, tmp_path / "dense.ckpt", SparsityCallback(**ST3_ARGS), refusal)


def test_resume_with_a_changed_schedule_warns_and_continues(
    tmp_path: Path, mid_run_checkpoints: dict[str, Path]
) -> None:
    model = TinyNet()
    callback = SparsityCallback(**{**UNFROZEN_ST3_ARGS, "target_sparsity": 0.5}, harden_on_fit_end=False)
    changed = r"differ from the checkpoint's.*\n- target_sparsity: 0.8 in the checkpoint, 0.5"
    with pytest.warns(UserWarning, match=changed):
        make_trainer(tmp_path, callbacks=[callback]).fit(model, ckpt_path=mid_run_checkpoints["st3"])
    weights = [model.conv.weight, model.fc.weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.02)


def test_a_checkpoint_from_before_min_density_resumes_with_its_default_and_a_change_is_a_warning(
    tmp_path: Path, mid_run_checkpoints: dict[str, Path]
) -> None:
    checkpoint = torch.load(mid_run_checkpoints["st3"], weights_only=True)
    (state,) = [s for s in checkpoint["callbacks"].values() if "schedule_step" in s]
    del state["min_density"]  # as lightning-sparse 0.2.0 wrote it
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_epochs=1, callbacks=[SparsityCallback(**UNFROZEN_ST3_ARGS)]).fit(
            TinyNet(), ckpt_path=tmp_path / "old.ckpt"
        )
    assert [str(w.message) for w in caught if "differ from the checkpoint" in str(w.message)] == []
    # A minimum changes the thresholds from now on, not what the saved tensors mean: a resume may change it.
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's.*\n- min_density: 0.0 in the checkpoint, 0.05"):
        make_trainer(tmp_path, max_epochs=1, callbacks=[SparsityCallback(**UNFROZEN_ST3_ARGS, min_density=0.05)]).fit(
            TinyNet(), ckpt_path=tmp_path / "old.ckpt"
        )


def test_sparse_training_starts_from_a_dense_pretrained_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(TinyNet(lr=0.05))
    trainer.save_checkpoint(tmp_path / "dense.ckpt")
    model = TinyNet.load_from_checkpoint(tmp_path / "dense.ckpt")
    pretrained = model_tensors(model)

    class StartingWeights(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.fc = pl_module.fc.parametrizations.weight.original.detach().clone()

    spy = StartingWeights()
    make_trainer(tmp_path, callbacks=[SparsityCallback("st3", 0.75, start=0, end=8), spy]).fit(model)

    assert model.hparams.lr == 0.05
    assert torch.equal(spy.fc, pretrained["fc.weight"])
    assert zeros(model.fc.weight, model.conv.weight) == round(0.75 * N_WEIGHTS)


# ------------------------------------------------------------------------- plain PyTorch, no Trainer


def _sparse_net(method: str, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Reparameterized, then cast to `dtype` (thresholds included) as Lightning's true-precision plugins do."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(24, 3))
    if method == "str":
        parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-2.0))
        net.to(dtype)
    else:
        parametrize_weights(select_weights(net), lambda w, axis: StraightThroughSoftThreshold(w))
        net.to(dtype)
        layers = [w.parametrization for w in sparsity_parametrizations(net).values()]
        update_thresholds(layers, [m.parametrizations.weight.original for m in (net[0], net[2])], 0.6)
        if method == "st3-frozen":
            layers[0].freeze(net[0].parametrizations.weight.original)
    return net


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["str", "st3", "st3-frozen"])
def test_harden_state_dict_equals_harden(method: str, dtype: torch.dtype) -> None:
    net = _sparse_net(method, dtype)
    hardened = harden_state_dict(net.state_dict())
    expected = harden(net).state_dict()
    assert list(hardened) == list(expected)
    for name, value in expected.items():
        assert hardened[name].dtype == dtype
        assert torch.equal(hardened[name], value), name


def test_harden_state_dict_keeps_tied_weights_tied() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    net = nn.Sequential(a, b)
    parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-1.0))
    hardened = harden_state_dict(net.state_dict())
    assert torch.equal(hardened["0.weight"], hardened["1.weight"])
    assert (hardened["0.weight"] == 0).any()


def test_harden_state_dict_passes_other_parametrizations_through() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    parametrize_weights(select_weights(net, include=["0"]), lambda w, axis: LearnedSoftThreshold(s_init=-1.0))
    nn.utils.parametrizations.orthogonal(net[1])
    hardened = harden_state_dict(net.state_dict())
    assert list(hardened) == ["0.weight", "0.bias", "1.bias", *[k for k in net.state_dict() if k.startswith("1.param")]]
    fresh = nn.Sequential(nn.Linear(3, 3), nn.utils.parametrizations.orthogonal(nn.Linear(3, 3)))
    assert not fresh.load_state_dict(hardened, strict=True).missing_keys
    assert torch.equal(fresh[1].weight, net[1].weight)


def test_read_checkpoint_reads_local_and_fsspec_paths(tmp_path: Path) -> None:
    checkpoint = {"callbacks": {"SparsityCallback": {"method": "st3"}}, "state_dict": {"w": torch.ones(2)}}
    torch.save(checkpoint, tmp_path / "a.ckpt")
    with fsspec.open("memory://lightning-sparse/a.ckpt", "wb") as file:
        torch.save(checkpoint, file)
    for path in (tmp_path / "a.ckpt", f"file://{tmp_path / 'a.ckpt'}", "memory://lightning-sparse/a.ckpt"):
        loaded = read_checkpoint(path, weights_only=True)
        assert loaded["callbacks"] == checkpoint["callbacks"] and torch.equal(loaded["state_dict"]["w"], torch.ones(2))


def test_check_resume_says_what_differs() -> None:
    saved = {"method": "st3", "target_sparsity": 0.9, "rescale": True, "layers": ["a", "b"]}
    must_keep = {"method", "layers", "rescale"}
    assert check_resume(saved, dict(saved), must_keep) == {}
    assert check_resume(saved, {**saved, "target_sparsity": 0.8}, must_keep) == {"target_sparsity": (0.9, 0.8)}
    with pytest.raises(
        ValueError,
        match=r"different sparsity reparameterization:\n- rescale: True in the checkpoint, False here\n"
        r"- layers: only here: \['c'\]\nResume with the checkpoint's settings, or start a new sparse run",
    ):
        check_resume(saved, {**saved, "rescale": False, "layers": ["a", "b", "c"], "target_sparsity": 0.8}, must_keep)
    # What may change is the caller's choice: the same difference refused or let through.
    assert check_resume(saved, {**saved, "rescale": False}, {"method"}) == {"rescale": (True, False)}
    with pytest.raises(ValueError, match=r"no SparsityCallback state.*load_from_checkpoint"):
        check_resume(None, saved, must_keep)


def test_changed_settings_and_their_description() -> None:
    saved = {"method": "st3", "end": 0.5, "layers": ["conv", "fc"]}
    current = {"method": "st3", "end": 0.8, "layers": ["fc", "head"], "freeze_at": 0.9}
    changes = changed_settings(saved, current)
    assert changes == {"end": (0.5, 0.8), "layers": (["conv", "fc"], ["fc", "head"]), "freeze_at": (None, 0.9)}
    assert describe_changes(changes).splitlines() == [
        "- end: 0.5 in the checkpoint, 0.8 here",
        "- layers: only in the checkpoint: ['conv']; only here: ['head']",
        "- freeze_at: None in the checkpoint, 0.9 here",
    ]


@pytest.mark.parametrize(
    "callback",
    [
        lambda: SparsityCallback("st3", np.linspace(0.5, 0.9, 3)[1], start=np.int64(0), end=np.int64(4)),
        lambda: SparsityCallback(
            ST3(np.float32(0.7), start=np.int64(0), end=np.float64(0.25), freeze_at=np.float32(0.5))
        ),
    ],
    ids=["name", "object"],
)
def test_numpy_settings_are_saved_as_python_numbers_so_the_checkpoint_loads_weights_only(
    tmp_path: Path, callback: Any
) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path, filename="sparse")
    make_trainer(tmp_path, enable_checkpointing=True, callbacks=[callback(), saver]).fit(TinyNet())

    checkpoint = torch.load(tmp_path / "sparse.ckpt", weights_only=True)  # refuses numpy scalars
    state = checkpoint["callbacks"]["SparsityCallback"]
    assert type(state["target_sparsity"]) is float and state["target_sparsity"] == pytest.approx(0.7)
    assert type(state["start"]) is int and type(state["end"]) in (int, float)
    loaded = load_hardened(TinyNet, tmp_path / "sparse.ckpt")  # `weights_only` left to its default
    assert zeros(loaded.conv.weight, loaded.fc.weight) == round(state["target_sparsity"] * N_WEIGHTS)
