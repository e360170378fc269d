"""What every sparsity method provides: a parametrization of one weight, and the method object around it.

A method is a frozen dataclass of its settings (validated in `__post_init__`) that also does the
method's work: it builds one `SparseParametrization` per weight, acts after each optimizer step and
names what it logs. Nothing outside `lightning_sparse.methods` knows which methods exist.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self, cast

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.optim import Optimizer

__all__ = [
    "SparseLayers",
    "SparseParametrization",
    "SparsityMethod",
    "distinct_weights",
    "original_weight",
    "weight_parametrizations",
]


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


SparseLayers = Mapping[str, tuple[nn.Module, SparseParametrization]]
"""Sparsified layers by qualified name, each with the parametrization on its `weight`."""


def weight_parametrizations(module: nn.Module) -> ParametrizationList:
    """The parametrizations registered on `module.weight` (`module.parametrizations.weight`)."""
    # `nn.Module.__getattr__` is typed `Tensor | Module`; `register_parametrization` made these two.
    return cast(ParametrizationList, cast(nn.ModuleDict, module.parametrizations).weight)


def original_weight(module: nn.Module) -> Tensor:
    """The raw, trainable weight under a reparameterization."""
    return weight_parametrizations(module).original


def distinct_weights(layers: SparseLayers) -> list[tuple[SparseParametrization, Tensor]]:
    """Each parametrization once (tied layers share one) with its raw weight, read afresh.

    Re-read at every call: cached references to parameters go stale under FSDP.
    """
    unique = {id(p): (p, module) for module, p in layers.values()}
    return [(p, original_weight(module)) for p, module in unique.values()]


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
    def parametrization(self, weight: Tensor) -> SparseParametrization:
        """A new parametrization for `weight`."""

    def owns(self, parametrization: nn.Module) -> bool:
        """Whether this method would have made `parametrization`, so a second `fit` can keep it."""
        return isinstance(parametrization, self.parametrization_class)

    def on_fit_start(
        self, weights: Sequence[tuple[SparseParametrization, Tensor]], optimizers: Sequence[Optimizer]
    ) -> list[str]:
        """Adapt the user's optimizers to the parametrizations of `weights` (each with its raw weight).

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
