"""Which weights get sparsified, and putting a sparsity reparameterization on (and off) them.

A model's weights are found by the modules that hold them: a module selected by type or name
contributes the weights it multiplies its input by (`Linear.weight`, a `MultiheadAttention`'s input
projections, an RNN's `weight_*`), and a pattern that names no module selects parameters by their
qualified name (`"*.self_attn.in_proj_weight"`, `"lm_head.weight"`). A weight several modules hold (tied)
is one weight: it gets one parametrization, on every module that holds it, so all of them compute
with the same effective weight.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from lightning_sparse.methods.base import (
    SparseLayers,
    SparseParametrization,
    SparseWeight,
    parametrizations_of,
    weight_name,
)
from lightning_sparse.sharding import check_shardable, shard_group

__all__ = [
    "SPARSIFIABLE_TYPES",
    "Holder",
    "LayerFilter",
    "SelectedWeight",
    "check_filters",
    "check_output_axes",
    "check_removable",
    "matmul_weights",
    "parametrize_weights",
    "remove_parametrization",
    "select_weights",
    "sparsity_parametrizations",
    "stored_tensor",
    "tensor_holders",
    "unparametrize",
]

# The type comes first: jsonargparse (LightningCLI) tries a union's members in order, so a YAML
# entry `torch.nn.Conv1d` becomes the class and any other string stays a name pattern.
LayerFilter = type[nn.Module] | str
"""A module type, or a name pattern (`fnmatch` style): of modules (`"encoder.*"`), or else of parameters
(`"*.in_proj_weight"`)."""

SPARSIFIABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.MultiheadAttention)
"""What `select_weights` takes by default: every matrix multiply weight of torch's own layers (a
`MultiheadAttention`'s output projection is a `Linear`)."""

_TRANSPOSED_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
"""Torch layers whose weight is stored (in, out, ...): output channels on axis 1."""

# The key of `module.parametrizations[...]` where lightning-sparse keeps the parameter order it found, so
# that removing a parametrization gives the parameters back in that order.
_ORDER_ATTRIBUTE = "_lightning_sparse_parameter_order"

Holder = tuple[nn.Module, str]
"""A module and the name of one of its tensors (`"weight"`, `"in_proj_weight"`)."""


@dataclass(frozen=True)
class SelectedWeight:
    """A weight `select_weights` chose: every `(module, tensor name)` holding it, and its output axis."""

    holders: tuple[Holder, ...]
    output_axis: int


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
        if not _is_filter(entry):
            raise TypeError(
                f"`{argument}` takes module types (nn.Module subclasses) or name patterns (str) of modules or "
                f"parameters, one or a list of them, got {entry!r}"
            )
    return entries


def check_output_axes(output_axes: Any) -> dict[LayerFilter, int]:
    """`output_axes` checked: a mapping from module types or name patterns to a weight axis (int).

    Example:
        >>> check_output_axes({"*.c_attn": 1})
        {'*.c_attn': 1}
    """
    if output_axes is None:
        return {}
    if not isinstance(output_axes, Mapping) or not all(
        _is_filter(k) and isinstance(v, int) and not isinstance(v, bool) for k, v in output_axes.items()
    ):
        raise TypeError(
            "`output_axes` maps module types or name patterns to the axis of their weight that holds the output "
            f"channels, e.g. `{{transformers.pytorch_utils.Conv1D: 1}}` or `{{'*.c_attn': 1}}`; got {output_axes!r}"
        )
    return dict(output_axes)


def _is_filter(entry: Any) -> bool:
    return isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, nn.Module))


def matmul_weights(module: nn.Module) -> list[str]:
    """The names of the tensors `module` multiplies its input by, as far as lightning-sparse knows the module:
    what selecting the module by type or name sparsifies.

    Example:
        >>> matmul_weights(nn.MultiheadAttention(8, 2)), matmul_weights(nn.LSTM(4, 3)), matmul_weights(nn.ReLU())
        (['in_proj_weight'], ['weight_ih_l0', 'weight_hh_l0'], [])
    """
    if isinstance(module, nn.MultiheadAttention):
        names = (
            ["in_proj_weight"] if module._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        )
    elif isinstance(module, nn.RNNBase):
        names = [name for name in module._flat_weights_names if name.startswith("weight_")]
    else:
        names = ["weight"]
    return [name for name in names if _holds(module, name)]


def _holds(module: nn.Module, tensor_name: str) -> bool:
    """Whether `module.<tensor_name>` is a parameter, a parametrized tensor or a hook-normalised weight (without
    computing it)."""
    return (
        parametrize.is_parametrized(module, tensor_name)
        or module._parameters.get(tensor_name) is not None
        or _norm_hook(module, tensor_name) is not None
    )


def _norm_hook(module: nn.Module, tensor_name: str) -> str | None:
    """The name of the `torch.nn.utils` function whose forward pre-hook recomputes `module.<tensor_name>`, if any."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)) and hook.name == tensor_name:
            return "spectral_norm" if isinstance(hook, SpectralNorm) else "weight_norm"
    return None


def _slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every `(module name, module, tensor name)` of `model` that `_holds` a tensor, in module order."""
    slots = []
    for module_name, module in model.named_modules():
        names = list(module._parameters)
        if parametrize.is_parametrized(module):
            names += [name for name in module.parametrizations if name not in names]
        names += [
            hook.name for hook in module._forward_pre_hooks.values() if isinstance(hook, (SpectralNorm, WeightNorm))
        ]
        slots += [(module_name, module, name) for name in dict.fromkeys(names) if _holds(module, name)]
    return slots


def stored_tensor(module: nn.Module, tensor_name: str) -> Tensor:
    """The stored tensor behind `module.<tensor_name>`: the parameter, or the original under a parametrization.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> stored_tensor(layer, "weight") is layer.weight
        True
    """
    if parametrize.is_parametrized(module, tensor_name):
        return parametrizations_of(module, tensor_name).original
    tensor = module._parameters[tensor_name]
    assert tensor is not None
    return tensor


def tensor_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """Every parameter and parametrized tensor of `model`, by the identity of its stored tensor: a tied
    weight lists all its holders, `(module name, module, tensor name)` in module order.

    Example:
        >>> net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
        >>> net[1].weight = net[0].weight
        >>> [[(name, tensor) for name, _, tensor in holders] for holders in tensor_holders(net).values()]
        [[('0', 'weight'), ('1', 'weight')]]
    """
    tensors: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for module_name, module, tensor_name in _slots(model):
        if _norm_hook(module, tensor_name) is None:
            tensors.setdefault(id(stored_tensor(module, tensor_name)), []).append((module_name, module, tensor_name))
    return tensors


def select_weights(
    model: nn.Module,
    include: Sequence[LayerFilter] | None = None,
    exclude: Sequence[LayerFilter] = (),
    output_axes: Mapping[LayerFilter, int] | None = None,
) -> dict[str, SelectedWeight]:
    """The weights that will be sparsified, by `weight_name`, each with every module holding it.

    By default every `Conv1d/2d/3d` and `Linear` weight and every `MultiheadAttention` input
    projection, first and last layers included. `include` replaces that default, `exclude` removes
    from it; each entry is a module type, or a name pattern matched against module names, or, if it
    matches no module, against qualified parameter names. A module selected by type or name
    contributes the weights it multiplies its input by (`matmul_weights`). A filter that matches
    nothing is an error, since it is almost always a typo.

    A weight tied between modules is selected with all its holders, selected or not: they must all
    compute with the same effective weight. Its name is its first holder's.

    `output_axes` maps a type or pattern to the axis of the weight holding the output channels (what
    ST-3's rescale is per): 0 by default, 1 for `ConvTranspose`; a third-party layer that stores its
    weight transposed, such as Hugging Face's `Conv1D`, needs `{Conv1D: 1}`.

    A selected weight that cannot be sparsified is an error naming it, before anything changes: a
    1-D tensor (a norm layer's scale: ST-3's rescale is per output channel, and sparsifying a norm is
    not what either paper does), a weight that `torch.nn.utils.spectral_norm` or `weight_norm`
    recompute before each forward (a hook, which would overwrite a reparameterization), a lazy
    module's weight before its first forward, and a weight sharded other than FSDP2's default way
    (`lightning_sparse.sharding.check_shardable`). No parametrization is run (a spectral norm's power
    iteration would update its state).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(8, 2))
        >>> list(select_weights(net, exclude=["3"]))
        ['0']
        >>> list(select_weights(nn.TransformerEncoderLayer(8, 2, 16)))
        ['self_attn.in_proj_weight', 'self_attn.out_proj', 'linear1', 'linear2']
        >>> select_weights(net, include=["*"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Cannot sparsify these weights, which `include`/`exclude` select:
        - '1': it is 1-D (shape (4,)): ...
    """
    slots = _slots(model)
    modules = {name: module for name, module in model.named_modules() if matmul_weights(module)}

    def matched(layer_filter: LayerFilter) -> set[tuple[int, str]]:
        if isinstance(layer_filter, type):
            chosen = [m for m in modules.values() if isinstance(m, layer_filter)]
        else:
            chosen = [m for name, m in modules.items() if fnmatch.fnmatchcase(name, layer_filter)]
        if chosen or isinstance(layer_filter, type):
            return {(id(m), t) for m in chosen for t in matmul_weights(m)}
        return {(id(m), t) for name, m, t in slots if fnmatch.fnmatchcase(_qualified(name, t), layer_filter)}

    chosen: dict[str, set[tuple[int, str]]] = {"include": set(), "exclude": set()}
    for argument, filters in (
        ("include", include if include is not None else SPARSIFIABLE_TYPES),
        ("exclude", exclude),
    ):
        for layer_filter in filters:
            found = matched(layer_filter)
            if not found and (argument == "exclude" or include is not None):
                raise ValueError(
                    f"`{argument}` entry {layer_filter!r} matches no module with a weight and no parameter; modules "
                    f"with weights are: {', '.join(modules) or 'none'}"
                )
            chosen[argument] |= found
    selected_slots = chosen["include"] - chosen["exclude"]
    tensors = tensor_holders(model)
    axes = list((output_axes or {}).items())
    selected: dict[str, SelectedWeight] = {}
    problems: dict[str, str] = {}
    for module_name, module, tensor_name in slots:
        if (id(module), tensor_name) not in selected_slots:
            continue
        axis = next(
            (a for f, a in axes if _filter_matches(f, module_name, module, tensor_name)),
            1 if isinstance(module, _TRANSPOSED_TYPES) else 0,
        )
        problem = _unsparsifiable(module, tensor_name, axis)
        if problem is not None:
            problems[weight_name(module_name, tensor_name)] = problem
            continue
        # A tied weight: all its holders, under its first holder's name, with the first selected holder's axis.
        entries = tensors[id(stored_tensor(module, tensor_name))]
        name = weight_name(entries[0][0], entries[0][2])
        selected.setdefault(name, SelectedWeight(tuple((m, t) for _, m, t in entries), axis))
    if problems:
        reasons = "\n".join(f"- {name!r}: {problem}" for name, problem in problems.items())
        raise ValueError(
            f"Cannot sparsify these weights, which `include`/`exclude` select:\n{reasons}\n"
            f"Leave them dense with `exclude={list(problems)!r}` (added to any other `exclude`), or narrow `include`."
        )
    shard_group([stored_tensor(*weight.holders[0]) for weight in selected.values()])  # raises unless sharded alike
    return selected


def _qualified(module_name: str, tensor_name: str) -> str:
    return f"{module_name}.{tensor_name}" if module_name else tensor_name


def _filter_matches(layer_filter: LayerFilter, module_name: str, module: nn.Module, tensor_name: str) -> bool:
    if isinstance(layer_filter, type):
        return isinstance(module, layer_filter)
    return fnmatch.fnmatchcase(module_name, layer_filter) or fnmatch.fnmatchcase(
        _qualified(module_name, tensor_name), layer_filter
    )


def _unsparsifiable(module: nn.Module, tensor_name: str, output_axis: int) -> str | None:
    """Why `module.<tensor_name>` cannot be sparsified, if it cannot; else None."""
    if parametrize.is_parametrized(module, tensor_name):
        return None  # checked when it was parametrized; reading it would compute it
    function = _norm_hook(module, tensor_name)
    if function is not None:
        return (
            f"it is recomputed before each forward by `torch.nn.utils.{function}` (a hook, which would overwrite a "
            "sparse weight); a normalised weight cannot be sparsified"
        )
    weight = stored_tensor(module, tensor_name)
    if is_lazy(weight):
        return (
            f"it belongs to a lazy module ({type(module).__name__}) and has no shape yet; run one forward pass "
            "before fitting, e.g. `self(self.example_input_array)` at the end of your LightningModule's "
            "`configure_model`, or give the layer its input size"
        )
    if weight.dim() < 2:
        return (
            f"it is {weight.dim()}-D (shape {tuple(weight.shape)}): only weights with output and input dimensions "
            "(conv, linear, attention projections, embeddings) are sparsified, not a norm layer's scale or a bias"
        )
    if not 0 <= output_axis < weight.dim():
        return f"`output_axes` gives it output axis {output_axis}, but it has {weight.dim()} dimensions"
    return check_shardable(weight, output_axis)


def sparsity_parametrizations(model: nn.Module) -> SparseLayers:
    """The weights of `model` that carry a lightning-sparse reparameterization, by `weight_name`.

    Example:
        >>> sparsity_parametrizations(nn.Linear(2, 2))
        {}
    """
    found: dict[int, tuple[str, SparseParametrization, list[Holder]]] = {}
    for entries in tensor_holders(model).values():
        for module_name, module, tensor_name in entries:
            if not parametrize.is_parametrized(module, tensor_name):
                continue
            for p in parametrizations_of(module, tensor_name):
                if isinstance(p, SparseParametrization):
                    name = weight_name(module_name, tensor_name)
                    found.setdefault(id(p), (name, p, []))[2].append((module, tensor_name))
    return {name: SparseWeight(p, tuple(holders)) for name, p, holders in found.values()}


def parametrize_weights(
    selected: Mapping[str, SelectedWeight], make: Callable[[Tensor, int], SparseParametrization]
) -> list[Holder]:
    """Register `make(weight, output_axis)` on each selected weight, on every module holding it; all or nothing.

    A weight that already carries another parametrization is refused rather than stacked on. Returns
    the holders that got one, for `unparametrize`.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> _ = parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-5.0))
        >>> list(sparsity_parametrizations(net))
        ['0']
    """
    for name, weight in selected.items():
        for module, tensor_name in weight.holders:
            if parametrize.is_parametrized(module, tensor_name):
                other = type(parametrizations_of(module, tensor_name)[0]).__name__
                raise ValueError(
                    f"weight {name!r} already has a parametrization ({other}); exclude it with `exclude=[{name!r}]`"
                )
    done: list[Holder] = []
    try:
        for weight in selected.values():
            module, tensor_name = weight.holders[0]
            parametrization = make(stored_tensor(module, tensor_name), weight.output_axis)
            for module, tensor_name in weight.holders:
                order = tuple(module._parameters)
                parametrize.register_parametrization(module, tensor_name, parametrization)
                setattr(parametrizations_of(module, tensor_name), _ORDER_ATTRIBUTE, order)
                done.append((module, tensor_name))
    except Exception:
        unparametrize(done)
        raise
    return done


def unparametrize(holders: Iterable[Holder]) -> None:
    """Undo `parametrize_weights`: each holder gets back its raw parameter, values untouched.

    Unlike `harden`, nothing of the reparameterization is baked in: for giving a model back as it came.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> weight = net[0].weight
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> added = parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=0.0))
        >>> unparametrize(added)
        >>> net[0].weight is weight, sparsity_parametrizations(net)
        (True, {})
    """
    for module, tensor_name in holders:
        remove_parametrization(module, tensor_name, bake=False)


def check_removable(name: str, module: nn.Module, tensor_name: str) -> None:
    """Raise unless `remove_parametrization` can take lightning-sparse's parametrization off `module.<tensor_name>`:
    it must be the first (innermost) one, whatever comes after it.

    Example:
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer = nn.utils.parametrizations.orthogonal(nn.Linear(2, 2))
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> check_removable("fc", layer, "weight")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: weight 'fc' has a parametrization under lightning-sparse's (_Orthogonal), ...
    """
    stack = list(parametrizations_of(module, tensor_name))
    ours = [i for i, p in enumerate(stack) if isinstance(p, SparseParametrization)]
    if ours != [0]:
        under = ", ".join(type(p).__name__ for p in stack[: ours[0] if ours else len(stack)])
        raise ValueError(
            f"weight {name!r} has a parametrization under lightning-sparse's ({under}), so lightning-sparse's "
            "cannot be taken off without baking that one in too; remove it first with "
            "`torch.nn.utils.parametrize.remove_parametrizations`"
        )


def remove_parametrization(module: nn.Module, tensor_name: str, bake: bool) -> None:
    """Remove lightning-sparse's parametrization of `module.<tensor_name>`, writing its effective weight into the
    raw one if `bake`.

    The tensor gets its place among the module's parameters back, so `state_dict()` keys and
    `parameters()` come back in the unmodified model's order. Parametrizations stacked on top of
    lightning-sparse's (registered after it) stay, on top of the raw weight with lightning-sparse's
    effective weight written into it if `bake`; one under it is refused (`check_removable`).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> remove_parametrization(layer, "weight", bake=True)
        >>> list(layer.state_dict())
        ['weight', 'bias']
    """
    check_removable(type(module).__name__, module, tensor_name)
    stack = parametrizations_of(module, tensor_name)
    # Baked into the raw weight in place, so it stays the same `Parameter` (the optimizer's, and FSDP2's shard).
    if bake:
        with torch.no_grad():
            stack.original.copy_(stack[0](stack.original))
    if len(stack) > 1:
        # Someone else's parametrizations come after ours: take ours out of the chain, theirs then see the raw
        # weight, which holds what ours made of it if `bake`.
        del stack[0]
        return
    order = getattr(stack, _ORDER_ATTRIBUTE, (tensor_name,))
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    # Removal re-registers the tensor last; put it back where it was.
    position = {name: i for i, name in enumerate(order)}
    module._parameters = dict(sorted(module._parameters.items(), key=lambda item: position.get(item[0], len(order))))
