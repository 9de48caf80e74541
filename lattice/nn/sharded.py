"""``ShardedEmbeddingBagCollection``: embedding tables placed table-wise, row-wise, column-wise or replicated
across the ranks of a process group (TorchRec's model-parallel embeddings, over lattice's own pooling op).

Built from the same :class:`~lattice.nn.EmbeddingTableConfig` s as :class:`~lattice.nn.EmbeddingBagCollection`
plus a :class:`~lattice.nn.placement.ShardingPlan`; ``forward`` / ``forward_dict`` return the same
``[B, F, D]`` / ``{feature: [B, D_f]}`` for the rank's own batch. One lookup, for a rank with ``B`` samples:

1. **Input distribution.** Ids are checked against their tables first, with the single-process op's message,
   so a bad id never reaches a collective. The rank's bags are cut per destination rank and *slot* (a
   (table, feature) pair whose shard lives there): a table-wise (TW) or column-wise (CW) shard gets the
   feature's whole bags (CW: every CW rank gets them), a row-wise (RW) shard only the ids in its row range,
   shifted to shard-local rows. Three ``all_to_all_single`` calls carry them: a header of two numbers per
   destination (this rank's batch size ``B`` and how many ids it sends there), then every slot's ``B``
   lengths followed by the ids, in one int64 buffer, then the per-sample weights when the collection is
   weighted. The header is the lookup's one host sync; ranks may have different batch sizes.
2. **Pooling.** Each rank pools what it received with :func:`torch.ops.lattice.jagged_embedding_pool`, one
   call per local group of shards (same width and pooling), its "tables" being (source rank, slot) pairs, each
   padded locally with empty bags to the largest batch received (``B_max``). RW shards pool by sum (a mean is
   taken by the source over the whole bag).
3. **Output distribution.** The pooled ``[B_s, cols]`` pieces (``B_s``: the source's batch size) go back with
   one ``all_to_all_single``. The source concatenates CW slices along ``D`` and sums RW partial sums. That sum
   is the reduce-scatter of the RW partials, built from ``all_to_all_single`` + a local sum because gloo has no
   ``reduce_scatter``; it moves the same bytes as a direct reduce-scatter, and shares one collective with the
   TW/CW outputs.

The backward is the mirror image: the pooled gradient goes back to the shard owners through the reversed
all-to-all, is divided by ``gradient_divisor`` (default: the world size, the averaging DDP applies to dense
gradients) and the owners apply the fused optimizer (SGD or row-wise Adagrad) in place. No weight gradient
exists anywhere, and no rank allocates a sharded table or its optimizer state beyond its own shard.

**Row-wise Adagrad on a column-wise shard.** The state is one value per *row* of the whole table, shared by
the row's column slices: ``state[r] += sum_c g'[r, c]^2 / D`` over all ``D`` columns, which is the
single-process rule ``mean(g'^2)``. Each CW rank sums the squares over its own slice, the partial sums are
all-reduced over the table's CW ranks, and every slice then applies ``w[r, c] -= lr / (sqrt(state[r]) + eps)
* g'[r, c]`` to its columns. Every CW rank holds the same full ``[rows]`` state; a checkpoint stores it once.

Replicated tables live in an inner :class:`~lattice.nn.EmbeddingBagCollection` whose fused backward exchanges
row gradients across the group (:mod:`lattice.ops.row_exchange`), as under plain data parallelism.

Per-sample weights travel with the ids and weight the pooling; they get no gradient through a sharded table.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lattice.nn.embedding import (
    EmbeddingBagCollection,
    EmbeddingTableConfig,
    checked_tables,
    init_table_block,
    mixed_dims_error,
)
from lattice.nn.placement import ShardingPlan, TablePlacement
from lattice.ops._backend import use_reference
from lattice.ops.pooling import SUM, optimizer_mode, pooling_mode
from lattice.ops.reference import pooling as _ref
from lattice.sparse import KeyedJaggedTensor, _gather_rows, jagged_row_ids

__all__ = ["ShardedEmbeddingBagCollection", "check_feature_ids"]


@dataclass(frozen=True)
class _Slot:
    """One (table, feature) pair pooled by the shard of ``table`` on some rank."""

    table: str
    feature: str
    kind: str
    rows: int  # rows of the shard
    cols: int  # columns of the shard
    row_start: int  # first global row of the shard (RW)
    pooling: int  # pooling the shard applies (sum for RW)


class _LocalGroup:
    """Shards on one rank pooled by one op call: same width and pooling (a CW table with row-wise Adagrad is
    alone in its group, since its update all-reduces per-row sums over that table's CW ranks)."""

    def __init__(self, key: str, cols: int, pooling: int) -> None:
        self.key, self.cols, self.pooling = key, cols, pooling
        self.tables: List[str] = []
        self.table_start: Dict[str, int] = {}
        self.table_rows: Dict[str, int] = {}
        self.rows = 0
        self.slots: List[_Slot] = []

    def add_table(self, name: str, rows: int) -> None:
        self.tables.append(name)
        self.table_start[name] = self.rows
        self.table_rows[name] = rows
        self.rows += rows


def _layout(tables: Sequence[EmbeddingTableConfig], plan: ShardingPlan, rank: int,
            fused_optimizer: str) -> List[_LocalGroup]:
    """The local groups (and their slots, group-major) of the sharded tables held by ``rank``."""
    groups: Dict[str, _LocalGroup] = {}
    for t in tables:
        p = plan.tables[t.name]
        if p.kind == "replicated" or rank not in p.ranks:
            continue
        rows, cols = p.shard_shape(rank)
        row_start, _ = p.shard_offsets(rank)
        shard_pooling = SUM if p.kind == "row_wise" else pooling_mode(t.pooling)
        if p.kind == "column_wise" and fused_optimizer == "rowwise_adagrad":
            key = f"cw_{t.name}"
        else:
            key = f"d{cols}_p{shard_pooling}"
        if key not in groups:
            groups[key] = _LocalGroup(key, cols, shard_pooling)
        g = groups[key]
        g.add_table(t.name, rows)
        g.slots += [_Slot(t.name, f, p.kind, rows, cols, row_start, shard_pooling) for f in t.feature_names]
    return list(groups.values())


def _ebc_groups(tables: Sequence[EmbeddingTableConfig]) -> List[Tuple[List[str], List[int]]]:
    """The single-process collection's op calls: per (dim, pooling) group, its features (group order) and
    each feature's table rows, exactly as :class:`EmbeddingBagCollection` forms them."""
    groups: Dict[str, Tuple[List[str], List[int]]] = {}
    for t in tables:
        groups.setdefault(f"d{t.embedding_dim}_{t.pooling}", ([], []))
    for t in tables:
        feats, rows = groups[f"d{t.embedding_dim}_{t.pooling}"]
        for f in t.feature_names:
            feats.append(f)
            rows.append(t.num_embeddings)
    return list(groups.values())


def check_feature_ids(features: KeyedJaggedTensor, groups: List[Tuple[List[str], List[int]]]) -> None:
    """Raises the pooling op's own ``RuntimeError`` for the first id outside its table, numbering positions,
    tables and samples as the single-process :class:`EmbeddingBagCollection`'s op call would (``groups`` from
    its layout), so a sharded lookup fails as the replicated one does, before any collective."""
    index = features.index_per_key()
    B = features.stride()
    for feats, rows in groups:
        part = features.permute([index[f] for f in feats])
        values = part.values()
        if values.numel() == 0:
            continue
        lengths = part.lengths().long()
        bag = jagged_row_ids(lengths, values.numel())
        limit = torch.tensor(rows, dtype=torch.int64, device=values.device).repeat_interleave(B)[bag]
        bad = (values < 0) | (values >= limit)
        if not bool(bad.any()):
            continue
        j = int(bad.nonzero()[0, 0])
        v, b = int(values[j]), int(bag[j])
        t, sample = b // B, b % B
        if v < 0:
            raise RuntimeError(f"indices[{j}] = {v} is negative (table {t}, sample {sample})")
        raise RuntimeError(f"indices[{j}] = {v} is out of range for table {t} with {rows[t]} rows (sample {sample})")


def _impl():
    return _ref if use_reference() else torch.ops.lattice


def _all_to_all(send: Tensor, out_splits: List[int], in_splits: List[int], group) -> Tensor:
    """``all_to_all_single`` of the first dimension (a copy when the group is one rank)."""
    if group is None:
        return send.clone()
    out = send.new_empty((sum(out_splits),) + tuple(send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradient back along the reversed splits."""

    @staticmethod
    def forward(ctx, send, out_splits, in_splits, group):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        return _all_to_all(send, out_splits, in_splits, group)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


class _ShardPool(torch.autograd.Function):
    """Pools every local group and packs the pieces per source rank (the output all-to-all's send buffer);
    the backward applies the fused optimizer to the local shards, groups in a fixed order (so the CW row-sum
    all-reduces line up on every rank). The first input is a dummy that requires grad, as in
    :func:`lattice.ops.jagged_embedding_pool_fused`: the shards themselves never require grad."""

    @staticmethod
    def forward(ctx, dummy, owner, inputs, batch_sizes):
        pooled = owner._pool_local(inputs)
        ctx.owner, ctx.inputs, ctx.batch_sizes = owner, inputs, batch_sizes
        ctx.shapes = [p.shape for p in pooled]
        return owner._pack_by_source(pooled, batch_sizes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ctx.owner._apply_fused(ctx.owner._unpack_by_source(grad, ctx.shapes, ctx.batch_sizes), ctx.inputs)
        ctx.owner = ctx.inputs = None
        return None, None, None, None


class ShardedEmbeddingBagCollection(nn.Module):
    """Pooled embeddings ``[B, F, D]`` of the F features of ``tables``, placed across ranks by ``plan``.

    Args:
        tables: the tables (as for :class:`EmbeddingBagCollection`; feature order is theirs).
        plan: a placement for every table; its ``world_size`` must be the group's size.
        process_group: the group the shards live in (``None``: one process, every placement on rank 0).
        fused_optimizer: ``"rowwise_adagrad"`` or ``"sgd"``, applied by each shard's owner in the backward.
        lr, eps, weight_decay: the fused optimizer's hyper-parameters (as for :class:`EmbeddingBagCollection`).
        dtype: weight storage dtype.
        is_weighted: pool with the KeyedJaggedTensor's weights (sum pooling only).
        device: where to allocate the shards.
        gradient_divisor: the pooled gradients are divided by it before the update (default: the group size,
            matching DDP's averaging of dense gradients).
        init_seed: seed of the tables' initialization (:func:`lattice.nn.embedding.init_table_block`): a table
            gets the same initial values under any plan and world size, the values an
            :class:`EmbeddingBagCollection` with this ``init_seed`` starts from.

    ``forward(kjt)`` takes this rank's :class:`~lattice.sparse.KeyedJaggedTensor` (every rank must call it,
    with any batch size, the same number of times) and returns ``[B, F, D]`` in :attr:`feature_names` order
    when every table has one dim; :meth:`forward_dict` returns ``{feature: [B, D_f]}``.
    """

    is_sharded = True

    def __init__(
        self,
        tables: Sequence[EmbeddingTableConfig],
        plan: ShardingPlan,
        process_group: Optional[dist.ProcessGroup] = None,
        fused_optimizer: str = "rowwise_adagrad",
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dtype: torch.dtype = torch.float32,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        gradient_divisor: Optional[float] = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        tables = checked_tables(tables, "ShardedEmbeddingBagCollection")
        if fused_optimizer not in ("sgd", "rowwise_adagrad"):
            raise ValueError(f"ShardedEmbeddingBagCollection: fused_optimizer must be 'sgd' or 'rowwise_adagrad', "
                             f"got {fused_optimizer!r} (sharded tables never have a weight gradient)")
        if is_weighted and any(t.pooling != "sum" for t in tables):
            raise ValueError("ShardedEmbeddingBagCollection: is_weighted needs sum pooling in every table")
        self.group = process_group
        self.world_size = 1 if process_group is None else dist.get_world_size(process_group)
        self.rank = 0 if process_group is None else dist.get_rank(process_group)
        if plan.world_size != self.world_size:
            raise ValueError(f"the sharding plan is for world_size {plan.world_size}, but the process group has "
                             f"{self.world_size} ranks")
        for t in tables:
            p = plan.tables.get(t.name)
            if p is None:
                raise ValueError(f"the sharding plan has no placement for table {t.name!r} (it places "
                                 f"{sorted(plan.tables)})")
            if (p.num_embeddings, p.embedding_dim) != (t.num_embeddings, t.embedding_dim):
                raise ValueError(f"table {t.name!r} is {t.num_embeddings}x{t.embedding_dim}, but its placement is "
                                 f"for {p.num_embeddings}x{p.embedding_dim}")
        self.tables = tables
        self.plan = ShardingPlan(plan.world_size, {t.name: plan.tables[t.name] for t in tables})
        self.fused_optimizer = fused_optimizer
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.dtype = dtype
        self.is_weighted = is_weighted
        self.gradient_divisor = float(gradient_divisor) if gradient_divisor is not None else float(self.world_size)
        self.init_seed = int(init_seed)
        self._table = {t.name: t for t in tables}
        self.feature_names = [f for t in tables for f in t.feature_names]
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError(f"ShardedEmbeddingBagCollection: a feature is served by two tables in {self.feature_names}")
        self._table_of_feature = {f: t for t in tables for f in t.feature_names}
        self.embedding_dims = [self._table_of_feature[f].embedding_dim for f in self.feature_names]
        self._uniform_dim = len(set(self.embedding_dims)) == 1
        self._id_groups = _ebc_groups(tables)

        replicated = [t for t in tables if self.plan.tables[t.name].kind == "replicated"]
        self.sharded_tables = [t for t in tables if self.plan.tables[t.name].kind != "replicated"]
        self.replicated: Optional[EmbeddingBagCollection] = None
        if replicated:
            self.replicated = EmbeddingBagCollection(replicated, fused_optimizer=fused_optimizer, lr=lr, eps=eps,
                                                     weight_decay=weight_decay, dtype=dtype, is_weighted=is_weighted,
                                                     device=device, init_seed=self.init_seed)
            if self.world_size > 1:
                self.replicated.set_process_group(process_group, self.gradient_divisor)

        # Every rank's slots (group-major), so each side knows the other's layout; this rank's groups hold storage.
        self._layouts = [_layout(self.sharded_tables, self.plan, r, fused_optimizer) for r in range(self.world_size)]
        self._slots = [[s for g in groups for s in g.slots] for groups in self._layouts]
        self._groups = self._layouts[self.rank]
        self.shard_weights = nn.ParameterDict()
        self.shard_state = nn.Module()
        W = self.world_size
        for g in self._groups:
            w = torch.empty(g.rows, g.cols, dtype=dtype, device=device)
            self.shard_weights[g.key] = nn.Parameter(w, requires_grad=False)
            state = torch.zeros(g.rows if fused_optimizer == "rowwise_adagrad" else 0, device=device)
            self.shard_state.register_buffer(g.key, state)
            ranges = [(g.table_start[s.table], g.table_start[s.table] + s.rows) for s in g.slots] * W
            self.register_buffer(f"_tro_{g.key}", torch.tensor(ranges, dtype=torch.int64, device=device),
                                 persistent=False)
        self._cw_groups: Dict[str, Optional[dist.ProcessGroup]] = {}
        if fused_optimizer == "rowwise_adagrad":
            # new_group is collective over the whole group: every rank creates every CW table's group, in order.
            for t in self.sharded_tables:
                p = self.plan.tables[t.name]
                if p.kind == "column_wise":
                    group = None
                    if self.world_size > 1 and len(p.ranks) > 1:
                        global_ranks = [dist.get_global_rank(process_group, r) for r in p.ranks]
                        group = dist.new_group(ranks=global_ranks)
                    self._cw_groups[t.name] = group
        self.reset_parameters()

    # ---- parameters and state ----------------------------------------------------------------
    def _local(self, table: str) -> Tuple[_LocalGroup, int, int]:
        for g in self._groups:
            if table in g.table_start:
                return g, g.table_start[table], g.table_rows[table]
        raise KeyError(f"rank {self.rank} holds no shard of table {table!r}")

    def local_tables(self) -> List[str]:
        """Names of the sharded tables of which this rank holds a shard."""
        return [name for g in self._groups for name in g.tables]

    def shard_weight(self, table: str) -> Tensor:
        """This rank's ``[rows, cols]`` shard of ``table`` (a view into its group's packed weights)."""
        g, start, rows = self._local(table)
        return self.shard_weights[g.key][start : start + rows]

    def shard_optimizer_state(self, table: str) -> Tensor:
        """This rank's ``[rows]`` row-wise Adagrad state of ``table`` (every row of a CW shard; empty for SGD)."""
        g, start, rows = self._local(table)
        state = getattr(self.shard_state, g.key)
        return state if state.numel() == 0 else state[start : start + rows]

    def placement(self, table: str) -> TablePlacement:
        return self.plan.tables[table]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize every local shard and replica from its table's ``init`` and :attr:`init_seed` (drawing only
        the seeded chunks of rows a shard overlaps: the same values under any plan), and zero the optimizer
        state."""
        for t in self.sharded_tables:
            p = self.plan.tables[t.name]
            if p.holds(self.rank):
                r0, c0 = p.shard_offsets(self.rank)
                init_table_block(self.shard_weight(t.name), t, self.init_seed, r0, c0)
        for g in self._groups:
            getattr(self.shard_state, g.key).zero_()
        if self.replicated is not None:
            self.replicated.reset_parameters()

    @torch.no_grad()
    def load_full_tables(self, weights: Dict[str, Tensor], states: Optional[Dict[str, Tensor]] = None) -> None:
        """Copy this rank's part of whole tables (``weights[table] [rows, D]``, ``states[table] [rows]``) into its
        shards and replicas, e.g. from an :class:`EmbeddingBagCollection` built before the process group."""
        for t in self.tables:
            p = self.plan.tables[t.name]
            if p.kind == "replicated":
                self.replicated.embedding_weight(t.name).copy_(weights[t.name])
                if states is not None and self.fused_optimizer == "rowwise_adagrad":
                    self.replicated.optimizer_state_of(t.name).copy_(states[t.name])
                continue
            if not p.holds(self.rank):
                continue
            (r0, c0), (rows, cols) = p.shard_offsets(self.rank), p.shard_shape(self.rank)
            self.shard_weight(t.name).copy_(weights[t.name][r0 : r0 + rows, c0 : c0 + cols])
            if states is not None and self.fused_optimizer == "rowwise_adagrad":
                self.shard_optimizer_state(t.name).copy_(states[t.name][r0 : r0 + rows])

    @classmethod
    def from_collection(cls, collection: EmbeddingBagCollection, plan: ShardingPlan,
                        process_group: Optional[dist.ProcessGroup] = None, **kwargs) -> "ShardedEmbeddingBagCollection":
        """A sharded copy of ``collection`` (its tables, fused optimizer, hyper-parameters, dtype, weights and
        optimizer state: each rank copies only its part). A collection built inside
        :func:`~lattice.nn.embedding.deferred_tables` (on the meta device) has no values to copy: each rank
        allocates and draws only its own shards, from the collection's ``init_seed``, on the CPU (or
        ``device=``), getting the values the full tables would have started from."""
        dtype = next(iter(collection.weights.values())).dtype
        device = next(iter(collection.weights.values())).device
        deferred = device.type == "meta"
        kwargs.setdefault("init_seed", collection.init_seed)
        kwargs.setdefault("device", None if deferred else device)
        out = cls(collection.tables, plan, process_group, fused_optimizer=collection.fused_optimizer,
                  lr=collection.lr, eps=collection.eps, weight_decay=collection.weight_decay, dtype=dtype,
                  is_weighted=collection.is_weighted, **kwargs)
        if deferred:
            return out
        weights = {t.name: collection.embedding_weight(t.name) for t in collection.tables}
        states = None
        if collection.fused_optimizer == "rowwise_adagrad":
            states = {t.name: collection.optimizer_state_of(t.name) for t in collection.tables}
        out.load_full_tables(weights, states)
        return out

    def set_fused_optimizer(self, fused_optimizer: Optional[str], lr: Optional[float] = None,
                            eps: Optional[float] = None, weight_decay: Optional[float] = None) -> None:
        """Change the fused optimizer's hyper-parameters. The optimizer itself is fixed at construction (its
        state is allocated per shard); asking for another one is an error."""
        if fused_optimizer != self.fused_optimizer:
            raise ValueError(f"ShardedEmbeddingBagCollection was built with fused_optimizer "
                             f"{self.fused_optimizer!r}; it cannot switch to {fused_optimizer!r}")
        if lr is not None:
            self.lr = float(lr)
        if eps is not None:
            self.eps = float(eps)
        if weight_decay is not None:
            self.weight_decay = float(weight_decay)
        if self.replicated is not None:
            self.replicated.set_fused_optimizer(fused_optimizer, lr, eps, weight_decay)

    def set_process_group(self, process_group, gradient_divisor: Optional[float] = None) -> None:
        """The shards are bound to the group they were built over; this only changes the gradient divisor (a
        data-parallel wrapper calling it with that same group, as for a replicated collection, is fine)."""
        if process_group is not self.group:
            raise ValueError("ShardedEmbeddingBagCollection is bound to the process group it was built over; build "
                             "another one for another group")
        if gradient_divisor is not None:
            self.gradient_divisor = float(gradient_divisor)
        if self.replicated is not None and self.world_size > 1:
            self.replicated.set_process_group(process_group, self.gradient_divisor)

    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        if self.replicated is not None:
            self.replicated.set_learning_rate(lr)

    def fused_state_names(self, prefix: str = "") -> List[str]:
        """Names of the local shards, their optimizer state and their row-range buffers, for DDP to leave alone:
        they differ from rank to rank, so DDP must neither check their shapes nor broadcast rank 0's (the
        replicated tables' inner collection reports its own)."""
        names = [f"{prefix}shard_weights.{g.key}" for g in self._groups]
        names += [f"{prefix}_tro_{g.key}" for g in self._groups]
        return names + [f"{prefix}shard_state.{g.key}" for g in self._groups]

    def storage_bytes(self) -> int:
        """Bytes of table weights and fused optimizer state this rank stores (shards and replicas)."""
        tensors = [*self.shard_weights.values(), *self.shard_state.buffers()]
        if self.replicated is not None:
            tensors += [*self.replicated.weights.values(), *self.replicated.optimizer_state.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def checkpoint_state(self, prefix: str = "", for_loading: bool = False) -> Dict[str, object]:
        """This rank's tables and row-wise Adagrad state for ``torch.distributed.checkpoint``, in the plan-independent
        layout: ``<prefix><table>.weight [rows, D]`` and ``<prefix><table>.momentum [rows]`` (row-wise Adagrad),
        the same keys and global shapes whatever the plan, a replicated table included. A shard that is not the
        whole tensor is a ``ShardedTensor`` holding this rank's piece at its global offsets, so a checkpoint
        saved under one plan or world size loads under another. A CW table's state is saved from its first CW
        rank only and loaded, whole, by every CW rank (``for_loading``). Ranks without a part of a table leave it
        out. The tensors are the live storage: loading writes into the shards in place."""
        out: Dict[str, object] = {}
        adagrad = self.fused_optimizer == "rowwise_adagrad"
        for t in self.tables:
            p = self.plan.tables[t.name]
            key = f"{prefix}{t.name}"
            if p.kind == "replicated":
                out[f"{key}.weight"] = self.replicated.embedding_weight(t.name)
                if adagrad:
                    out[f"{key}.momentum"] = self.replicated.optimizer_state_of(t.name)
                continue
            if not p.holds(self.rank):
                continue
            out[f"{key}.weight"] = self._global_view(self.shard_weight(t.name), p, (t.num_embeddings, t.embedding_dim),
                                                     lambda r: (p.shard_offsets(r), p.shard_shape(r)))
            if not adagrad:
                continue
            state = self.shard_optimizer_state(t.name)
            if p.kind == "column_wise":
                if for_loading or self.rank == p.ranks[0]:
                    out[f"{key}.momentum"] = state
                continue
            out[f"{key}.momentum"] = self._global_view(state, p, (t.num_embeddings,),
                                                       lambda r: ((p.shard_offsets(r)[0],), (p.shard_shape(r)[0],)))
        return out

    def _global_view(self, local: Tensor, p: TablePlacement, size: Tuple[int, ...], geometry):
        """``local`` itself when it is the whole tensor, else a ShardedTensor over every rank's piece of it."""
        if tuple(local.shape) == tuple(size):
            return local
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
        from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

        device = local.device.type

        def meta(r: int) -> ShardMetadata:
            offsets, sizes = geometry(r)
            return ShardMetadata(list(offsets)[: len(size)], list(sizes)[: len(size)],
                                 f"rank:{dist.get_global_rank(self.group, r)}/{device}")

        shards = [meta(r) for r in p.ranks]
        properties = TensorProperties(dtype=local.dtype, layout=local.layout, requires_grad=False,
                                      memory_format=torch.contiguous_format, pin_memory=False)
        global_meta = ShardedTensorMetadata(shards, torch.Size(size), properties)
        with warnings.catch_warnings():  # DCP reshards ShardedTensors of any chunk layout; DTensor splits evenly only
            warnings.filterwarnings("ignore", message=".*deprecating ShardedTensor.*", category=FutureWarning)
            return ShardedTensor._init_from_local_shards_and_global_metadata(
                [Shard(local, meta(self.rank))], global_meta, process_group=self.group)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        """``[B, F, D]`` pooled embeddings in :attr:`feature_names` order (all tables of one dim)."""
        if not self._uniform_dim:
            raise mixed_dims_error("ShardedEmbeddingBagCollection", self.embedding_dims)
        out = self.forward_dict(features)
        return torch.stack([out[f] for f in self.feature_names], dim=1)

    def forward_dict(self, features: KeyedJaggedTensor) -> Dict[str, Tensor]:
        """``{feature: [B, D_f]}`` for every feature, any mix of dims."""
        index = features.index_per_key()
        missing = [f for f in self.feature_names if f not in index]
        if missing:
            raise KeyError(f"ShardedEmbeddingBagCollection: the KeyedJaggedTensor lacks features {missing} "
                           f"(it has {features.keys()})")
        check_feature_ids(features, self._id_groups)
        out: Dict[str, Tensor] = {}
        if self.replicated is not None:
            out.update(self.replicated.forward_dict(features))
        if self.sharded_tables:
            out.update(self._sharded_lookup(features))
        return {f: out[f] for f in self.feature_names}

    def _send_bags(self, features: KeyedJaggedTensor, B: int):
        """Per destination rank: its slots' lengths (``B`` per slot) and ids in one int64 tensor, the weights
        (``None`` unless weighted) and the number of ids."""
        device = features.values().device
        sharded = {t.name for t in self.sharded_tables}
        jts = {f: features[f] for f in self.feature_names if self._table_of_feature[f].name in sharded}
        ids, weights, counts = [], [], []
        for d in range(self.world_size):
            lengths, values, w_d = [], [], []
            for s in self._slots[d]:
                jt = jts[s.feature]
                v, L = jt.values().long(), jt.lengths().long()
                w = jt.weights_or_none() if self.is_weighted else None
                if s.kind == "row_wise":
                    keep = (v >= s.row_start) & (v < s.row_start + s.rows)
                    bag = jagged_row_ids(L, v.numel())
                    L = torch.zeros(B, dtype=torch.int64, device=device).index_add_(0, bag, keep.long())
                    v = v[keep] - s.row_start
                    w = None if w is None else w[keep]
                lengths.append(L)
                values.append(v)
                if self.is_weighted:
                    w_d.append(w.float() if w is not None else torch.ones(v.numel(), device=device))
            counts.append(sum(v.numel() for v in values))
            ids.append(torch.cat(lengths + values) if lengths else torch.zeros(0, dtype=torch.int64, device=device))
            weights.append(torch.cat(w_d) if w_d else torch.zeros(0, device=device))
        return ids, (weights if self.is_weighted else None), counts

    def _sharded_lookup(self, features: KeyedJaggedTensor) -> Dict[str, Tensor]:
        B = features.stride()
        W, me = self.world_size, self.rank
        device = features.values().device
        send_ids, send_weights, counts = self._send_bags(features, B)
        header = torch.tensor([[B, c] for c in counts], dtype=torch.int64, device=device)
        sizes = _all_to_all(header, [1] * W, [1] * W, self.group).tolist()  # (B_s, ids) from every source s
        batch_sizes = [b for b, _ in sizes]
        n_me = len(self._slots[me])
        recv_ids = _all_to_all(torch.cat(send_ids), [n_me * b + c for b, c in sizes],
                               [t.numel() for t in send_ids], self.group)
        recv_weights = None
        if send_weights is not None:
            recv_weights = _all_to_all(torch.cat(send_weights), [c for _, c in sizes], counts, self.group)
        B_max = max(batch_sizes)
        recv_lengths, recv_values = self._received_bags(recv_ids, sizes, n_me, B_max)
        inputs = self._group_inputs(recv_lengths, recv_values, recv_weights, B_max)

        if torch.is_grad_enabled() and self.training:
            dummy = torch.empty(0, device=device, requires_grad=True)
            send_pooled = _ShardPool.apply(dummy, self, inputs, batch_sizes)
        else:
            send_pooled = self._pack_by_source(self._pool_local(inputs), batch_sizes)
        piece_counts = [B * sum(s.cols for s in self._slots[d]) for d in range(W)]
        send_splits = [b * sum(s.cols for s in self._slots[me]) for b in batch_sizes]
        if send_pooled.requires_grad:
            received = _AllToAll.apply(send_pooled, piece_counts, send_splits, self.group)
        else:
            received = _all_to_all(send_pooled, piece_counts, send_splits, self.group)
        return self._assemble(received, features, B)

    @staticmethod
    def _received_bags(recv: Tensor, sizes: List[List[int]], n_slots: int, B_max: int) -> Tuple[Tensor, Tensor]:
        """``(lengths [W * n_slots * B_max], ids)`` from the received ``[lengths, ids]`` of every source, each
        source's slots padded with empty bags to ``B_max`` (ids are unchanged: a padded bag holds none)."""
        parts = recv.split([n_slots * b + c for b, c in sizes])
        if all(b == B_max for b, _ in sizes):
            lengths = [p[: n_slots * b] for p, (b, _) in zip(parts, sizes)]
        else:
            lengths = [torch.nn.functional.pad(p[: n_slots * b].view(n_slots, b), (0, B_max - b)).reshape(-1)
                       for p, (b, _) in zip(parts, sizes)]
        values = [p[n_slots * b :] for p, (b, _) in zip(parts, sizes)]
        return torch.cat(lengths), torch.cat(values)

    def _group_inputs(self, lengths: Tensor, values: Tensor, weights: Optional[Tensor], B_max: int):
        """Per local group: ``(indices, offsets, per_sample_weights)`` of its ``W * n_g`` op tables, ordered
        (source rank, slot): the received ``[source][slot][bag]`` layout regrouped when there are several groups."""
        W, n_me = self.world_size, len(self._slots[self.rank])
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
        if len(self._groups) == 1:
            return [(values, offsets, weights)]
        out, first = [], 0
        for g in self._groups:
            n_g = len(g.slots)
            table_rows = torch.tensor([s * n_me + first + j for s in range(W) for j in range(n_g)],
                                      dtype=torch.int64, device=lengths.device)
            rows = (table_rows[:, None] * B_max + torch.arange(B_max, device=lengths.device)).reshape(-1)
            v, w, L = _gather_rows(values, weights, offsets, lengths, rows)
            out.append((v, torch.cat([L.new_zeros(1), torch.cumsum(L, 0)]), w))
            first += n_g
        return out

    def _pool_local(self, inputs) -> List[Tensor]:
        """``[B_max, W * n_g, cols]`` per local group, op tables ordered (source rank, slot)."""
        impl = _impl()
        return [impl.jagged_embedding_pool(self.shard_weights[g.key], getattr(self, f"_tro_{g.key}"), v, o,
                                           g.pooling, w)
                for g, (v, o, w) in zip(self._groups, inputs)]

    def _pack_by_source(self, pooled: List[Tensor], batch_sizes: List[int]) -> Tensor:
        """The output all-to-all's send buffer: per source rank ``s``, per group, ``[n_g, B_s, cols]`` flattened
        (the source's own bags, not the padding)."""
        parts = []
        for s in range(self.world_size):
            for g, out in zip(self._groups, pooled):
                n_g = len(g.slots)
                parts.append(out[: batch_sizes[s], s * n_g : (s + 1) * n_g].transpose(0, 1).reshape(-1))
        if not parts:
            return torch.zeros(0, dtype=self.dtype, device=self.shard_weights_device())
        return torch.cat(parts)

    def _unpack_by_source(self, flat: Tensor, shapes, batch_sizes: List[int]) -> List[Tensor]:
        """The pooled gradients ``[B_max, W * n_g, cols]`` per group from :meth:`_pack_by_source`'s layout (padded
        bags get zeros)."""
        B_max = max(batch_sizes)
        grads = [flat.new_zeros(shape) if B_max and min(batch_sizes) < B_max else flat.new_empty(shape)
                 for shape in shapes]
        pos = 0
        for s, b in enumerate(batch_sizes):
            for g, grad in zip(self._groups, grads):
                n_g = len(g.slots)
                cols = grad.shape[2]
                size = n_g * b * cols
                grad[:b, s * n_g : (s + 1) * n_g] = flat[pos : pos + size].view(n_g, b, cols).transpose(0, 1)
                pos += size
        return grads

    def shard_weights_device(self) -> torch.device:
        for w in self.shard_weights.values():
            return w.device
        return torch.device("cpu")

    @torch.no_grad()
    def _apply_fused(self, grads: List[Tensor], inputs) -> None:
        """The owners' update: the pooled gradients (all sources) divided by the divisor, then SGD or row-wise
        Adagrad on the touched rows of each local group (CW + Adagrad: per-row sums of squares all-reduced)."""
        impl = _impl()
        opt = optimizer_mode(self.fused_optimizer)
        for g, grad, (v, o, w) in zip(self._groups, grads, inputs):
            grad = grad / self.gradient_divisor if self.gradient_divisor != 1.0 else grad
            weight, state, tro = self.shard_weights[g.key], getattr(self.shard_state, g.key), getattr(self, f"_tro_{g.key}")
            if not g.key.startswith("cw_"):
                impl.jagged_embedding_pool_backward_fused_(weight, state, grad.contiguous(), tro, v, o, g.pooling, w,
                                                           opt, self.lr, self.eps, self.weight_decay)
                continue
            table = self._table[g.tables[0]]
            rows, row_grads = impl.jagged_embedding_pool_backward_sparse(grad.contiguous(), tro, v, o, g.pooling, w)
            acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
            current = weight.index_select(0, rows).to(acc)
            step = row_grads.to(acc) + self.weight_decay * current
            squares = (step * step).sum(1).to(state.dtype)
            group = self._cw_groups.get(table.name)
            if group is not None:
                dist.all_reduce(squares, group=group)
            new_state = state.index_select(0, rows) + squares / table.embedding_dim
            state.index_copy_(0, rows, new_state)
            update = current - (self.lr / (new_state.to(acc).sqrt() + self.eps)).unsqueeze(1) * step
            weight.index_copy_(0, rows, update.to(weight.dtype))

    def _assemble(self, received: Tensor, features: KeyedJaggedTensor, B: int) -> Dict[str, Tensor]:
        pieces: Dict[Tuple[int, str], Tensor] = {}
        pos = 0
        for d in range(self.world_size):
            for s in self._slots[d]:
                size = B * s.cols
                pieces[(d, s.feature)] = received[pos : pos + size].view(B, s.cols)
                pos += size
        out: Dict[str, Tensor] = {}
        for t in self.sharded_tables:
            p = self.plan.tables[t.name]
            for f in t.feature_names:
                parts = [pieces[(r, f)] for r in p.ranks]
                if p.kind == "column_wise":
                    out[f] = torch.cat(parts, dim=1)
                elif p.kind == "row_wise":
                    pooled = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
                    if t.pooling == "mean":
                        lengths = features[f].lengths().to(pooled.dtype).clamp(min=1)
                        pooled = pooled / lengths.unsqueeze(1)
                    out[f] = pooled
                else:
                    out[f] = parts[0]
        return out

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{t.name}: {self.plan.tables[t.name].kind}{self.plan.tables[t.name].ranks or ''}"
                          for t in self.tables)
        return f"rank={self.rank}/{self.world_size}, tables=[{kinds}], fused_optimizer={self.fused_optimizer!r}"
