"""Per-layer parameter and FLOPs budgets of a (possibly reparameterized) model: plain PyTorch.

FLOPs follow the papers' convention: multiply-accumulates (MACs) of conv and linear layers, per
sample, no bias, BatchNorm, activations or pooling. Dense counts come from one real forward under
`torch.utils.flop_counter.FlopCounterMode`, so any architecture works; sparse counts are dense
counts scaled by each layer's density, which only needs the layers' non-zeros (cheap), so a
training loop measures dense counts once and calls `sparse_stats` at each log.

A NaN or inf entry is never counted as a zero: a keep mask prunes a NaN (`NaN > t` is false), but the
effective weight there is NaN. Layers without a weight tensor (`weight=None`, a lazy layer not yet
materialized) have no budget and are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparse.layers import (
    SPARSIFIABLE_TYPES,
    matmul_weights,
    sparsity_parametrizations,
    stored_tensor,
    tensor_holders,
)
from lightning_sparse.methods.base import SparseLayers, SparseParametrization, parametrizations_of, weight_name
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
    """Dense multiply-accumulates per sample of each conv/linear (or sparsified) layer, by name.

    Measured on one forward in eval mode (restored afterwards), so BatchNorm statistics and the RNG
    of the training run are untouched. A layer the forward does not reach counts 0.

    Example:
        >>> dense_flops(nn.Linear(4, 3), torch.randn(5, 4))
        {'': 12}
    """
    batch_size = _batch_size(example_input)
    root = type(module).__name__
    with _eval_mode(module), FlopCounterMode(display=False) as counter:
        _call(module, example_input)
    # The counter names modules `<root class>.<qualified name>` and counts 2 FLOPs per MAC.
    counts = counter.get_flop_counts()
    return {
        name: sum(counts.get(f"{root}.{name}" if name else root, {}).values()) // (2 * batch_size)
        for name in _weights(module, {})
    }


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
            counts.append(torch.count_nonzero(weights[name]))  # a NaN is not a zero
        else:
            # Reading the parametrized tensor would compute the effective weight; the mask is cheap.
            weights[name] = parametrizations_of(layer, tensor_name).original.detach()
            counts.append(parametrization.keep_mask(weights[name]).sum())
        # Non-finite if any entry is: a reduction, no copy of the weight.
        sums.append(weights[name].sum(dtype=torch.float32))
    # One host sync for all layers rather than one per layer.
    values = torch.stack([t.double() for t in (*counts, *sums)]).tolist() if counts else []
    nonzeros = dict(zip(weights, map(int, values[: len(counts)]), strict=True))
    totals = dict(zip(weights, values[len(counts) :], strict=True))
    # Rare: exact counts, and for a reparameterized layer its non-finite entries among the non-zeros.
    non_finite = count_non_finite({name: w for name, w in weights.items() if not math.isfinite(totals[name])})
    for name in non_finite:
        parametrization = layers[name][1]
        if parametrization is not None:
            weight = weights[name]
            nonzeros[name] = int((parametrization.keep_mask(weight) | ~torch.isfinite(weight)).sum())
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
    weights = {name: weight.raw.detach() for name, weight in layers.items()}
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
