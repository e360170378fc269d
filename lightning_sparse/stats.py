"""Per-layer parameter and FLOPs budgets of a (possibly reparameterized) model: plain PyTorch.

FLOPs follow the papers' convention: multiply-accumulates (MACs) per sample of the products with a
weight (convolutions, linear layers, attention projections, any matmul that reads a weight), no bias,
BatchNorm, activations or pooling. Dense counts come from one real forward: every matrix multiply and
convolution that `torch.utils.flop_counter` has a formula for is charged to the weight it reads,
recognised by its storage (a view such as `weight.t()` or a slice of a packed projection shares it; a
dtype cast is followed), whichever module runs it: a weight used through `F.linear` inside its parent
(`MultiheadAttention`'s projections, timm's fused qkv) is counted like a `Linear`. Attention's score
and value products (`QK^T`, `AV`) multiply activations by activations: no weight is charged for them,
and they are not in `flops/dense` (the papers count weight MACs; these do not shrink with sparsity).
`MultiheadAttention`'s fused eval fast path runs as separate products while counting. A fused kernel
without a formula (an LSTM's `aten.lstm`) counts 0. Sparse counts are dense counts scaled by each
weight's density, which only needs the non-zeros (cheap), so a training loop measures dense counts
once and calls `sparse_stats` at each log.

A NaN or inf entry is never counted as a zero: a keep mask prunes a NaN (`NaN > t` is false), but the
effective weight there is NaN. Layers without a weight tensor (`weight=None`, a lazy layer not yet
materialized) have no budget and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils.flop_counter import flop_registry
from typing_extensions import override

from lightning_sparse.layers import (
    SPARSIFIABLE_TYPES,
    matmul_weights,
    sparsity_parametrizations,
    stored_tensor,
    tensor_holders,
)
from lightning_sparse.methods.base import SparseLayers, SparseParametrization, parametrizations_of, weight_name
from lightning_sparse.sharding import all_sum, is_sharded, local_shard, shard_group
from lightning_sparse.thresholds import count_non_finite

__all__ = ["LayerStats", "dense_flops", "layer_stats", "non_finite_weights", "sparse_stats", "sparsified_fraction"]


@dataclass(frozen=True)
class LayerStats:
    """The budget of one layer. FLOPs are multiply-accumulates per sample.

    `nonfinite` entries (NaN or inf) are counted among the `nonzeros`. An empty layer (no entries) has
    sparsity 0.

    Example:
        >>> s = LayerStats("fc", (10, 20), params=200, nonzeros=50, dense_flops=200)
        >>> s.density, s.sparsity, s.sparse_flops
        (0.25, 0.75, 50)
    """

    name: str
    shape: tuple[int, ...]
    params: int
    nonzeros: int
    dense_flops: int
    nonfinite: int = 0

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are non-zero."""
        return self.nonzeros / self.params if self.params else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are zero."""
        return 1.0 - self.density

    @property
    def fully_pruned(self) -> bool:
        """Whether every entry of the weight is zero: the layer's output no longer depends on its input.

        Example:
            >>> LayerStats("fc", (10, 20), params=200, nonzeros=0, dense_flops=200).fully_pruned
            True
        """
        return self.params > 0 and self.nonzeros == 0

    @property
    def sparse_flops(self) -> int:
        """Dense MACs scaled by the layer's density (both papers' convention)."""
        return round(self.dense_flops * self.density)


def layer_stats(module: nn.Module, example_input: Any) -> list[LayerStats]:
    """One `LayerStats` per conv/linear (or sparsified) layer of `module`, in module order.

    Runs `module` once on `example_input` (a tensor, a tuple of positional arguments or a dict of
    keyword arguments, as Lightning's `example_input_array`). A reparameterized layer is counted by
    its effective weight. Shorthand for `sparse_stats(module, dense_flops(module, example_input))`.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> [(s.name, s.dense_flops) for s in layer_stats(net, torch.randn(2, 3, 8, 8))]
        [('0', 7776), ('2', 2880)]
    """
    return sparse_stats(module, dense_flops(module, example_input))


@torch.no_grad()
def dense_flops(module: nn.Module, example_input: Any) -> dict[str, int]:
    """Dense multiply-accumulates per sample of each weight a product in the forward reads, by `weight_name`.

    Measured on one forward in eval mode (restored afterwards), so BatchNorm statistics and the RNG
    of the training run are untouched. A weight the forward does not multiply by is not listed.

    Example:
        >>> dense_flops(nn.Linear(4, 3), torch.randn(5, 4))
        {'': 12}
        >>> dense_flops(nn.MultiheadAttention(8, 2, batch_first=True), (torch.randn(1, 5, 8),) * 3)
        {'in_proj_weight': 960, 'out_proj': 320}
    """
    batch_size = _batch_size(example_input)
    counter = _WeightProducts()
    hooks = []
    for holders in tensor_holders(module).values():
        name = weight_name(holders[0][0], holders[0][2])
        for _, layer, tensor_name in holders:
            if parametrize.is_parametrized(layer, tensor_name):
                # A parametrized weight is computed at each access: recognise the tensor it becomes.
                note = partial(_note_output, counter, name)
                hooks.append(parametrizations_of(layer, tensor_name).register_forward_hook(note))
            else:
                counter.note(stored_tensor(layer, tensor_name), name)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    try:
        torch.backends.mha.set_fastpath_enabled(False)
        with _eval_mode(module), counter:
            _call(module, example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for hook in hooks:
            hook.remove()
    return {name: flops // (2 * batch_size) for name, flops in counter.flops.items()}


class _WeightProducts(TorchDispatchMode):
    """Charges the FLOPs of every product `flop_registry` knows to the noted weight among its inputs."""

    # Copies that keep a weight a weight (autocast's cast, `contiguous`); views share its storage anyway.
    _COPIES = frozenset({torch.ops.aten._to_copy.default, torch.ops.aten.clone.default})

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[int, str] = {}
        self.flops: dict[str, int] = {}
        self._alive: list[Tensor] = []

    def note(self, tensor: Tensor, name: str) -> None:
        # Weights have two or more dimensions: a bias, also an input of `addmm`, is not charged. A tensor subclass
        # (a `DTensor` shard under FSDP2, a collective's result) has no storage of its own.
        if tensor.numel() and tensor.dim() >= 2 and not is_traceable_wrapper_subclass(tensor):
            self.weights[tensor.untyped_storage().data_ptr()] = name
            # Held until the count ends: a freed weight's memory could hold the next one under the same address.
            self._alive.append(tensor)

    def _name(self, value: Any) -> str | None:
        if isinstance(value, Tensor) and value.numel() and not is_traceable_wrapper_subclass(value):
            return self.weights.get(value.untyped_storage().data_ptr())
        return None

    @override
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        names = [name for name in map(self._name, args) if name is not None]
        if not names:
            return out
        if func._overloadpacket in flop_registry:
            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            self.flops[names[0]] = self.flops.get(names[0], 0) + flops
        elif func in self._COPIES:
            self.note(out, names[0])
        return out


def _note_output(counter: _WeightProducts, name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
    counter.note(output, name)


@torch.no_grad()
def sparse_stats(module: nn.Module, dense: Mapping[str, int]) -> list[LayerStats]:
    """`LayerStats` of `module` from already measured dense counts: counts non-zeros, no forward.

    One row per sparsified weight, per conv/linear/attention weight, and per other weight `dense` counts
    multiply-accumulates for, in module order. A weight tied between modules is one row. A
    reparameterized weight's non-zeros come from its keep mask, which is what its effective weight
    has, without computing that weight; its NaN and inf entries count as non-zeros too.

    Example:
        >>> layer = nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = layer.weight[0].zero_()
        ...     layer.weight[1, 0] = float("nan")
        >>> stats = sparse_stats(layer, {"": 12})[0]
        >>> stats.sparse_flops, stats.nonfinite
        (8, 1)
    """
    layers = _weights(module, dense)
    weights, counts, sums = {}, [], []
    for name, ((layer, tensor_name), parametrization) in layers.items():
        if parametrization is None:
            weights[name] = _dense_weight(layer, tensor_name)
            counts.append(torch.count_nonzero(local_shard(weights[name])))  # a NaN is not a zero
        else:
            # Reading the parametrized tensor would compute the effective weight; the keep mask is two comparisons of
            # the raw weight.
            weights[name] = parametrizations_of(layer, tensor_name).original.detach()
            counts.append(local_shard(parametrization.keep_mask(weights[name])).sum())
        # Non-finite if any entry is: a reduction, no copy of the weight.
        sums.append(local_shard(weights[name]).sum(dtype=torch.float32))
    # One host sync for all layers rather than one per layer.
    values = torch.stack([t.double() for t in (*counts, *sums)]) if counts else torch.zeros(0)
    # Sharded weights (FSDP2): each rank counted its shards; one all-reduce makes the counts global, on every rank.
    group = shard_group([w for w in weights.values() if is_sharded(w)])
    sharded = torch.tensor([is_sharded(w) for w in weights.values()] * 2, dtype=torch.bool, device=values.device)
    if group is not None:
        values = torch.where(sharded, all_sum(values * sharded, group), values)
    nonzeros = dict(zip(weights, map(int, values[: len(counts)].tolist()), strict=True))
    totals = dict(zip(weights, values[len(counts) :].tolist(), strict=True))
    # Rare: exact counts, and for a reparameterized layer its non-finite entries among the non-zeros.
    non_finite = count_non_finite(
        {name: local_shard(w) for name, w in weights.items() if not math.isfinite(totals[name])}
    )
    for name in non_finite:
        parametrization = layers[name][1]
        if parametrization is not None:
            weight = local_shard(weights[name])
            nonzeros[name] = int(
                (local_shard(parametrization.keep_mask(weights[name])) | ~torch.isfinite(weight)).sum()
            )
    return [
        LayerStats(name, tuple(weight.shape), weight.numel(), nonzeros[name], dense.get(name, 0), bad)
        for (name, weight), bad in zip(weights.items(), (non_finite.get(n, (0, 0))[0] for n in weights), strict=True)
    ]


def _weights(
    module: nn.Module, dense: Mapping[str, int]
) -> dict[str, tuple[tuple[nn.Module, str], SparseParametrization | None]]:
    """The weights `sparse_stats` reports, by name, each with one holder and its reparameterization if any."""
    sparsified = sparsity_parametrizations(module)
    found: dict[str, tuple[tuple[nn.Module, str], SparseParametrization | None]] = {}
    for holders in tensor_holders(module).values():
        module_name, layer, tensor_name = holders[0]
        name = weight_name(module_name, tensor_name)
        if name in sparsified:
            found[name] = ((layer, tensor_name), sparsified[name].parametrization)
        elif dense.get(name) or any(
            isinstance(m, SPARSIFIABLE_TYPES) and t in matmul_weights(m) and not is_lazy(stored_tensor(m, t))
            for _, m, t in holders
        ):
            found[name] = ((layer, tensor_name), None)
    return found


def _dense_weight(layer: nn.Module, tensor_name: str) -> Tensor:
    """`layer.<tensor_name>`, computed in eval mode if a parametrization makes it: in training mode one may update
    its state (spectral norm's power iteration), and counting must change nothing."""
    if not parametrize.is_parametrized(layer, tensor_name):
        return cast(Tensor, getattr(layer, tensor_name)).detach()
    with _eval_mode(parametrizations_of(layer, tensor_name)):
        return cast(Tensor, getattr(layer, tensor_name)).detach()


def sparsified_fraction(module: nn.Module) -> float:
    """The fraction of `module`'s weight entries that carry a lightning-sparse reparameterization.

    Weights are the parameters with two or more dimensions (not biases or norm scales), a tied one
    counted once; position embeddings and class tokens count too, so a transformer stays below 1.

    Example:
        >>> from lightning_sparse.layers import parametrize_weights, select_weights
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
        >>> _ = parametrize_weights(select_weights(net), lambda w, axis: LearnedSoftThreshold(s_init=-5.0))
        >>> sparsified_fraction(net)
        0.2857142857142857
    """
    sparsified = {id(w.raw) for w in sparsity_parametrizations(module).values()}
    tensors = {key: stored_tensor(layer, name) for key, ((_, layer, name), *_) in tensor_holders(module).items()}
    sizes = {key: t.numel() for key, t in tensors.items() if not is_lazy(t) and t.dim() >= 2}
    total = sum(sizes.values())
    return sum(n for key, n in sizes.items() if key in sparsified) / total if total else 0.0


@torch.no_grad()
def non_finite_weights(layers: SparseLayers) -> dict[str, tuple[int, int]]:
    """The sparsified weights whose raw values hold NaN or inf, with the count of such entries and the size.

    One reduction per weight and one host sync for all.

    Example:
        >>> from lightning_sparse.methods.base import SparseWeight
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer, str_ = nn.Linear(2, 2), LearnedSoftThreshold(s_init=-5.0)
        >>> _ = parametrize.register_parametrization(layer, "weight", str_)
        >>> with torch.no_grad():
        ...     layer.parametrizations.weight.original[0, 0] = float("nan")
        >>> non_finite_weights({"fc": SparseWeight(str_, ((layer, "weight"),))})
        {'fc': (1, 4)}
    """
    weights = {name: local_shard(weight.raw.detach()) for name, weight in layers.items()}
    if not weights:
        return {}
    finite = torch.stack([torch.isfinite(w.sum(dtype=torch.float32)) for w in weights.values()]).tolist()
    # A sum can also overflow to inf; then no entry is non-finite, and `count_non_finite` finds none.
    return count_non_finite({name: w for (name, w), ok in zip(weights.items(), finite, strict=True) if not ok})


def _call(module: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return module(*example_input)
    if isinstance(example_input, dict):
        return module(**example_input)
    return module(example_input)


def _batch_size(example_input: Any) -> int:
    """Leading dimension of the first tensor in `example_input`."""
    first = next(_tensors(example_input), None)
    if first is None:
        raise ValueError(f"`example_input` holds no tensor to take the batch size from: {example_input!r}")
    return first.shape[0] if first.dim() else 1


def _tensors(data: Any) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        yield data
    elif isinstance(data, (tuple, list, dict)):
        for value in data.values() if isinstance(data, dict) else data:
            yield from _tensors(value)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training
