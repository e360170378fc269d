"""Hardening: turn a reparameterized model back into a plain one with exact zeros."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

from lightning_sparse.layers import check_removable, remove_parametrization, sparsity_parametrizations
from lightning_sparse.sharding import retarget_fsdp_params

__all__ = ["harden"]

_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


@torch.no_grad()
def harden(module: _ModuleT) -> _ModuleT:
    """Write the effective sparse weights into the plain parameters and drop the reparameterizations.

    In place; returns `module`. Afterwards every layer has its original class, its `weight` is an
    ordinary parameter (the same object the optimizer held) with exact zeros (a weight tied between
    modules stays one parameter, so the model computes what it computed before), the method's shrink
    and rescale are baked in, thresholds and masks are gone, and `state_dict()` keys equal the
    unmodified model's. A model without lightning-sparse reparameterizations is returned as is.

    Only lightning-sparse's parametrizations are removed: one of yours registered after it on the same
    weight stays, on the hardened raw weight, so the model computes what it computed before. One under
    it (which lightning-sparse never stacks on) would have to be baked in too: that raises a `ValueError`
    before anything changes.

    A model sharded with FSDP2's `fully_shard` is hardened shard by shard, each rank baking its own rows;
    it stays sharded, and its full state dict (`torch.distributed.checkpoint.state_dict.get_model_state_dict`
    with `full_state_dict=True`) loads into the unmodified model.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> from lightning_sparse.methods.str_method import LearnedSoftThreshold
        >>> layer = nn.Linear(3, 3)
        >>> _ = parametrize.register_parametrization(layer, "weight", LearnedSoftThreshold(s_init=0.0))
        >>> sorted(harden(layer).state_dict())
        ['bias', 'weight']
    """
    layers = sparsity_parametrizations(module)
    for name, weight in layers.items():
        for layer, tensor_name in weight.holders:
            check_removable(name, layer, tensor_name)
    for weight in layers.values():
        # Holders of a tied weight share its raw tensor: baked in by the first, it is the effective one for the rest.
        for i, (layer, tensor_name) in enumerate(weight.holders):
            remove_parametrization(layer, tensor_name, bake=i == 0)
    if layers:
        retarget_fsdp_params(module)  # FSDP2 swaps each weight on its module again
    return module
