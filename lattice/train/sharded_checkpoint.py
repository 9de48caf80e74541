"""Checkpoints of sharded embedding tables through ``torch.distributed.checkpoint`` (DCP), resharding on load.

Every rank writes only its shards and their fused-optimizer state into one DCP folder; a load under another
plan or world size (2 -> 1, 1 -> 2, 2 -> 4) reads, on each rank, just the pieces its new shards overlap.
The layout does not depend on the plan: for each :class:`~lattice.nn.sharded.ShardedEmbeddingBagCollection`
at module path ``P`` and each of its tables ``T``,

- ``P.T.weight``   ``[rows, D]``  the whole table's rows (however they are split);
- ``P.T.momentum`` ``[rows]``     row-wise Adagrad's per-row state (one value per row, shared by a
  column-wise table's slices; absent under SGD);
- ``P.__plan__``   the plan the folder was written under (:meth:`ShardingPlan.to_dict` as JSON).

So the state keys are the same under every plan, and a replicated table is stored under the same keys as a
sharded one.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Dict, Iterator, Tuple

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lattice.nn.placement import ShardingPlan
from lattice.nn.sharded import ShardedEmbeddingBagCollection

__all__ = ["sharded_collections", "save_sharded_tables", "load_sharded_tables", "saved_plans"]

_PLAN = "__plan__"


def sharded_collections(module: nn.Module) -> Iterator[Tuple[str, ShardedEmbeddingBagCollection]]:
    """``(path, collection)`` of every sharded collection under ``module``, in module order."""
    for name, child in module.named_modules():
        if isinstance(child, ShardedEmbeddingBagCollection):
            yield name, child


@contextlib.contextmanager
def _quiet():
    """DCP reads and writes shards as ``ShardedTensor`` s, whose deprecation it announces at every use; it also
    warns that a load without a process group is single-process, which is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _state(module: nn.Module, for_loading: bool) -> Dict[str, object]:
    state: Dict[str, object] = {}
    for name, collection in sharded_collections(module):
        state.update(collection.checkpoint_state(prefix=_key(name, ""), for_loading=for_loading))
    return state


def save_sharded_tables(module: nn.Module, path: str) -> None:
    """Writes the sharded tables of ``module`` (each rank its own shards) and their plans into the folder
    ``path``. Collective: every rank of the tables' group calls it."""
    state = _state(module, for_loading=False)
    for name, collection in sharded_collections(module):
        state[_key(name, _PLAN)] = json.dumps(collection.plan.to_dict())
    with _quiet():
        dcp.save(state, checkpoint_id=os.fspath(path), no_dist=not dist.is_initialized())


def saved_plans(path: str) -> Dict[str, ShardingPlan]:
    """``{collection path: plan}`` the folder ``path`` was written under."""
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
    keys = [k for k in metadata.state_dict_metadata if k.endswith(_PLAN)]
    state: Dict[str, object] = {k: "" for k in keys}
    with _quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
    return {k[: -len(_PLAN)].rstrip("."): ShardingPlan.from_dict(json.loads(v)) for k, v in state.items()}


def load_sharded_tables(module: nn.Module, path: str) -> None:
    """Loads the tables of ``module``'s sharded collections from the folder ``path``, whatever plan and world size
    it was saved under: each rank reads the rows and columns of its own shards (and the replicas it holds).

    Raises:
        ValueError: a table of ``module`` is missing from the folder or has another shape there, naming it.
    """
    state = _state(module, for_loading=True)
    metadata = dcp.FileSystemReader(os.fspath(path)).read_metadata()
    saved = metadata.state_dict_metadata
    for key, value in state.items():
        if key not in saved:
            raise ValueError(f"sharded checkpoint {path}: no entry {key!r} (it holds "
                             f"{sorted(k for k in saved if not k.endswith(_PLAN))[:20]})")
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != tuple(value.shape if not hasattr(value, "metadata") else value.metadata().size):
            raise ValueError(f"sharded checkpoint {path}: {key!r} has shape {shape} there, but the model's is "
                             f"{tuple(value.size())}")
    with _quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not dist.is_initialized())
