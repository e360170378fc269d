"""What every sparsity method provides: a parametrization of one weight, and the method object around it.

A method is a frozen dataclass of its settings (validated in `__post_init__`) that also does the
method's work: it builds one `SparseParametrization` per weight, acts after each optimizer step and
names what it logs. Nothing outside `lightning_sparse.methods` knows which methods exist.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.optim import Optimizer

__all__ = [
    "SparseLayers",
    "SparseParametrization",
    "SparseWeight",
    "SparsityMethod",
    "distinct_weights",
    "kept_gradient",
    "parametrizations_of",
    "soft_threshold",
    "weight_name",
]


def soft_threshold(weight: Tensor, threshold: Tensor) -> Tensor:
    """`sign(w) * relu(|w| - t)` for a 0-dim `threshold` `t`, in the weight's dtype: both methods' shrink.

    A pruned negative weight may come out as -0.0 (torch's softshrink kernel) or +0.0 (the general form):
    equal, and counted, as zero either way.

    Example:
        >>> soft_threshold(torch.tensor([0.5, 0.05, -0.3]), torch.tensor(0.1))
        tensor([ 0.4000,  0.0000, -0.2000])
    """
    number = _threshold_number(weight, threshold)
    if number is not None:
        return torch.nn.functional.softshrink(weight, number)
    # Two passes instead of four; a 0-dim threshold does not promote a bf16 weight.
    return weight - weight.clamp(-threshold, threshold)


def kept_gradient(grad: Tensor, weight: Tensor, threshold: Tensor) -> Tensor:
    """`grad` where `|weight| > threshold`, else 0: the gradient `soft_threshold` passes to its weight (a tie is
    pruned, as relu'(0) = 0).

    Example:
        >>> kept_gradient(torch.ones(3), torch.tensor([0.5, -0.05, 0.1]), torch.tensor(0.1))
        tensor([1., 0., 0.])
    """
    number = _threshold_number(weight, threshold)
    if number is not None:
        return cast(Tensor, torch.ops.aten.softshrink_backward(grad, weight, number))
    return torch.where(weight.abs() > threshold, grad, 0.0)


def _threshold_number(weight: Tensor, threshold: Tensor) -> float | None:
    """`threshold` as a Python number where torch's softshrink kernels (one pass each) compute exactly what the
    two functions above define: a float32 weight on CPU (reading it elsewhere would sync the device), outside
    `torch.compile`. None otherwise, and for a NaN threshold (a diverged STR `s`), which the general form keeps."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    number = threshold.item()
    return number if number >= 0.0 else None


class SparseParametrization(nn.Module, ABC):
    """A `torch.nn.utils.parametrize` module that makes one weight sparse."""

    @abstractmethod
    def keep_mask(self, weight: Tensor) -> Tensor:
        """Which entries of the effective weight are non-zero, from the raw `weight`."""

    @classmethod
    @abstractmethod
    def from_state_dict(cls, original: Tensor, state: Mapping[str, Any]) -> Self | None:
        """The parametrization saved as `state` (its own `state_dict()`) on the raw weight `original`,
        or None if `state` is not this class's."""


def weight_name(module_name: str, tensor_name: str) -> str:
    """How lightning-sparse names a weight in logs, tables and checkpoints: its qualified parameter name,
    without a trailing `.weight` (a layer's one weight goes by the layer's name).

    Example:
        >>> weight_name("encoder.fc", "weight"), weight_name("attn", "in_proj_weight"), weight_name("", "weight")
        ('encoder.fc', 'attn.in_proj_weight', '')
    """
    if tensor_name == "weight":
        return module_name
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def parametrizations_of(module: nn.Module, tensor_name: str) -> ParametrizationList:
    """The parametrizations registered on `module.<tensor_name>` (`module.parametrizations[tensor_name]`)."""
    # `nn.Module.__getattr__` is typed `Tensor | Module`; `register_parametrization` made these two.
    return cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations)[tensor_name])


@dataclass(frozen=True, eq=False)
class SparseWeight:
    """One sparsified weight: its parametrization, and every `(module, tensor name)` that holds it.

    A weight tied between modules (a language model's input embedding and output layer) has one
    entry, and each of its holders computes with the same parametrization.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer = nn.Linear(2, 2)
        >>> raw = layer.weight
        >>> str_ = LearnedSoftThreshold(s_init=-5.0)
        >>> _ = parametrize.register_parametrization(layer, "weight", str_)
        >>> SparseWeight(str_, ((layer, "weight"),)).raw is raw
        True
    """

    parametrization: SparseParametrization
    holders: tuple[tuple[nn.Module, str], ...]

    @property
    def raw(self) -> Tensor:
        """The raw, trainable weight under the reparameterization, read afresh (references go stale under FSDP)."""
        module, tensor_name = self.holders[0]
        return parametrizations_of(module, tensor_name).original


SparseLayers = Mapping[str, SparseWeight]
"""Sparsified weights by `weight_name`, one entry per distinct weight."""


def distinct_weights(layers: SparseLayers) -> list[tuple[SparseParametrization, Tensor]]:
    """Each sparsified weight's parametrization with its raw weight, read afresh.

    Re-read at every call: cached references to parameters go stale under FSDP.
    """
    return [(weight.parametrization, weight.raw) for weight in layers.values()]


class SparsityMethod(ABC):
    """Settings and per-step work of one sparsity method; subclasses are frozen dataclasses.

    The hooks, in the order `SparsityCallback` calls them in `fit`: `for_run` (once the run length is
    known), `parametrization` (per distinct weight, right after the LightningModule's
    `configure_model`), `on_fit_start` (once the optimizers exist), then `after_optimizer_step` after
    each optimizer step, and `metrics` when logging. A method's state lives in its parametrizations (or
    in hooks on the optimizers it adapts), so the method object stays a frozen value.
    """

    parametrization_class: ClassVar[type[SparseParametrization]]
    reparameterization_settings: ClassVar[frozenset[str]] = frozenset()
    """Settings besides the method that change what a checkpoint's tensors mean: a resume must keep them."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The method's name in `SparsityCallback("name", ...)`, logs and checkpoints."""

    def for_run(self, total_steps: float) -> Self:
        """This method with fractions of the run turned into optimizer steps, every ordering rule checked.

        `total_steps` is the run's number of optimizer steps (`math.inf` when unknown).
        """
        return self

    @abstractmethod
    def parametrization(self, weight: Tensor, output_axis: int) -> SparseParametrization:
        """A new parametrization for `weight`, whose output channels run along `output_axis`."""

    def owns(self, parametrization: nn.Module) -> bool:
        """Whether this method would have made `parametrization`, so a second `fit` can keep it."""
        return isinstance(parametrization, self.parametrization_class)

    def on_fit_start(self, layers: SparseLayers, optimizers: Sequence[Optimizer]) -> list[str]:
        """Adapt the user's optimizers to the parametrizations of `layers`, and check the weights.

        Raises for an impossible combination; returns warnings for the user.
        """
        return []

    def after_optimizer_step(self, step: int, layers: SparseLayers) -> None:  # noqa: B027 (optional hook)
        """The method's work after optimizer step number `step` (1 after the first step)."""

    def target(self, step: int) -> float | None:
        """The sparsity the method is asked to have after `step`, if it has a target."""
        return None

    def metrics(self, step: int, layers: SparseLayers) -> dict[str, float]:
        """The method's own values to log at `step`, besides the sparsity every method logs."""
        return {}

    def settings(self) -> dict[str, Any]:
        """The method and its settings as plain Python values: what a checkpoint records.

        Example:
            >>> from lightning_sparse.methods import STR
            >>> settings = STR(s_init=-5.0).settings()
            >>> settings["method"], settings["s_init"], settings["threshold_decay"]
            ('str', -5.0, None)
        """
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {"method": self.name, **{f.name: _plain(getattr(self, f.name)) for f in fields}}

    def default_settings(self) -> dict[str, Any]:
        """Each setting's default, as `settings()` records it: what a run saved before the setting existed used.

        Example:
            >>> from lightning_sparse.methods import ST3
            >>> ST3(0.9, min_density=0.01).default_settings()["min_density"]
            0.0
        """
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {f.name: _plain(f.default) for f in fields if f.default is not dataclasses.MISSING}


def _plain(value: Any) -> Any:
    """Objects a checkpoint cannot hold under `weights_only=True` (a user's schedule) by their repr."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)
