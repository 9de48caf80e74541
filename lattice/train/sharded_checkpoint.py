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
sharded one, and one process without a process group reads a folder back into whole tables
(:func:`load_full_tables`: ``lattice export``, ``load_from_config``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lattice.nn.embedding import EmbeddingBagCollection
from lattice.nn.placement import ShardingPlan
from lattice.nn.sharded import ShardedEmbeddingBagCollection

__all__ = ["sharded_collections", "save_sharded_tables", "load_sharded_tables", "saved_plans", "tables_folder",
           "load_full_tables"]

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
    _check_entries(state, _saved_entries(path), path)
    with _quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=not dist.is_initialized())


def _saved_entries(path: str) -> Dict[str, Any]:
    """The folder's ``{key: metadata}``; a folder that is missing or not a DCP checkpoint raises, naming it."""
    if not os.path.isdir(path):
        raise ValueError(f"sharded checkpoint: the tables folder {os.fspath(path)!r} does not exist (a checkpoint of "
                         "sharded tables keeps them there, beside its .ckpt file; copy the folder with the file)")
    try:
        return dcp.FileSystemReader(os.fspath(path)).read_metadata().state_dict_metadata
    except FileNotFoundError as exc:
        raise ValueError(f"sharded checkpoint {path}: not a complete torch.distributed.checkpoint folder "
                         f"(no .metadata)") from exc


def _check_entries(state: Mapping[str, Any], saved: Mapping[str, Any], path: str) -> None:
    for key, value in state.items():
        if key not in saved:
            raise ValueError(f"sharded checkpoint {path}: no entry {key!r} (it holds "
                             f"{sorted(k for k in saved if not k.endswith(_PLAN))[:20]})")
        shape = tuple(getattr(saved[key], "size", ()))
        if shape != tuple(value.shape if not hasattr(value, "metadata") else value.metadata().size):
            raise ValueError(f"sharded checkpoint {path}: {key!r} has shape {shape} there, but the model's is "
                             f"{tuple(value.size())}")


def tables_folder(checkpoint: Mapping[str, Any], ckpt_path: str) -> Optional[str]:
    """The tables folder a Lightning checkpoint (loaded as ``checkpoint`` from ``ckpt_path``) names, beside the
    file; ``None`` for a checkpoint written without sharded tables."""
    entry = checkpoint.get("sharded_tables")
    if entry is None:
        return None
    return os.path.join(os.path.dirname(os.fspath(ckpt_path)), entry["folder"])


def load_full_tables(module: nn.Module, path: str) -> None:
    """Loads the folder ``path`` into the unsharded :class:`EmbeddingBagCollection` s of ``module`` (whole tables
    and their row-wise Adagrad state, on one process, no process group needed): each collection at the path a
    sharded collection had when the folder was written reads every piece of its tables, whatever plan and world
    size wrote them.

    Raises:
        ValueError: the folder is missing, or a collection or table it holds is not in ``module`` (or has another
            shape), naming it.
    """
    saved = _saved_entries(path)
    state: Dict[str, object] = {}
    for collection_path in sorted(k[: -len(_PLAN)].rstrip(".") for k in saved if k.endswith(_PLAN)):
        try:
            collection = module.get_submodule(collection_path)
        except AttributeError:
            collection = None
        if not isinstance(collection, EmbeddingBagCollection):
            raise ValueError(f"sharded checkpoint {path}: it holds the tables of {collection_path!r}, which is not an "
                             f"embedding collection of {type(module).__name__}")
        for t in collection.tables:
            key = _key(collection_path, t.name)
            state[f"{key}.weight"] = collection.embedding_weight(t.name)
            momentum = collection.optimizer_state_of(t.name)
            if momentum.numel() and f"{key}.momentum" in saved:  # an SGD folder has none
                state[f"{key}.momentum"] = momentum
    _check_entries(state, saved, path)
    with _quiet():
        dcp.load(state, checkpoint_id=os.fspath(path), no_dist=True)
