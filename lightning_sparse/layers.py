"""Which layers get sparsified, and putting a sparsity reparameterization on their weights."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sparse.methods import ST3, STR

# The type comes first: jsonargparse (LightningCLI) tries a union's members in order, so a YAML
# entry `torch.nn.Conv1d` becomes the class and any other string stays a name pattern.
LayerFilter = type[nn.Module] | str
"""A module-name pattern (`fnmatch` style, e.g. `"encoder.*"`) or a module type."""

SPARSIFIABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SPARSITY_PARAMETRIZATIONS = (STR, ST3)


def _matches(name: str, module: nn.Module, layer_filter: LayerFilter) -> bool:
    if isinstance(layer_filter, str):
        return fnmatch.fnmatchcase(name, layer_filter)
    return isinstance(module, layer_filter)


def check_filters(argument: str, filters: Sequence[LayerFilter] | None) -> None:
    """Raise a `ValueError` naming `argument` unless every filter is a pattern or a module type."""
    for layer_filter in filters or ():
        is_type = isinstance(layer_filter, type) and issubclass(layer_filter, nn.Module)
        if not (isinstance(layer_filter, str) or is_type):
            raise ValueError(
                f"`{argument}` takes module-name patterns (str) or nn.Module subclasses, got {layer_filter!r}"
            )


def select_layers(
    model: nn.Module,
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] = (),
) -> dict[str, nn.Module]:
    """The modules whose `weight` will be sparsified, by qualified name.

    By default every Conv1d/2d/3d and Linear, first and last layers included. `include` replaces
    that default, `exclude` removes from it. A filter that matches no module is an error, since it
    is almost always a typo in a name.

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))
        >>> list(select_layers(net, exclude=["3"]))
        ['0']
    """
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), nn.Parameter) or parametrize.is_parametrized(module, "weight")
    }
    for argument, filters in (("include", include), ("exclude", exclude)):
        for layer_filter in filters or ():
            if not any(_matches(name, module, layer_filter) for name, module in candidates.items()):
                raise ValueError(
                    f"`{argument}` entry {layer_filter!r} matches no module with a weight; "
                    f"modules with weights are: {', '.join(candidates) or 'none'}"
                )
    include = list(include) if include is not None else list(SPARSIFIABLE_TYPES)
    return {
        name: module
        for name, module in candidates.items()
        if any(_matches(name, module, f) for f in include) and not any(_matches(name, module, f) for f in exclude)
    }


def sparsity_parametrizations(model: nn.Module) -> dict[str, tuple[nn.Module, STR | ST3]]:
    """The layers of `model` that carry a lightning-sparse reparameterization, by qualified name.

    Example:
        >>> sparsity_parametrizations(nn.Linear(2, 2))
        {}
    """
    found = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, SPARSITY_PARAMETRIZATIONS):
                    found[name] = (module, p)
    return found


def original_weight(module: nn.Module) -> Tensor:
    """The raw, trainable weight under a reparameterization."""
    return module.parametrizations.weight.original


def parametrize_layers(layers: Mapping[str, nn.Module], make: Callable[[Tensor], nn.Module]) -> None:
    """Register `make(weight)` on each layer's weight, all or nothing.

    Layers that share (tie) one weight share one parametrization, so it is thresholded and counted
    once. A weight that already carries another parametrization is refused rather than stacked on.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> parametrize_layers(select_layers(net), lambda w: STR(s_init=-5.0))
        >>> list(sparsity_parametrizations(net))
        ['0']
    """
    for name, module in layers.items():
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(
                f"layer {name!r} already has a parametrization on its weight "
                f"({type(module.parametrizations.weight[0]).__name__}); exclude it with `exclude=[{name!r}]`"
            )
    shared: dict[int, nn.Module] = {}
    done: list[nn.Module] = []
    try:
        for module in layers.values():
            weight = module.weight
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
        >>> parametrize_layers(select_layers(net), lambda w: STR(s_init=0.0))
        >>> unparametrize_layers([net[0]])
        >>> net[0].weight is weight, sparsity_parametrizations(net)
        (True, {})
    """
    for module in layers:
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
