"""`SparsityCallback`: both spellings of a method, every bad argument refused early, and real Trainer fits."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sparse import ST3, STR, LinearSchedule, SparsityCallback, SparsityMethod
from lightning_sparse.layers import sparsity_parametrizations
from models import N_WEIGHTS, BatchNormNet, NoLayers, TinyNet, assert_untouched, make_trainer, model_tensors, zeros

# The method objects each name stands for, to build the same callback both ways.
OBJECTS: dict[str, Callable[..., SparsityMethod]] = {
    "st3": ST3,
    "st3sigma": lambda **settings: ST3(sigma=True, **settings),
    "str": STR,
}
CALLBACK_ARGUMENTS = {"include", "exclude", "harden_on_fit_end", "log_every_n_steps"}


def by_name(method: str, **kwargs: Any) -> SparsityCallback:
    return SparsityCallback(method, **kwargs)


def by_object(method: str, **kwargs: Any) -> SparsityCallback:
    """The same callback as `by_name`, with the settings in the method object and the rest beside it."""
    settings = {k: v for k, v in kwargs.items() if k not in CALLBACK_ARGUMENTS}
    beside = {k: v for k, v in kwargs.items() if k in CALLBACK_ARGUMENTS}
    return SparsityCallback(OBJECTS[method](**settings), **beside)


SPELLINGS = [pytest.param(by_name, id="name"), pytest.param(by_object, id="object")]
BOTH, NAME_ONLY = (by_name, by_object), (by_name,)  # settings of another method have no object form


def test_the_method_is_an_object_whichever_the_spelling() -> None:
    assert by_name("st3", target_sparsity=0.9, freeze_at=0.9).method == ST3(target_sparsity=0.9, freeze_at=0.9)
    assert by_name("st3sigma", target_sparsity=0.9).method == ST3(0.9, sigma=True)
    assert by_name("st3sigma", target_sparsity=0.9, min_density=0.01).method == ST3(0.9, sigma=True, min_density=0.01)
    assert by_name("str", s_init=-3.0).method == STR(s_init=-3.0)
    method = ST3(0.8, start=0, end=10)
    callback = SparsityCallback(method, include=nn.Linear, harden_on_fit_end=False)
    assert callback.method is method
    assert (callback.include, callback.exclude, callback.harden_on_fit_end) == ([nn.Linear], [], False)


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("st3", {"target_sparsity": 0.9, "freeze_at": 0.9}),
        ("st3sigma", {"target_sparsity": 0.8, "start": 0, "end": 8}),
        ("str", {"s_init": -3.0, "threshold_decay": 0.05}),
    ],
)
def test_both_spellings_train_to_the_same_weights(tmp_path: Path, method: str, settings: dict[str, Any]) -> None:
    results = []
    for spell in (by_name, by_object):
        torch.manual_seed(0)
        model = TinyNet()
        make_trainer(tmp_path, callbacks=[spell(method, **settings)]).fit(model)
        results.append(model.state_dict())
    named, made = results
    assert named.keys() == made.keys()
    assert all(torch.equal(named[k], made[k]) for k in named)
    assert zeros(*(v for k, v in named.items() if k.endswith("weight"))) > 0


# ----------------------------------------------------------------------------- refused at construction

REAL = r"must be a real number \(int or float\), got"
DOES_NOT_APPLY = r"does not apply to method='{}' \(its settings: .*\); remove it, or pick the method it belongs to$"

# (method, arguments, error, match, spellings): every argument checked when the callback is built.
BAD_ARGUMENTS = [
    ("rigl", {}, ValueError, r"`method` must be one of 'st3', 'st3sigma', 'str' or a method object, got 'rigl'",
     NAME_ONLY),
    ("st3", {}, ValueError, r"`target_sparsity` is required: the final fraction of zeros, e.g. 0.9", BOTH),
    ("st3", {"target_sparsity": 1.0}, ValueError, r"`target_sparsity` must be a finite number in \[0, 1\), got 1.0",
     BOTH),
    ("st3sigma", {"target_sparsity": -0.1}, ValueError, r"`target_sparsity` must be a finite number in \[0, 1\)", BOTH),
    ("st3", {"target_sparsity": math.nan}, ValueError, r"`target_sparsity` must be a finite number in \[0, 1\)", BOTH),
    ("st3", {"target_sparsity": "0.5"}, TypeError, rf"`target_sparsity` {REAL} '0.5' \(str\)$", BOTH),
    ("st3", {"target_sparsity": False}, TypeError, rf"`target_sparsity` {REAL} False \(bool\)$", BOTH),
    ("st3", {"target_sparsity": True}, TypeError, rf"`target_sparsity` {REAL} True \(bool\)$", BOTH),
    ("st3", {"target_sparsity": torch.tensor(0.5)}, TypeError,
     rf"`target_sparsity` {REAL} tensor\(0.5000\) \(Tensor\); pass a Python number, e.g. `tensor.item\(\)`$", BOTH),
    ("str", {"freeze_at": 0.9}, ValueError, "`freeze_at` " + DOES_NOT_APPLY.format("str"), NAME_ONLY),
    ("st3", {"target_sparsity": 0.9, "start": 10, "end": 5}, ValueError, r"`end` \(5\) must come after `start` \(10\)",
     BOTH),
    ("st3", {"target_sparsity": 0.9, "start": 0.5, "end": 0.2}, ValueError,
     r"`end` \(0.2\) must come after `start` \(0.5\)", BOTH),
    ("st3", {"target_sparsity": 0.9, "end": 0.5, "freeze_at": 0.3}, ValueError,
     r"`freeze_at` \(0.3\) must not come before `end` \(0.5\): masks would freeze mid-schedule", BOTH),
    ("st3", {"target_sparsity": 0.9, "start": -1}, ValueError, r"`start` as an optimizer step \(int\) must be >= 0",
     BOTH),
    ("st3", {"target_sparsity": 0.9, "end": 1.5}, ValueError,
     r"`end` as a fraction of training \(float\) must lie in \[0, 1\], got 1.5; give a step as an int", BOTH),
    ("st3", {"target_sparsity": 0.9, "start": "0.1"}, TypeError,
     r"`start` must be an optimizer step \(int\) or a fraction of training \(float\), got '0.1' \(str\)", BOTH),
    ("st3", {"target_sparsity": 0.9, "freeze_at": True}, TypeError,
     r"`freeze_at` must be an optimizer step \(int\) or a fraction of training \(float\), got True", BOTH),
    ("st3", {"target_sparsity": 0.9, "schedule": "exp"}, ValueError,
     r"`schedule` must be one of 'cubic', 'linear', 'constant', got 'exp'", BOTH),
    ("st3", {"target_sparsity": 0.9, "schedule": ["cubic"]}, TypeError,
     r"`schedule` must be one of 'cubic', 'linear', 'constant' or an object with a `sparsity_at\(step\)` method, "
     r"got \['cubic'\] \(list\)", BOTH),
    ("st3", {"target_sparsity": 0.5, "schedule": LinearSchedule(0.5, 0, 4)}, ValueError,
     r"`target_sparsity` cannot be combined with a schedule object, which sets the sparsity at every step; remove "
     r"them, or give `schedule` by name", BOTH),
    ("st3", {"start": 0, "end": 4, "schedule": LinearSchedule(0.5, 0, 4)}, ValueError,
     r"`start`, `end` cannot be combined with a schedule object", BOTH),
    ("st3", {"target_sparsity": 0.9, "rescale": "False"}, TypeError, r"`rescale` must be True or False, got 'False'",
     BOTH),
    ("st3", {"target_sparsity": 0.9, "min_density": 0.2}, ValueError,
     r"`min_density` \(0.2\) must be at most 1 - `target_sparsity` \(0.9\): the layers cannot each keep more than the "
     r"fraction of weights the target leaves; lower one of them", BOTH),
    ("st3sigma", {"target_sparsity": 0.5, "min_density": -0.01}, ValueError,
     r"`min_density` must be a finite number in \[0, 1\], got -0.01", BOTH),
    ("st3", {"target_sparsity": 0.9, "min_density": "0.01"}, TypeError, rf"`min_density` {REAL} '0.01' \(str\)$", BOTH),
    ("str", {"min_density": 0.01}, ValueError, "`min_density` " + DOES_NOT_APPLY.format("str"), NAME_ONLY),
    ("st3", {"target_sparsity": 0.9, "harden_on_fit_end": "no"}, TypeError,
     r"`harden_on_fit_end` must be True or False, got 'no' \(str\)", BOTH),
    ("st3", {"target_sparsity": 0.9, "s_init": -5.0}, ValueError, "`s_init` " + DOES_NOT_APPLY.format("st3"),
     NAME_ONLY),
    ("st3sigma", {"target_sparsity": 0.9, "threshold_decay": 1e-4}, ValueError,
     "`threshold_decay` " + DOES_NOT_APPLY.format("st3sigma"), NAME_ONLY),
    ("str", {"freeze_at": 0.1, "rescale": False}, ValueError,
     r"`freeze_at`, `rescale` do not apply to method='str' \(its settings: s_init, threshold_decay, target_sparsity, "
     r"start, end, schedule\)", NAME_ONLY),
    ("str", {"schedule": "linear"}, ValueError, "`target_sparsity` is required", BOTH),
    ("str", {"s_init": "-5"}, TypeError, rf"`s_init` {REAL} '-5' \(str\)$", BOTH),
    ("str", {"s_init": True}, TypeError, rf"`s_init` {REAL} True \(bool\)$", BOTH),
    ("str", {"s_init": math.inf}, ValueError, r"`s_init` must be a finite number, got inf", BOTH),
    ("str", {"threshold_decay": "0.1"}, TypeError, rf"`threshold_decay` {REAL} '0.1' \(str\)$", BOTH),
    ("str", {"threshold_decay": True}, TypeError, rf"`threshold_decay` {REAL} True \(bool\)$", BOTH),
    ("str", {"threshold_decay": math.nan}, ValueError, r"`threshold_decay` must be a finite number in \[0, inf\]",
     BOTH),
    ("str", {"threshold_decay": -1.0}, ValueError, r"`threshold_decay` must be a finite number in \[0, inf\], got -1.0",
     BOTH),
    ("str", {"include": [3]}, TypeError,
     r"`include` takes module types \(nn.Module subclasses\) or name patterns .* got 3", BOTH),
    ("str", {"include": {"conv"}}, TypeError, r"`include` takes module types \(nn.Module subclasses\) or name", BOTH),
    ("str", {"exclude": [nn.functional.relu]}, TypeError, r"`exclude` takes module types .* got <function relu",
     BOTH),
]  # fmt: skip


def _id(arguments: dict[str, Any]) -> str:
    def short(value: Any) -> str:
        return repr(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__

    return ",".join(f"{name}={short(value)}" for name, value in arguments.items())


@pytest.mark.parametrize(
    ("method", "arguments", "error", "match", "spell"),
    [
        pytest.param(method, arguments, error, match, spell, id=f"{spell.__name__}-{method}-{_id(arguments)}")
        for method, arguments, error, match, spellings in BAD_ARGUMENTS
        for spell in spellings
    ],
)
def test_bad_arguments_raise_at_construction_naming_the_argument(
    method: str, arguments: dict[str, Any], error: type[Exception], match: str, spell: Callable[..., Any]
) -> None:
    with pytest.raises(error, match=match):
        spell(method, **arguments)


@pytest.mark.parametrize(
    ("method", "beside", "named"),
    [
        (ST3(0.9), {"target_sparsity": 0.8}, "`target_sparsity`"),
        (ST3(0.9), {"start": 0.1, "end": 0.6}, "`start`, `end`"),
        (ST3(0.9), {"schedule": "linear"}, "`schedule`"),
        (STR(), {"s_init": -1.0}, "`s_init`"),
        (STR(), {"threshold_decay": 0.0}, "`threshold_decay`"),
        (STR(), {"rescale": True}, "`rescale`"),
    ],
)
def test_settings_beside_a_method_object_are_refused(
    method: SparsityMethod, beside: dict[str, Any], named: str
) -> None:
    cls = type(method).__name__
    with pytest.raises(
        ValueError,
        match=rf"^{named} given beside a method object: put the settings in the method object, e.g. "
        rf"SparsityCallback\({cls}\(...\)\), or give the method by name$",
    ):
        SparsityCallback(method, **beside)


# ------------------------------------------------------------------------------ accepted filter forms


@pytest.mark.parametrize("spell", SPELLINGS)
@pytest.mark.parametrize(
    ("filters", "expected", "sparsified"),
    [
        ({"include": nn.Linear}, ([nn.Linear], []), ["fc"]),
        ({"include": "conv"}, (["conv"], []), ["conv"]),  # one name pattern, not the letters c, o, n, v
        ({"exclude": None}, (None, []), ["conv", "fc"]),
        ({"exclude": "fc", "include": None}, (None, ["fc"]), ["conv"]),
        ({"include": ("conv", nn.Linear)}, (["conv", nn.Linear], []), ["conv", "fc"]),
    ],
    ids=["include-type", "include-pattern", "exclude-None", "exclude-pattern", "include-tuple"],
)
def test_a_single_filter_or_none_is_taken_as_a_list(
    tmp_path: Path, spell: Callable[..., SparsityCallback], filters: dict[str, Any], expected: tuple,
    sparsified: list[str],
) -> None:  # fmt: skip
    callback = spell("st3", target_sparsity=0.5, start=0, end=4, harden_on_fit_end=False, **filters)
    assert (callback.include, callback.exclude) == expected
    model = TinyNet()
    make_trainer(tmp_path, callbacks=[callback]).fit(model)
    assert list(sparsity_parametrizations(model)) == sparsified
    weights = [getattr(model, name).weight for name in sparsified]
    assert zeros(*weights) == round(0.5 * sum(w.numel() for w in weights))
    dense = [m.weight for name, m in (("conv", model.conv), ("fc", model.fc)) if name not in sparsified]
    assert zeros(*dense) == 0  # only the chosen layers were sparsified


# ------------------------------------------------------------------- refused at setup, model untouched


@pytest.mark.parametrize("spell", SPELLINGS)
@pytest.mark.parametrize(
    ("model_class", "args", "match"),
    [
        (NoLayers, {}, r"NoLayers has no weight to sparsify: no Conv1d/2d/3d, Linear or MultiheadAttention .*include"),
        (TinyNet, {"include": []}, r"TinyNet has no weight to sparsify"),
        (TinyNet, {"exclude": ["classifier"]}, r"`exclude` entry 'classifier' matches no module.*are: conv, fc"),
        (TinyNet, {"include": ["encoder.*"]}, r"`include` entry 'encoder.\*' matches no module"),
        (TinyNet, {"include": [nn.Conv2d]}, r"`include` entry <class 'torch.nn.modules.conv.Conv2d'> matches no"),
        (TinyNet, {"start": 0.9, "end": 3}, r"`end` \(step 3\) must come after `start` \(step 14\)"),
        (TinyNet, {"end": 0.5, "freeze_at": 3},
         r"`freeze_at` \(step 3\) must not come before `end` \(step 8\): masks would freeze mid-schedule"),
        (TinyNet, {"freeze_at": 0.3, "end": 10},
         r"`freeze_at` \(step 5\) must not come before `end` \(step 10\): masks would freeze mid-schedule"),
        (TinyNet, {"schedule": "constant", "start": 0.5, "freeze_at": 3},
         r"`freeze_at` \(step 3\) must not come before `start` \(step 8\)"),
    ],
    ids=["no-layers", "include-nothing", "exclude-typo", "include-typo", "include-type", "end-before-start-mixed",
         "freeze-step-before-end", "freeze-fraction-before-end", "freeze-before-constant-start"],
)  # fmt: skip
def test_setup_refuses_what_cannot_be_checked_earlier_and_leaves_the_model_untouched(
    tmp_path: Path, spell: Callable[..., SparsityCallback], model_class: type[TinyNet], args: dict[str, Any],
    match: str,
) -> None:  # fmt: skip
    callback = spell("st3", target_sparsity=0.5, **args)  # accepted: only the run length (16 steps) breaks it
    model = model_class()
    before = model_tensors(model)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, callbacks=[callback]).fit(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("spell", SPELLINGS)
@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"target_sparsity": 0.5}, "start"),
        ({"target_sparsity": 0.5, "start": 0, "end": 0.5}, "end"),
        ({"target_sparsity": 0.5, "start": 0, "end": 5, "freeze_at": 0.9}, "freeze_at"),
        ({"schedule": LinearSchedule(0.5, 0, 5), "freeze_at": 0.9}, "freeze_at"),
    ],
    ids=["start", "end", "freeze_at", "freeze_at-schedule-object"],
)
def test_unknown_run_length_with_fractions_is_refused_at_setup(
    tmp_path: Path, spell: Callable[..., SparsityCallback], args: dict[str, Any], named: str
) -> None:
    model = TinyNet()
    before = model_tensors(model)
    trainer = make_trainer(tmp_path, max_epochs=-1, callbacks=[spell("st3", **args)])
    with pytest.raises(ValueError, match=rf"`{named}=0\.\d+` is a fraction of training.*set `max_steps`"):
        trainer.fit(model)
    assert_untouched(model, before)


# ------------------------------------------------------------------------------------ real Trainer fits


def _sparsified_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]


@pytest.mark.parametrize("method", ["st3", "st3sigma"])
def test_st3_global_sparsity_after_fit(tmp_path: Path, method: str) -> None:
    model = BatchNormNet()
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[SparsityCallback(method, target_sparsity=0.9)])
    trainer.fit(model, model.train_dataloader())

    weights = _sparsified_weights(model)
    assert zeros(*weights) / sum(w.numel() for w in weights) == pytest.approx(0.9, abs=0.005)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes
    assert len(list(model.parameters())) + len(list(model.buffers())) == n_tensors
    assert all(type(w) is nn.Parameter for w in weights)
    assert model.bn.weight.ne(0).all() and model.conv.bias.ne(0).all()  # norm layers and biases stay dense


def test_validation_during_fit_sees_sparse_weights(tmp_path: Path) -> None:
    model = BatchNormNet()
    zero_fractions = []

    class Probe(Callback):
        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            zero_fractions.append((pl_module.hidden.weight == 0).float().mean().item())

    callback = SparsityCallback(ST3(target_sparsity=0.9, start=0, end=8))
    trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=1, callbacks=[callback, Probe()])
    trainer.fit(model, model.train_dataloader(), model.val_dataloader())
    assert zero_fractions[-1] > 0.5


def test_tinynet_has_the_weights_the_tests_count() -> None:
    model = TinyNet()
    assert model.conv.weight.numel() + model.fc.weight.numel() == N_WEIGHTS == 76
