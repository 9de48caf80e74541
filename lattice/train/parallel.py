"""Data parallelism for lattice modules: the process group of the fused embedding row exchange, DDP's
ignore list, the start-of-fit broadcast of the embedding replicas, and FSDP2 sharding of the dense layers.

Dense parameters are handled by the strategy (DDP all-reduces their gradients, FSDP2 shards them). The
embedding tables with a fused in-backward optimizer never have a gradient for a strategy to reduce:
every rank keeps a full replica, and the fused backward exchanges the rows its batch touched with the
other ranks (:mod:`lattice.ops.row_exchange`), so all replicas apply the same global-batch update.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DataParallelState", "fused_state_names", "broadcast_fused_state", "fully_shard_dense"]


class DataParallelState:
    """The data-parallel group a module trains in (``world_size == 1`` outside torch.distributed).

    The group is a dedicated one (a new group over the same ranks, or FSDP2's data-parallel mesh
    dimension), so the exchange's collectives, issued from inside the backward, never interleave with
    the strategy's own gradient collectives on the default group.
    """

    def __init__(self) -> None:
        self.group: Optional[dist.ProcessGroup] = None
        self.world_size = 1

    def setup(self, device_mesh: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            self.group, self.world_size = None, 1
            return
        if device_mesh is not None:
            names = device_mesh.mesh_dim_names or ()
            if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    f"lattice trains data parallel only: tensor_parallel_size must be 1, got "
                    f"{device_mesh['tensor_parallel'].size()} (use lattice.train.FSDP2Strategy)"
                )
            dp_mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
            self.group, self.world_size = dp_mesh.get_group(), dp_mesh.size()
            return
        world = dist.get_world_size()
        if self.group is None or self.world_size != world:
            # Every rank reaches setup() in the same order, as new_group requires.
            self.group = dist.new_group(ranks=list(range(world))) if world > 1 else None
            self.world_size = world

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """A summed copy of ``tensor`` over the group's ranks (``tensor`` itself when alone)."""
        return self._all_reduce(tensor, dist.ReduceOp.SUM)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum of ``tensor`` over the group's ranks (``tensor`` itself when alone)."""
        return self._all_reduce(tensor, dist.ReduceOp.MAX)

    def _all_reduce(self, tensor: Tensor, op: Any) -> Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.clone()
        dist.all_reduce(out, op=op, group=self.group)
        return out

    def __getstate__(self):  # process groups do not pickle; a copy starts outside any group
        return {"group": None, "world_size": 1}


def _fused_modules(module: nn.Module):
    for name, child in module.named_modules():
        if hasattr(child, "fused_state_names") and getattr(child, "fused_optimizer", None) is not None:
            yield name, child


def fused_state_names(module: nn.Module) -> List[str]:
    """``state_dict`` names (relative to ``module``) of every fused embedding weight and optimizer state."""
    names: List[str] = []
    for name, child in _fused_modules(module):
        names += child.fused_state_names(prefix=f"{name}." if name else "")
    return names


@torch.no_grad()
def broadcast_fused_state(module: nn.Module, state: DataParallelState) -> None:
    """Copies the group's first rank's fused embedding weights and optimizer state to every rank."""
    if state.world_size == 1:
        return
    src = dist.get_global_rank(state.group, 0)
    for _, child in _fused_modules(module):
        if getattr(child, "is_sharded", False):  # each rank holds other shards; its replicated tables are a child
            continue
        for tensor in [*child.weights.values(), *child.optimizer_state.buffers()]:
            if tensor.numel():
                dist.broadcast(tensor.data, src=src, group=state.group)


def _has_dense_parameters(module: nn.Module, ignored: set) -> bool:
    return any(p.requires_grad and p not in ignored for p in module.parameters())


def _shard_units(module: nn.Module, ignored: set, fully_shard, mesh) -> None:
    """``fully_shard`` each child that runs through its own ``forward`` (containers are descended into,
    since a ModuleList/ModuleDict is never called itself)."""
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            _shard_units(child, ignored, fully_shard, mesh)
        elif hasattr(child, "set_fused_optimizer") or not _has_dense_parameters(child, ignored):
            continue
        else:
            fully_shard(child, mesh=mesh, ignored_params=ignored)


def fully_shard_dense(lightning_module: nn.Module, device_mesh: Any) -> None:
    """FSDP2: shard every dense layer of ``lightning_module`` (the network's children, then the network, then
    any other top-level module with parameters) over the data-parallel mesh; fused embedding weights are
    left out (``ignored_params``) and stay replicated. Idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    names = device_mesh.mesh_dim_names or ()
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    if any(isinstance(m, FSDPModule) for m in lightning_module.modules()):
        return
    if getattr(lightning_module, "sparse_optimizer", None) == "none":
        raise ValueError(
            "FSDP2 needs the fused sparse optimizer for embedding tables (sparse_optimizer: rowwise_adagrad or sgd); "
            "sparse autograd gradients cannot be sharded"
        )
    ignored = {p for _, m in _fused_modules(lightning_module) for p in m.parameters()}
    for child in lightning_module.children():
        if not _has_dense_parameters(child, ignored):
            continue
        _shard_units(child, ignored, fully_shard, mesh)
        fully_shard(child, mesh=mesh, ignored_params=ignored)

