"""Checkpoints of sparse runs: hardening their saved state for inference, and checking a resume.

A checkpoint written during sparse training holds the model under its reparameterization: each
sparsified layer's raw weight as `<layer>.parametrizations.weight.original`, next to the method's
state (`...weight.0.<buffer or parameter>`, e.g. thresholds and masks). That is what an exact resume
needs, but the unmodified model expects `<layer>.weight`. `harden_state_dict` converts one into the
other, and `load_hardened` is `load_from_checkpoint` for such a checkpoint.

Like the callback, this module knows Lightning (its checkpoint format and `load_from_checkpoint`).
"""

from __future__ import annotations

import io
import os
import re
from collections import OrderedDict
from collections.abc import Collection, Mapping
from typing import IO, Any, TypeVar, cast

import lightning.pytorch as pl
import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH
from torch import Tensor

from lightning_sparse.methods import PARAMETRIZATIONS
from lightning_sparse.methods.base import weight_name

__all__ = [
    "changed_settings",
    "check_resume",
    "describe_changes",
    "harden_state_dict",
    "load_hardened",
    "read_checkpoint",
]

_LightningModuleT = TypeVar("_LightningModuleT", bound=pl.LightningModule)

_REPARAMETERIZED_KEY = re.compile(
    r"(?P<layer>(?:.+\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?P<entry>original|\d+\..+)"
)
_ENTRY_INDEX = re.compile(r"(?P<index>\d+)\.(?P<name>.+)")


@torch.no_grad()
def harden_state_dict(state_dict: Mapping[str, Any], layers: Collection[str] | None = None) -> dict[str, Any]:
    """The state dict of the hardened model, from one saved under lightning-sparse reparameterizations.

    Every lightning-sparse `<layer>.parametrizations.weight.*` group becomes `<layer>.weight`,
    holding the effective sparse weight (exact zeros, the method's shrink, rescale or frozen mask
    applied), computed by the method's own parametrization module in the saved dtypes. Everything else, other
    parametrizations included, passes through unchanged, in order. The result loads with strict
    keys into the unmodified model. As `harden` does, parametrizations stacked on lightning-sparse's
    stay: the group keeps them, on `original` holding the effective sparse weight (one without state
    leaves no trace in a state dict, so then the group becomes `<layer>.weight`).

    A group that is lightning-sparse's but lacks entries (a damaged or filtered state dict) raises a
    `ValueError` naming the layer and the missing keys. `layers`, the names of the layers sparsified
    (as a checkpoint's SparsityCallback state lists them), makes that check exact: each of their
    groups must be lightning-sparse's.

    Example:
        >>> from torch import nn
        >>> from torch.nn.utils import parametrize
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer = nn.Linear(4, 2)
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> plain = nn.Linear(4, 2)
        >>> plain.load_state_dict(harden_state_dict(layer.state_dict()))
        <All keys matched successfully>
        >>> torch.equal(plain.weight, layer.weight)
        True
    """
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state_dict.items():
        if match := _REPARAMETERIZED_KEY.fullmatch(key):
            groups.setdefault((match["layer"], match["tensor"]), {})[match["entry"]] = value
    effective = {group: _effective_weight(*group, entries) for group, entries in groups.items()}
    for name in layers or ():
        for (layer, tensor), weight in effective.items():
            if _group_name(layer, tensor) == name and weight is None:
                found = ", ".join(f"{layer}parametrizations.{tensor}.{entry}" for entry in groups[layer, tensor])
                raise ValueError(
                    f"weight {name!r} was sparsified, but its saved reparameterization is no lightning-sparse one: "
                    f"its entries are {found}, without the method's state ({layer}parametrizations.{tensor}.0.*); "
                    "the state dict is damaged or incomplete"
                )
    # Ours alone on a tensor: the group becomes the plain tensor, which goes before its module's first other
    # entry, where `harden` puts it too. Ours under others: they stay, on `original` holding the effective weight.
    alone = {
        group: weight
        for group, weight in effective.items()
        if weight is not None and all(entry == "original" or entry.startswith("0.") for entry in groups[group])
    }
    hardened: dict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        match = _REPARAMETERIZED_KEY.fullmatch(key)
        prefix = match["layer"] if match else key[: key.rfind(".") + 1]
        for (layer, tensor), weight in alone.items():
            if layer == prefix:
                hardened.setdefault(f"{layer}{tensor}", weight)
        if match is None or effective[match["layer"], match["tensor"]] is None:
            hardened[key] = value
        elif (match["layer"], match["tensor"]) in alone:
            continue
        elif match["entry"] == "original":
            hardened[key] = effective[match["layer"], match["tensor"]]
        elif (entry := _ENTRY_INDEX.fullmatch(match["entry"])) and entry["index"] != "0":
            # Parametrizations stacked on ours stay, one place down, as `harden` leaves them.
            hardened[
                f"{match['layer']}parametrizations.{match['tensor']}.{int(entry['index']) - 1}.{entry['name']}"
            ] = value
    if hasattr(state_dict, "_metadata"):
        hardened._metadata = state_dict._metadata  # type: ignore[attr-defined]  # module versions, for loading
    return hardened


def _group_name(layer: str, tensor: str) -> str:
    """The `weight_name` of the tensor whose parametrizations are saved as `<layer>parametrizations.<tensor>.*`."""
    return weight_name(layer.removesuffix("."), tensor)


def _effective_weight(layer: str, tensor: str, entries: dict[str, Any]) -> Tensor | None:
    """The effective weight of one weight's saved lightning-sparse reparameterization (the first in its
    chain); None for any other. Raises for a lightning-sparse one that lacks entries."""
    original = entries.get("original")
    if original is None:
        return None
    state = {name.removeprefix("0."): value for name, value in entries.items() if name.startswith("0.")}
    for parametrization_class in PARAMETRIZATIONS:
        try:
            parametrization = parametrization_class.from_state_dict(original, state)
        except KeyError as error:
            missing = ", ".join(f"{layer}parametrizations.{tensor}.0.{key}" for key in error.args)
            raise ValueError(
                f"weight {_group_name(layer, tensor)!r}: its saved {parametrization_class.__name__} lacks {missing}; "
                "the state dict is damaged or incomplete, and cannot be hardened"
            ) from None
        if parametrization is not None:
            return cast(Tensor, parametrization(original))
    return None


def read_checkpoint(path: _PATH | IO[bytes], weights_only: bool | None = None) -> dict[str, Any]:
    """Load a checkpoint on the CPU; a local file is memory-mapped, so tensors not used are not read.

    Remote paths (``s3://``, ``gs://``, ... anything fsspec opens) and file objects (an open file, a
    `BytesIO`), as `load_from_checkpoint` takes them, are read in full.

    Example:
        >>> read_checkpoint("checkpoints/last.ckpt")["callbacks"]["SparsityCallback"]  # doctest: +SKIP
        {'method': ..., 'target_sparsity': 0.9, 'start': 0.05, ..., 'layers': ['conv1', 'fc']}
    """
    checkpoint: dict[str, Any]
    if not isinstance(path, (str, os.PathLike)):
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
        return checkpoint
    fs, fs_path = url_to_fs(str(path))
    if isinstance(fs, LocalFileSystem):
        checkpoint = torch.load(fs_path, map_location="cpu", mmap=True, weights_only=weights_only)
        return checkpoint
    with fs.open(fs_path, "rb") as file:
        checkpoint = torch.load(file, map_location="cpu", weights_only=weights_only)
    return checkpoint


def load_hardened(
    module_class: type[_LightningModuleT],
    checkpoint_path: _PATH | IO[bytes],
    map_location: _MAP_LOCATION_TYPE = None,
    weights_only: bool | None = None,
    **kwargs: Any,
) -> _LightningModuleT:
    """`module_class.load_from_checkpoint(checkpoint_path, ...)` for a checkpoint saved during sparse training.

    Returns a plain `module_class` (no reparameterization, exact zeros in its sparse weights), as
    `harden` would have left it at the end of `fit`. Hyperparameters, `map_location`, `strict`,
    `hparams_file` and `__init__` overrides in `kwargs` work as in `load_from_checkpoint`;
    `checkpoint_path` may be a file object too. A checkpoint of a hardened or dense model (or a
    `save_weights_only` one) loads unchanged. A checkpoint that lacks a sparsified layer's method
    state raises a `ValueError` naming the layer.

    Example:
        >>> model = load_hardened(MyModule, "checkpoints/last.ckpt")  # doctest: +SKIP
    """
    checkpoint = read_checkpoint(checkpoint_path, weights_only=weights_only)
    checkpoint["state_dict"] = harden_state_dict(checkpoint["state_dict"], _sparsified_layers(checkpoint))
    # `load_from_checkpoint` reads a file, so hand it the hardened checkpoint as one: it then does
    # everything it does for a dense checkpoint (hyperparameters, hooks, migration, map_location).
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return module_class.load_from_checkpoint(buffer, map_location=map_location, weights_only=weights_only, **kwargs)


def _sparsified_layers(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The layers a checkpoint's SparsityCallback state (under any state key) lists as sparsified, if it has one."""
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, Mapping) and {"method", "layers", "schedule_step"} <= state.keys():
            return list(state["layers"])
    return None


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The entries of `current` that differ in `saved`, as ``{name: (saved value, current value)}``.

    Example:
        >>> changed_settings({"method": "a", "rescale": True}, {"method": "b", "rescale": True})
        {'method': ('a', 'b')}
    """
    return {name: (saved.get(name), value) for name, value in current.items() if saved.get(name) != value}


def describe_changes(changes: Mapping[str, tuple[Any, Any]]) -> str:
    """One line per changed setting; lists of layer names are shown as what is on only one side.

    Example:
        >>> print(describe_changes({"layers": (["conv", "fc"], ["fc"])}))
        - layers: only in the checkpoint: ['conv']
    """
    lines = []
    for name, (saved, current) in changes.items():
        if isinstance(saved, list) and isinstance(current, list):
            sides = [("only in the checkpoint", saved, current), ("only here", current, saved)]
            parts = [f"{side}: {sorted(set(a) - set(b))}" for side, a, b in sides if set(a) - set(b)]
            lines.append(f"- {name}: {'; '.join(parts)}")
        else:
            lines.append(f"- {name}: {saved!r} in the checkpoint, {current!r} here")
    return "\n".join(lines)


def check_resume(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], must_keep: Collection[str]
) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume a checkpoint whose SparsityCallback state `saved` does not fit `current`.

    Raises a `ValueError` saying what differs when the checkpoint has no such state (a dense run)
    or differs in a setting of `must_keep` (those that change what the saved tensors mean). Returns
    the other changed settings (target, schedule, ...), which a resume may change.

    Example:
        >>> check_resume({"method": "a", "end": 0.5}, {"method": "a", "end": 0.8}, must_keep={"method"})
        {'end': (0.5, 0.8)}
        >>> check_resume({"method": "a"}, {"method": "b"}, must_keep={"method"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: it was saved under a different sparsity reparameterization:
        - method: 'a' in the checkpoint, 'b' here
        Resume with the checkpoint's settings, or start a new sparse run from its weights: ...
    """
    if saved is None:
        raise ValueError(
            "it holds no SparsityCallback state, so it was not saved during sparse training. To start sparse "
            "training from its weights, load them with `YourModule.load_from_checkpoint(path)`, then call "
            "`trainer.fit(model)` without `ckpt_path`"
        )
    changes = changed_settings(saved, current)
    conflicts = {name: change for name, change in changes.items() if name in must_keep}
    if conflicts:
        raise ValueError(
            f"it was saved under a different sparsity reparameterization:\n{describe_changes(conflicts)}\n"
            "Resume with the checkpoint's settings, or start a new sparse run from its weights: load them with "
            "`lightning_sparse.load_hardened(YourModule, path)`, then call `trainer.fit(model)` without `ckpt_path`"
        )
    return {name: change for name, change in changes.items() if name not in conflicts}
