"""Per-layer parameter and FLOPs budgets of a (possibly reparameterized) model: plain PyTorch.

FLOPs follow the papers' convention: multiply-accumulates (MACs) of conv and linear layers, per
sample, no bias, BatchNorm, activations or pooling. Dense counts come from one real forward under
`torch.utils.flop_counter.FlopCounterMode`, so any architecture works; sparse counts are dense
counts scaled by each layer's density, which only needs the layers' non-zeros (cheap), so a
training loop measures dense counts once and calls `sparse_stats` at each log.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparse.layers import SPARSIFIABLE_TYPES, sparsity_parametrizations
from lightning_sparse.methods.base import SparseParametrization, original_weight

__all__ = ["LayerStats", "dense_flops", "layer_stats", "sparse_stats"]


@dataclass(frozen=True)
class LayerStats:
    """The budget of one layer. FLOPs are multiply-accumulates per sample.

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

    @property
    def density(self) -> float:
        """Fraction of the weight's entries that are non-zero."""
        return self.nonzeros / self.params if self.params else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries that are zero."""
        return 1.0 - self.density

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
        for name in _layers(module)
    }


def sparse_stats(module: nn.Module, dense: Mapping[str, int]) -> list[LayerStats]:
    """`LayerStats` of `module` from already measured dense counts: counts non-zeros, no forward.

    A reparameterized layer's non-zeros come from its keep mask, which is what its effective weight
    has, without computing that weight. A weight shared by several layers counts once per layer.

    Example:
        >>> layer = nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = layer.weight[0].zero_()
        >>> sparse_stats(layer, {"": 12})[0].sparse_flops
        8
    """
    layers = _layers(module)
    weights, counts = {}, []
    for name, (layer, parametrization) in layers.items():
        if parametrization is None:
            weights[name] = cast(Tensor, layer.weight).detach()
            counts.append(torch.count_nonzero(weights[name]))
        else:
            # `layer.weight` would recompute the effective weight; the mask is cheap.
            weights[name] = original_weight(layer).detach()
            counts.append(parametrization.keep_mask(weights[name]).sum())
    # One host sync for all layers rather than one per layer.
    nonzeros = torch.stack(counts).tolist() if counts else []
    return [
        LayerStats(name, tuple(weight.shape), weight.numel(), nz, dense.get(name, 0))
        for (name, weight), nz in zip(weights.items(), nonzeros, strict=True)
    ]


def _layers(module: nn.Module) -> dict[str, tuple[nn.Module, SparseParametrization | None]]:
    """Conv/linear layers and any other sparsified layer, with their reparameterization if any."""
    sparsified = sparsity_parametrizations(module)
    return {
        name: sparsified.get(name, (layer, None))
        for name, layer in module.named_modules()
        if name in sparsified or isinstance(layer, SPARSIFIABLE_TYPES)
    }


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
