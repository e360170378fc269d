"""What every sparsity method provides: a parametrization of one weight, and the method object around it.

A method is a frozen dataclass of its settings (validated in `__post_init__`) that also does the
method's work: it builds one `SparseParametrization` per weight, acts after each optimizer step and
names what it logs. Nothing outside `lightning_sparse.methods` knows which methods exist.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrize import ParametrizationList
from torch.optim import Optimizer

__all__ = [
    "EffectiveWeightCache",
    "SparseLayers",
    "SparseParametrization",
    "SparseWeight",
    "SparsityMethod",
    "distinct_weights",
    "kept_gradient",
    "magnitude_above",
    "parametrizations_of",
    "soft_threshold",
    "tensor_owners",
    "weight_name",
]


def soft_threshold(weight: Tensor, threshold: Tensor, out: Tensor | None = None) -> Tensor:
    """`sign(w) * relu(|w| - t)` for a 0-dim `threshold` `t`, in the weight's dtype: both methods' shrink. Into `out`
    if given (shaped like `weight`, of its dtype).

    A pruned negative weight may come out as -0.0 (torch's softshrink kernel) or +0.0 (the general form, and the fused
    loop of STR's forward: `lightning_sparse.kernels.soft_threshold_into`): equal, and counted, as zero either way.

    Example:
        >>> soft_threshold(torch.tensor([0.5, 0.05, -0.3]), torch.tensor(0.1))
        tensor([ 0.4000,  0.0000, -0.2000])
    """
    number = _threshold_number(weight, threshold)
    if number is not None:
        if out is None:
            return F.softshrink(weight, number)
        return cast(Tensor, torch.ops.aten.softshrink.out(weight, number, out=out))
    # Two passes instead of four; a 0-dim threshold does not promote a bf16 weight.
    return torch.sub(weight, weight.clamp(-threshold, threshold), out=out)


def magnitude_above(weight: Tensor, threshold: Tensor) -> Tensor:
    """`|w| > t` for a 0-dim `threshold` `t`, compared in the weight's dtype: a keep mask. Two comparisons of the
    weight itself rather than one of a copy of its magnitudes, whose size (4 bytes per float32 weight, to the mask's
    1) would add to the peak memory of a step that reads the masks.

    Example:
        >>> magnitude_above(torch.tensor([0.5, -0.05, -0.3, float("nan")]), torch.tensor(0.1))
        tensor([ True, False,  True, False])
    """
    return torch.gt(weight, threshold).logical_or_(torch.lt(weight, -threshold))


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
    # `|w| > t` is `magnitude_above`'s two comparisons exactly, in one op fewer: three where a GPU's backward waits on
    # the host's launches, for a copy of one layer's magnitudes that lives only as long as this call.
    return torch.where(weight.abs() > threshold, grad, 0.0)


def _threshold_number(weight: Tensor, threshold: Tensor) -> float | None:
    """`threshold` as a Python number where torch's softshrink kernels (one pass each) compute exactly what the
    two functions above define: a float32 weight on CPU (reading it elsewhere would sync the device), outside
    `torch.compile`. None otherwise, and for a NaN threshold (a diverged STR `s`), which the general form keeps."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    number = threshold.item()
    return number if number >= 0.0 else None


def tensor_owners(tensor: Tensor) -> int:
    """How many tensors and graphs hold `tensor`'s data in C++ (its Python object counting one, each view of it
    another): 1 means nothing but that Python object does, torch's own test before it takes a gradient over as
    `.grad` rather than copy it. Python references to the object itself are not counted.

    Example:
        >>> t = torch.zeros(3)
        >>> tensor_owners(t)
        1
        >>> view = t.view_as(t)
        >>> tensor_owners(t)
        2
    """
    return cast(int, tensor._use_count())  # type: ignore[attr-defined]


def _tensor_key(tensor: Tensor) -> tuple[int, int, int, torch.dtype, torch.device]:
    """What identifies a tensor's current contents: in-place changes bump `_version`, `.data =` or `.to()` the rest."""
    return id(tensor), tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device


class EffectiveWeightCache:
    """One effective weight, served until a tensor it was computed from changes.

    The raw weight changes only at optimizer steps (a method's own tensors, at its updates), so every forward
    between two changes (gradient accumulation, validation) can share one effective weight, and the next one
    can be written into its memory: on CPU a large new tensor is new memory from the OS, paid for in page
    faults on first touch, at every step.

    Example:
        >>> weight, cache = torch.ones(3), EffectiveWeightCache()
        >>> effective = weight * 2
        >>> cache.store((weight,), effective)
        >>> cache.serve((weight,), lambda: weight * 3) is effective
        True
        >>> _ = weight.add_(1.0)  # an optimizer step
        >>> cache.workspace(weight) is effective  # its memory, for the next one
        True
        >>> cache.serve((weight,), lambda: weight * 3) is effective  # no longer served
        False
    """

    def __init__(self) -> None:
        # (key, effective weight, the tensors the key names): the key holds their ids, so they are kept alive
        # with it, and no other tensor can take their id.
        self._entry: tuple[tuple[Any, ...], Tensor, tuple[Tensor, ...]] | None = None

    def serve(self, sources: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        """The effective weight stored from `sources` if none of them changed since, or else `compute()`'s, stored:
        what a forward uses.

        `compute` runs without autograd, and outside inference mode even in a validation's forward: what it
        makes is kept, and training must be able to save it for backward and write the next one over it.
        """
        if self._entry is not None and self._entry[0] == tuple(map(_tensor_key, sources)):
            return self._entry[1]
        with torch.no_grad(), torch.inference_mode(False):
            effective = compute()
        self.store(sources, effective)
        return effective

    def store(self, sources: tuple[Tensor, ...], effective: Tensor) -> None:
        """Serve `effective`, computed from `sources`, until one of them changes."""
        self._entry = (tuple(map(_tensor_key, sources)), effective, sources)

    def clear(self) -> None:
        """Serve nothing, and let the stored effective weight's memory go."""
        self._entry = None

    def workspace(self, weight: Tensor) -> Tensor:
        """Memory for the next effective weight of `weight`: the stored one's, or new memory if its layout differs or
        something still holds a view of it (a graph not yet backpropagated through, a user's `layer.weight`).

        The stored one is no longer served: what is written there next must be `store`d again.
        """
        stale, self._entry = self._entry, None
        layout = _layout(weight)
        # Every forward served it as a view, which holds a reference to it: one reference is the cache's own.
        if stale is None or tensor_owners(stale[1]) > 1 or _layout(stale[1]) != layout:
            return torch.empty_like(weight.detach())
        return stale[1]


def _layout(tensor: Tensor) -> tuple[Any, ...]:
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device


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
        """The method and its settings (its `__init__` arguments) as plain Python values: what a checkpoint records.

        Example:
            >>> from lightning_sparse.methods import STR
            >>> settings = STR(s_init=-5.0).settings()
            >>> settings["method"], settings["s_init"], settings["threshold_decay"]
            ('str', -5.0, None)
        """
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return {"method": self.name, **{f.name: _plain(getattr(self, f.name)) for f in fields if f.init}}

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
