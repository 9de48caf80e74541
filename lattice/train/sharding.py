"""Training with sharded embedding tables: the ``model.sharding`` option, the swap of a network's collections for
:class:`~lattice.nn.sharded.ShardedEmbeddingBagCollection` s, the strategy whose checkpoints hold them, and the
evaluation steps every rank must take together.

``configs/sharded.yaml`` turns it on for any training config::

    model:
      sharding:
        plan: auto                  # or a plan file written by `lattice plan --out plan.yaml`
        memory_per_rank: 1GiB       # the planner's budget of table + optimizer bytes per rank
        overrides: {item: row_wise} # table -> kind (or {kind, ranks, row_bounds, col_bounds})
    trainer:
      strategy: {class_path: lattice.train.sharding.ShardedDDPStrategy}

``lattice fit|validate|test|predict`` build the network's tables on the meta device when ``model.sharding`` is
set (:func:`~lattice.nn.embedding.deferred_tables`): no rank ever holds a whole sharded table. At ``setup`` (the
process group exists by then) :func:`shard_network` plans the network's tables on rank 0
(:func:`lattice.train.planner.plan_tables`, pooling factors measured on a few training batches), broadcasts the
plan and rank 0's init seeds, and replaces every :class:`~lattice.nn.EmbeddingBagCollection` by a
:class:`~lattice.nn.sharded.ShardedEmbeddingBagCollection`: each rank allocates its own shards and draws their
initial values, the values the whole tables would have had (a network built in Python with its tables whole
has each rank copy its shards and free the rest instead). The dense layers stay data parallel under DDP, which
is told to leave the shards alone as it does the replicated fused tables.

Table names are those of :func:`lattice.train.planner.network_tables` (the bare name, or ``<collection path>.<name>``
for the wide path's repeats), the names ``lattice plan`` prints and writes.

:class:`ShardedDDPStrategy` keeps the tables out of the Lightning checkpoint file: each checkpoint gets a DCP folder
beside it (``<file>.tables-<step>``) where each rank writes its own shards and their row-wise Adagrad state, in
the plan-independent layout of :mod:`lattice.train.sharded_checkpoint`, and the file names the folder. A resume
under another plan or world size reshards. The folder is complete before the file is (atomically) written, and a
file's older folders are removed after, so the file always names a complete folder. :class:`lattice.train.FSDP2Strategy`
checkpoints sharded tables the same way (:func:`save_tables_folder`), with FSDP2 for the dense layers.

Evaluation and prediction: a sharded lookup is a collective, so every rank must run the same number of
batches. At the epoch's start the ranks agree on the most batches any of them has (:func:`start_eval_epoch`); a
rank that ran out re-runs its last batch (outputs discarded: no metric updated, nothing written by
``lattice predict``) until it has run as many (:func:`finish_eval_epoch`).
"""
from __future__ import annotations

import glob
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lattice.nn.embedding import EmbeddingBagCollection
from lattice.nn.placement import ShardingPlan, TablePlacement
from lattice.nn.sharded import ShardedEmbeddingBagCollection
from lattice.train.sharded_checkpoint import (load_sharded_tables, save_sharded_tables, sharded_collections,
                                              tables_folder)

__all__ = ["ShardingConfig", "sharding_requested", "shard_network", "ShardedDDPStrategy", "ShardedTablesCheckpoints",
           "save_tables_folder", "remove_stale_folders", "eval_batches", "start_eval_epoch", "count_eval_step",
           "finish_eval_epoch"]

_KEYS = ("plan", "memory_per_rank", "overrides", "time_limit_s", "num_batches")


@dataclass
class ShardingConfig:
    """The ``model.sharding`` option.

    Args:
        plan: ``"auto"`` (the planner places the tables at ``setup``) or the path of a plan file (YAML/JSON,
            :meth:`ShardingPlan.to_dict`, as ``lattice plan --out`` writes it) made for this world size.
        memory_per_rank: the planner's budget of table and optimizer bytes per rank (``"4GiB"``; ``auto`` only).
        overrides: table -> kind or full placement, for the planner.
        time_limit_s: the planner's search time.
        num_batches: training batches read to measure the pooling factors.
    """

    plan: str = "auto"
    memory_per_rank: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    time_limit_s: float = 2.0
    num_batches: int = 4

    @classmethod
    def from_value(cls, value: Any) -> Optional["ShardingConfig"]:
        if value is None or isinstance(value, ShardingConfig):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"model.sharding must be a mapping with keys {list(_KEYS)}, got {value!r}")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise ValueError(f"model.sharding: unknown key(s) {unknown}; the keys are {list(_KEYS)}")
        config = cls(**dict(value))
        if config.plan == "auto" and config.memory_per_rank is None:
            raise ValueError("model.sharding: plan: auto needs memory_per_rank (e.g. 4GiB)")
        if config.plan != "auto" and not os.path.exists(config.plan):
            raise ValueError(f"model.sharding.plan: no plan file {config.plan!r} (or use plan: auto)")
        return config


def sharding_requested(model_config: Any) -> bool:
    """Whether a parsed ``model`` section (``{class_path, init_args}``, as LightningCLI's subclass mode holds it)
    sets ``sharding``."""
    if model_config is None:
        return False
    init_args = model_config.get("init_args") if hasattr(model_config, "get") else None
    return init_args is not None and init_args.get("sharding") is not None


def _read_plan(path: str) -> ShardingPlan:
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh)
    try:
        return ShardingPlan.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"model.sharding.plan {path}: not a sharding plan ({exc})") from exc


def _collections(network: nn.Module):
    """``(parent, attribute, path, collection)`` of every unsharded collection, in module order."""
    for path, module in network.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            parent_path, _, attr = path.rpartition(".")
            yield network.get_submodule(parent_path) if parent_path else network, attr, path, module


def _fit_placement(name: str, placement: TablePlacement, rows: int, dim: int) -> TablePlacement:
    if (placement.num_embeddings, placement.embedding_dim) != (rows, dim):
        raise ValueError(f"model.sharding: the plan places table {name!r} as {placement.num_embeddings}x"
                         f"{placement.embedding_dim}, but the network's table is {rows}x{dim}")
    return placement


def _make_plan(module: nn.Module, config: ShardingConfig, tables, dtypes, world: int, group) -> ShardingPlan:
    """Rank 0 plans (the search is bounded by wall time, so ranks could differ) and broadcasts the plan."""
    if config.plan != "auto":
        plan = _read_plan(config.plan)
        if plan.world_size != world:
            raise ValueError(f"model.sharding.plan {config.plan} is for world_size {plan.world_size}, but this run "
                             f"has {world} ranks (make one with lattice plan --world-size {world}, or use plan: auto)")
        return plan
    payload: List[Any] = [None]
    if world == 1 or dist.get_rank(group) == 0:
        try:
            from lattice.train.planner import measure_pooling_factors, plan_tables

            optimizer = None if module.sparse_optimizer == "none" else module.sparse_optimizer
            pooling = _pooling_factors(module, config.num_batches, measure_pooling_factors)
            sequence = {f.name for f in getattr(module.network.schema, "sequence_features", [])}
            payload[0] = plan_tables(tables, world, config.memory_per_rank, pooling, overrides=config.overrides,
                                     time_limit_s=config.time_limit_s, optimizer=optimizer, dtype=dtypes,
                                     sequence_features=sequence).to_dict()
        except Exception as exc:  # every rank raises it, not only rank 0 (the others would wait forever)
            payload[0] = exc
    if world > 1:
        dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return ShardingPlan.from_dict(payload[0])


def _pooling_factors(module: nn.Module, num_batches: int, measure) -> Optional[Dict[str, float]]:
    trainer = getattr(module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None or num_batches < 1:
        return None
    # a fresh loader over the training data: the run's own loader (and its resume position) is not touched
    return measure(datamodule.train_dataloader(), num_batches)


def shard_network(module: nn.Module, config: ShardingConfig, group: Optional[dist.ProcessGroup]) -> ShardingPlan:
    """Replaces every :class:`EmbeddingBagCollection` of ``module.network`` by a
    :class:`ShardedEmbeddingBagCollection` over ``group``, placed by ``config``; returns the plan (keyed by
    :func:`~lattice.train.planner.network_tables`' names). A collection on the meta device
    (:func:`~lattice.nn.embedding.deferred_tables`) gets shards drawn from rank 0's ``init_seed`` on every rank;
    a full one has each rank copy its shards and free the full tables. A network already sharded is left as it
    is (``setup`` runs once per stage)."""
    from lattice.train.planner import network_tables

    network = module.network
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and not getattr(trainer.strategy, "saves_sharded_tables", False):
        raise ValueError(f"model.sharding needs trainer.strategy lattice.train.sharding.ShardedDDPStrategy (configs/"
                         f"sharded.yaml sets it) or lattice.train.FSDP2Strategy (stack configs/fsdp.yaml after it), "
                         f"got {type(trainer.strategy).__name__}: another strategy would checkpoint rank 0's shards "
                         "only")
    world = 1 if group is None else dist.get_world_size(group)
    found = list(_collections(network))
    if not found:
        if any(True for _ in sharded_collections(network)):
            return _merged_plan(network)
        raise ValueError("model.sharding: the network has no embedding tables to shard")
    if module.sparse_optimizer == "none":
        raise ValueError("model.sharding needs the fused sparse optimizer (sparse_optimizer: rowwise_adagrad or sgd)")
    tables, dtypes = network_tables(network)
    plan = _make_plan(module, config, tables, dtypes, world, group)
    _agree_init_seeds([c for *_, c in found], world, group)
    names = iter(tables)  # network_tables lists the collections' tables in this same module order
    for parent, attr, path, collection in found:
        local: Dict[str, TablePlacement] = {}
        plan_names: Dict[str, str] = {}
        for t in collection.tables:
            name = next(names).name
            if name not in plan.tables:
                raise ValueError(f"model.sharding: the plan has no placement for table {name!r} "
                                 f"(it places {sorted(plan.tables)})")
            local[t.name] = _fit_placement(name, plan.tables[name], t.num_embeddings, t.embedding_dim)
            plan_names[t.name] = name
        sharded = ShardedEmbeddingBagCollection.from_collection(collection, ShardingPlan(world, local), group)
        sharded.plan_names = plan_names
        setattr(parent, attr, sharded)  # the full tables go with the last reference to the old collection
    return plan


def _agree_init_seeds(collections: List[EmbeddingBagCollection], world: int, group) -> None:
    """Rank 0's ``init_seed`` of every collection, on every rank: each draws its shards of the same tables (the
    seeds agree already where every rank seeded its generator alike)."""
    if world == 1:
        return
    payload: List[Any] = [[c.init_seed for c in collections]]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    for c, seed in zip(collections, payload[0]):
        c.init_seed = seed


def _merged_plan(network: nn.Module) -> ShardingPlan:
    """The plan of an already sharded network, under the planner's table names."""
    tables: Dict[str, TablePlacement] = {}
    world = 1
    for _, c in sharded_collections(network):
        world = c.plan.world_size
        names = getattr(c, "plan_names", {})
        tables.update({names.get(n, n): p for n, p in c.plan.tables.items()})
    return ShardingPlan(world, tables)


# ---- evaluation ------------------------------------------------------------------------------------
_STAGE_BATCHES = {"val": "num_val_batches", "test": "num_test_batches", "predict": "num_predict_batches"}


def eval_batches(module: nn.Module, stage: str) -> float:
    """The batches this rank will run in the current ``stage`` (``"val"``, ``"test"`` or ``"predict"``) epoch, as
    the trainer counts them (``limit_*_batches`` and the sanity check included)."""
    if stage not in _STAGE_BATCHES:
        raise ValueError(f"stage must be one of {list(_STAGE_BATCHES)}, got {stage!r}")
    trainer = module.trainer
    counts = trainer.num_sanity_val_batches if trainer.sanity_checking else getattr(trainer, _STAGE_BATCHES[stage])
    return float(sum(counts))


def start_eval_epoch(module: nn.Module, group: Optional[dist.ProcessGroup], num_batches: float) -> None:
    """Agrees, before any evaluation lookup, on how many lookups every rank runs this epoch: the most any rank has
    (``num_batches`` is this rank's). Sharded lookups are collectives, so a rank with fewer batches re-runs its
    last one at the end (:func:`finish_eval_epoch`). The count must be known up front: a collective issued once a
    rank has run out of batches would pair with another rank's lookup."""
    module._sharded_eval_steps, module._sharded_eval_batch = 0, None
    module._sharded_eval_target = None
    if group is None or dist.get_world_size(group) == 1:
        return
    if not math.isfinite(num_batches):
        raise ValueError("with sharded tables every rank must know its number of evaluation batches in advance "
                         "(an evaluation dataloader without a length); set trainer.limit_val_batches / "
                         "limit_test_batches / limit_predict_batches to an int")
    most = torch.tensor([int(num_batches)], dtype=torch.int64, device=getattr(module, "device", None))
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    module._sharded_eval_target = int(most.item())


def count_eval_step(module: nn.Module, batch: Any) -> None:
    """Records one evaluation step of ``module`` and keeps its batch for :func:`finish_eval_epoch`."""
    module._sharded_eval_steps = getattr(module, "_sharded_eval_steps", 0) + 1
    module._sharded_eval_batch = batch


@torch.no_grad()
def finish_eval_epoch(module: nn.Module) -> None:
    """Runs the evaluation forwards this rank owes (:func:`start_eval_epoch`): its last batch again, the output
    discarded, until it has run as many as the rank with the most batches."""
    steps = getattr(module, "_sharded_eval_steps", 0)
    batch = getattr(module, "_sharded_eval_batch", None)
    target = getattr(module, "_sharded_eval_target", None)
    module._sharded_eval_steps, module._sharded_eval_batch, module._sharded_eval_target = 0, None, None
    if target is None or steps >= target:
        return
    if batch is None:
        raise RuntimeError(f"this rank evaluated no batch while another evaluated {target}; with sharded tables every "
                           "rank needs at least one evaluation batch (use fewer ranks or more evaluation data)")
    for _ in range(target - steps):
        module(batch)


# ---- checkpoints -----------------------------------------------------------------------------------
_FOLDER = re.compile(r"\.tables-(\d+)$")


def _folders_of(filepath: str) -> List[str]:
    return [p for p in glob.glob(glob.escape(os.fspath(filepath)) + ".tables-*") if _FOLDER.search(p)]


def save_tables_folder(strategy, checkpoint: Dict[str, Any], filepath) -> Optional[str]:
    """Writes the sharded tables of ``strategy``'s module into ``<filepath>.tables-<step>`` (every rank its own
    shards; collective) and records the folder and the plans in ``checkpoint["sharded_tables"]``; returns the
    folder (``None`` when the module has no sharded collection). Call it before the file is written."""
    module = strategy.lightning_module
    if not any(True for _ in sharded_collections(module)):
        return None
    folder = f"{os.fspath(filepath)}.tables-{checkpoint.get('global_step', 0)}"
    if strategy.is_global_zero and os.path.isdir(folder):
        shutil.rmtree(folder)  # a save of the same step that a crash left partial
    strategy.barrier("sharded_checkpoint_clear")
    save_sharded_tables(module, folder)
    plans = {p: c.plan.to_dict() for p, c in sharded_collections(module)}
    checkpoint["sharded_tables"] = {"folder": os.path.basename(folder), "plans": plans}
    strategy.barrier("sharded_checkpoint_tables")
    return folder


def remove_stale_folders(strategy, filepath, keep: Optional[str]) -> None:
    """Rank 0 removes the tables folders of ``filepath`` other than ``keep`` (after the file is written)."""
    if strategy.is_global_zero:
        for stale in _folders_of(filepath):
            if stale != keep:
                shutil.rmtree(stale, ignore_errors=True)


class ShardedTablesCheckpoints:
    """Mixin of a Lightning strategy whose checkpoints keep the sharded tables out of the file: before the file is
    written every rank writes its own shards into the DCP folder ``<file>.tables-<step>`` beside it
    (:func:`save_tables_folder`), and after it rank 0 removes the file's older folders. Put it before the
    strategy's base class (``class S(ShardedTablesCheckpoints, DDPStrategy)``)."""

    saves_sharded_tables = True  # shard_network accepts the strategies whose checkpoints hold every rank's shards

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        filepath = self.broadcast(filepath)  # every rank writes its shards beside rank 0's file
        folder = save_tables_folder(self, checkpoint, filepath)
        super().save_checkpoint(checkpoint, filepath, storage_options)
        if folder is not None:
            remove_stale_folders(self, filepath, keep=folder)

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        remove_stale_folders(self, filepath, keep=None)

    def _sharded_prefixes(self) -> tuple:
        """``"<path>."`` of every sharded collection of the module (empty without sharding)."""
        return tuple(f"{p}." for p, _ in sharded_collections(self.lightning_module))

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        """The base strategy's state, without the sharded tables (they go to the folder)."""
        state = super().lightning_module_state_dict()
        prefixes = self._sharded_prefixes()
        return {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state


class ShardedDDPStrategy(ShardedTablesCheckpoints, DDPStrategy):
    """DDP for the dense layers; the sharded embedding tables checkpoint through ``torch.distributed.checkpoint``.

    The Lightning checkpoint file holds everything but the sharded collections' tables (and is written by rank 0,
    atomically with :class:`~lattice.train.AtomicCheckpointIO`); the tables go to the folder
    ``<file>.tables-<step>`` beside it, each rank writing its own shards, and the file records the folder's
    name and the plan under ``"sharded_tables"``. Loading reads the folder under the current plan, whatever
    plan and world size wrote it. Takes :class:`~lightning.pytorch.strategies.DDPStrategy`'s arguments.
    """

    strategy_name = "sharded_ddp"

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, *args, **kwargs)
        folder = tables_folder(checkpoint, checkpoint_path)
        if folder is not None:
            checkpoint["sharded_tables"] = dict(checkpoint["sharded_tables"], path=folder)
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        prefixes = self._sharded_prefixes()
        if not prefixes:
            return super().load_model_state_dict(checkpoint, strict)
        entry = checkpoint.get("sharded_tables")
        if entry is None:
            raise ValueError("this checkpoint has no sharded tables (it was written without model.sharding); "
                             "resume it without configs/sharded.yaml")
        result = module.load_state_dict(checkpoint["state_dict"], strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
        unexpected = [k for k in result.unexpected_keys if not k.startswith(prefixes)]
        if strict and (missing or unexpected):
            raise RuntimeError(f"loading the checkpoint: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
        load_sharded_tables(module, entry["path"])
