"""Which layers get sparsified, and putting a sparsity reparameterization on their weights."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_sparse.methods.base import SparseLayers, SparseParametrization, weight_parametrizations

__all__ = [
    "SPARSIFIABLE_TYPES",
    "LayerFilter",
    "check_filters",
    "check_removable",
    "parametrize_layers",
    "remove_parametrization",
    "select_layers",
    "sparsity_parametrizations",
    "unparametrize_layers",
]

# The type comes first: jsonargparse (LightningCLI) tries a union's members in order, so a YAML
# entry `torch.nn.Conv1d` becomes the class and any other string stays a name pattern.
LayerFilter = type[nn.Module] | str
"""A module-name pattern (`fnmatch` style, e.g. `"encoder.*"`) or a module type."""

SPARSIFIABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _matches(name: str, module: nn.Module, layer_filter: LayerFilter) -> bool:
    if isinstance(layer_filter, str):
        return fnmatch.fnmatchcase(name, layer_filter)
    return isinstance(module, layer_filter)


def check_filters(argument: str, filters: Any) -> list[LayerFilter] | None:
    """`filters` as a list, if it is one pattern or type, or a list or tuple of them; None stays None.

    A single pattern or type is taken as a one-element list (a string is never split into letters).
    Anything else raises a `TypeError` naming `argument`.

    Example:
        >>> check_filters("include", nn.Linear), check_filters("exclude", ("encoder.*",))
        ([<class 'torch.nn.modules.linear.Linear'>], ['encoder.*'])
    """
    if filters is None:
        return None
    entries = list(filters) if isinstance(filters, (list, tuple)) else [filters]
    for entry in entries:
        if not (isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))):
            raise TypeError(
                f"`{argument}` takes module-name patterns (str) or nn.Module subclasses, one or a list of them, "
                f"got {entry!r}"
            )
    return entries


def select_layers(
    model: nn.Module,
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] = (),
) -> dict[str, nn.Module]:
    """The modules whose `weight` will be sparsified, by qualified name.

    By default every Conv1d/2d/3d and Linear, first and last layers included. `include` replaces
    that default, `exclude` removes from it. A filter that matches no module is an error, since it
    is almost always a typo in a name. A selected module whose weight cannot be sparsified is an
    error naming it, before anything changes: a 1-D weight (a norm layer's scale: ST-3's rescale
    is per output channel, and sparsifying a norm is not what either paper does), a weight that
    `torch.nn.utils.spectral_norm` or `weight_norm` recompute before each forward (a hook, which
    would overwrite a reparameterization), and a lazy module's weight before its first forward.
    Modules whose `weight` is None are no candidates. No parametrization is run (a spectral norm's
    power iteration would update its state).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))
        >>> list(select_layers(net, exclude=["3"]))
        ['0']
        >>> select_layers(net, include=["*"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Cannot sparsify these layers, which `include`/`exclude` select:
        - '1': its weight is 1-D (shape (4,)): ...
    """
    candidates: dict[str, nn.Module] = {}
    problems: dict[str, str] = {}
    for name, module in model.named_modules():
        # Checked first: reading a parametrized `module.weight` would compute it.
        if parametrize.is_parametrized(module, "weight"):
            candidates[name] = module
            continue
        problem = _unsparsifiable(module)
        if problem is not None:
            candidates[name], problems[name] = module, problem
        elif isinstance(getattr(module, "weight", None), nn.Parameter):
            candidates[name] = module
    for argument, filters in (("include", include), ("exclude", exclude)):
        for layer_filter in filters or ():
            if not any(_matches(name, module, layer_filter) for name, module in candidates.items()):
                raise ValueError(
                    f"`{argument}` entry {layer_filter!r} matches no module with a weight; "
                    f"modules with weights are: {', '.join(candidates) or 'none'}"
                )
    include = list(include) if include is not None else list(SPARSIFIABLE_TYPES)
    selected = {
        name: module
        for name, module in candidates.items()
        if any(_matches(name, module, f) for f in include) and not any(_matches(name, module, f) for f in exclude)
    }
    refused = {name: problems[name] for name in selected if name in problems}
    if refused:
        reasons = "\n".join(f"- {name!r}: {problem}" for name, problem in refused.items())
        raise ValueError(
            f"Cannot sparsify these layers, which `include`/`exclude` select:\n{reasons}\n"
            f"Leave them dense with `exclude={list(refused)!r}` (added to any other `exclude`), or narrow `include`."
        )
    return selected


def _unsparsifiable(module: nn.Module) -> str | None:
    """Why `module.weight` (not parametrized) cannot be sparsified, if it is a weight that cannot; else None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)) and hook.name == "weight":
            function = "spectral_norm" if isinstance(hook, SpectralNorm) else "weight_norm"
            return (
                f"its weight is recomputed before each forward by `torch.nn.utils.{function}` (a hook, which would "
                "overwrite a sparse weight); a normalised weight cannot be sparsified"
            )
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    if is_lazy(weight):
        return (
            f"it is a lazy module ({type(module).__name__}) whose weight has no shape yet; run one forward pass "
            "before fitting, e.g. `self(self.example_input_array)` at the end of your LightningModule's "
            "`configure_model`, or give the layer its input size"
        )
    if weight.dim() < 2:
        return (
            f"its weight is {weight.dim()}-D (shape {tuple(weight.shape)}): only weights with output and input "
            "dimensions (conv, linear, embedding) are sparsified, not a norm layer's scale or another vector"
        )
    return None


def sparsity_parametrizations(model: nn.Module) -> SparseLayers:
    """The layers of `model` that carry a lightning-sparse reparameterization, by qualified name.

    Example:
        >>> sparsity_parametrizations(nn.Linear(2, 2))
        {}
    """
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in weight_parametrizations(module):
                if isinstance(p, SparseParametrization):
                    found[name] = (module, p)
    return found


def parametrize_layers(layers: Mapping[str, nn.Module], make: Callable[[Tensor], nn.Module]) -> None:
    """Register `make(weight)` on each layer's weight, all or nothing.

    Layers that share (tie) one weight share one parametrization, so it is thresholded and counted
    once. A weight that already carries another parametrization is refused rather than stacked on.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> parametrize_layers(select_layers(net), lambda w: LearnedSoftThreshold(s_init=-5.0))
        >>> list(sparsity_parametrizations(net))
        ['0']
    """
    for name, module in layers.items():
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(
                f"layer {name!r} already has a parametrization on its weight "
                f"({type(weight_parametrizations(module)[0]).__name__}); exclude it with `exclude=[{name!r}]`"
            )
    shared: dict[int, nn.Module] = {}
    done: list[nn.Module] = []
    try:
        for module in layers.values():
            weight = cast(Tensor, module.weight)
            if id(weight) not in shared:
                shared[id(weight)] = make(weight)
            parametrize.register_parametrization(module, "weight", shared[id(weight)])
            done.append(module)
    except Exception:
        unparametrize_layers(done)
        raise


def unparametrize_layers(layers: Iterable[nn.Module]) -> None:
    """Undo `parametrize_layers`: each layer gets back its raw weight Parameter, values untouched.

    Unlike `harden`, nothing of the reparameterization is baked in: for giving a model back as it came.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> weight = net[0].weight
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> parametrize_layers(select_layers(net), lambda w: LearnedSoftThreshold(s_init=0.0))
        >>> unparametrize_layers([net[0]])
        >>> net[0].weight is weight, sparsity_parametrizations(net)
        (True, {})
    """
    for module in layers:
        remove_parametrization(module, bake=False)


def check_removable(name: str, module: nn.Module) -> None:
    """Raise unless `remove_parametrization` can take lightning-sparse's parametrization off `module.weight`:
    it must be the first (innermost) one, whatever comes after it.

    Example:
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer = nn.utils.parametrizations.orthogonal(nn.Linear(2, 2))
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> check_removable("fc", layer)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: layer 'fc' has a parametrization under lightning-sparse's on its weight (_Orthogonal), ...
    """
    stack = list(weight_parametrizations(module))
    ours = [i for i, p in enumerate(stack) if isinstance(p, SparseParametrization)]
    if ours != [0]:
        under = ", ".join(type(p).__name__ for p in stack[: ours[0] if ours else len(stack)])
        raise ValueError(
            f"layer {name!r} has a parametrization under lightning-sparse's on its weight ({under}), so "
            "lightning-sparse's cannot be taken off without baking that one in too; remove it first with "
            "`torch.nn.utils.parametrize.remove_parametrizations`"
        )


def remove_parametrization(module: nn.Module, bake: bool) -> None:
    """Remove the parametrization of `module.weight`, writing the effective weight into it if `bake`.

    The weight keeps its place among the module's parameters, so `state_dict()` keys and
    `parameters()` come back in the unmodified model's order. Parametrizations stacked on top of
    lightning-sparse's (registered after it) stay, on top of the raw weight with lightning-sparse's
    effective weight written into it if `bake`; one under it is refused (`check_removable`).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> remove_parametrization(layer, bake=True)
        >>> list(layer.state_dict())
        ['weight', 'bias']
    """
    check_removable(type(module).__name__, module)
    stack = weight_parametrizations(module)
    if len(stack) > 1:
        # Someone else's parametrizations come after ours: take ours out of the chain, theirs then see the raw
        # weight, which holds what ours made of it if `bake`.
        if bake:
            with torch.no_grad():
                stack.original.copy_(stack[0](stack.original))
        del stack[0]
        return
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)
    # Removal re-registers `weight` last; torch's layers register it first.
    module._parameters = {"weight": module._parameters.pop("weight"), **module._parameters}
