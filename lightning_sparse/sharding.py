"""Sharded weights (FSDP2's `fully_shard`): plain PyTorch pieces that let a method work on shards.

Under FSDP2 a weight is a `DTensor` sharded along its first dimension (`Shard(0)`) over a 1-D device
mesh: each rank stores a block of output rows, and FSDP2 all-gathers the full weight only for the
forward and backward of its module, freeing it after. lightning-sparse keeps that contract:

- **Method state is sharded like its weight.** A mask shaped like the weight, or a per-output-channel
  rescale, is a `DTensor` with the weight's mesh and placement (`shard_like`): each rank holds the
  rows of its own shard, 1/world_size of the state, and a distributed checkpoint saves each rank's
  part. Scalars that every rank agrees on (ST-3's threshold, STR's `s`) stay plain tensors, identical
  on every rank, and checkpoints save them once.
- **Updates work on the local shard.** After an optimizer step the raw weight is in its sharded state;
  a method reads `local_shard(weight)` and writes the local shard of its state. Global decisions (a
  threshold over all weights of all ranks) use the collectives below, over `shard_group`.
- **The forward sees the full weight.** FSDP2 gives a parametrization the all-gathered weight, a plain
  tensor; state it needs in full is gathered there (`full_like`), and never kept.
- **FSDP2 swaps the parameter on the module it found it on.** Reparameterizing a weight moves it to
  `module.parametrizations.weight.original`; `retarget_fsdp_params` points FSDP2's swap there (and back
  after hardening), so the parametrization computes on the gathered weight.

Only what FSDP2 does by default is accepted: a weight sharded on its output axis (dimension 0 for
torch's layers) over a 1-D mesh (`check_shardable`). Without sharding, every function here is the
identity or a no-op, so single-process and DDP runs are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

__all__ = [
    "all_gather_cat",
    "all_sum",
    "average_gradient_over",
    "check_shardable",
    "full_like",
    "is_sharded",
    "local_shard",
    "retarget_fsdp_params",
    "shard_group",
    "shard_like",
]

Group = dist.ProcessGroup | None
"""The process group a weight is sharded over, or None when it is not sharded (nothing to communicate)."""


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (a shard of a tensor spread over processes).

    Example:
        >>> is_sharded(torch.ones(2))
        False
    """
    return isinstance(tensor, DTensor)


def local_shard(tensor: Tensor) -> Tensor:
    """The part of `tensor` this process stores: its local shard if sharded, else `tensor` itself.

    Example:
        >>> t = torch.ones(2)
        >>> local_shard(t) is t
        True
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def check_shardable(weight: Tensor, output_axis: int) -> str | None:
    """Why lightning-sparse cannot shard its state like `weight`, if it cannot; None if it can (or no sharding).

    Example:
        >>> check_shardable(torch.ones(2, 3), output_axis=0) is None
        True
    """
    if not isinstance(weight, DTensor):
        return None
    if weight.device_mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        return (
            f"it is sharded as {tuple(weight.placements)} over a {weight.device_mesh.ndim}-D mesh; lightning-sparse "
            "supports FSDP2's default, `fully_shard` over a 1-D mesh (Shard(0)), not tensor parallelism or HSDP"
        )
    if output_axis != 0:
        return (
            f"its output channels run along axis {output_axis}, and FSDP2 shards axis 0: ST-3's per-channel rescale "
            "would need every rank's rows; exclude it, or shard it with `shard_placement_fn` on its output axis"
        )
    return None


def shard_group(tensors: Sequence[Tensor]) -> Group:
    """The process group `tensors` are sharded over: None if none is sharded. All must be sharded alike.

    Example:
        >>> shard_group([torch.ones(2, 2)]) is None
        True
    """
    meshes = {id(t.device_mesh): t.device_mesh for t in tensors if isinstance(t, DTensor)}
    if not meshes:
        return None
    if len(meshes) > 1 or not all(isinstance(t, DTensor) for t in tensors):
        raise ValueError(
            "lightning-sparse's sparsified weights must all be sharded over one device mesh, or none of them: apply "
            "`fully_shard` with one mesh to every module holding a sparsified weight (or to their common parent)"
        )
    group = next(iter(meshes.values())).get_group()
    assert isinstance(group, dist.ProcessGroup)
    return group


def shard_like(local: Tensor, weight: Tensor, shape: Sequence[int]) -> Tensor:
    """`local`, this rank's rows of a tensor of global `shape`, as a `DTensor` sharded like `weight`
    (same mesh, `Shard(0)`); `local` itself when `weight` is not sharded.

    Example:
        >>> shard_like(torch.ones(2, 1), torch.ones(2, 3), (2, 1)).shape
        torch.Size([2, 1])
    """
    if not isinstance(weight, DTensor):
        return local
    stride = torch.empty(tuple(shape), device="meta").stride()
    return DTensor.from_local(
        local, weight.device_mesh, weight.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def full_like(state: Tensor, weight: Tensor) -> Tensor:
    """`state` as the forward needs it next to `weight`: gathered in full when `weight` is the full (gathered)
    weight and `state` a shard; as it is otherwise (both sharded, or neither).

    Example:
        >>> mask = torch.ones(2, 3, dtype=torch.bool)
        >>> full_like(mask, torch.ones(2, 3)) is mask
        True
    """
    if isinstance(state, DTensor) and not isinstance(weight, DTensor):
        return state.full_tensor()
    return state


def all_sum(tensor: Tensor, group: Group) -> Tensor:
    """`tensor` summed over the processes of `group` (a new tensor); `tensor` itself without a group.

    Example:
        >>> all_sum(torch.tensor([1, 2]), None).tolist()
        [1, 2]
    """
    if group is None:
        return tensor
    summed = tensor.clone()
    dist.all_reduce(summed, group=group)
    return summed


def all_gather_cat(tensor: Tensor, group: Group) -> Tensor:
    """The 1-D `tensor` of every process of `group` (sizes may differ), concatenated in rank order: the same
    tensor on every rank. `tensor` itself without a group.

    Example:
        >>> all_gather_cat(torch.tensor([3.0, 1.0]), None).tolist()
        [3.0, 1.0]
    """
    if group is None:
        return tensor
    world = dist.get_world_size(group)
    size = torch.tensor([tensor.numel()], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s) for s in torch.cat(sizes).tolist()]
    # Collectives move equal sizes: pad each rank's part to the largest, then cut the padding off.
    padded = tensor.new_zeros(max(counts))
    padded[: tensor.numel()] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def average_gradient_over(parameter: Tensor, group: Group) -> None:
    """Average `parameter`'s gradient over `group` after each backward, as FSDP2 does for the weights it shards.

    For a parameter every rank holds in full (STR's threshold `s`) that FSDP2 does not manage: each rank's
    gradient comes from its own batch, and without the average the ranks' copies would drift apart.

    Example:
        >>> average_gradient_over(torch.nn.Parameter(torch.zeros(())), None)  # not sharded: nothing to average
    """
    if group is None:
        return
    world = dist.get_world_size(group)

    def average(param: Tensor) -> None:
        assert param.grad is not None
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(world)

    parameter.register_post_accumulate_grad_hook(average)


def retarget_fsdp_params(model: nn.Module) -> None:
    """Point FSDP2's parameter swap of every sharded parameter of `model` at the module that holds it now.

    FSDP2 remembers, for each parameter it shards, the module and name it found it under, and sets the
    gathered or sharded parameter there around each forward. Registering a parametrization moves a weight
    to `module.parametrizations.<name>.original` (and removing it moves it back): call this after either,
    so the parametrization computes on the gathered weight. A no-op on a model without FSDP2 modules.

    Example:
        >>> retarget_fsdp_params(nn.Linear(2, 2))  # no FSDP2 module: nothing to retarget
    """
    from torch.distributed.fsdp import FSDPModule

    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, name))
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            found = holders.get(id(fsdp_param.sharded_param))
            if not found:
                continue
            info = fsdp_param._module_info
            info.module, info.param_name = found[0]
            info.shared_modules = [m for m, _ in found[1:]]
            info.shared_param_names = [n for _, n in found[1:]]
