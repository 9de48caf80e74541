"""``EmbeddingBagCollection``: pooled embeddings of many sparse features in one fused op call per group.

Tables of the same embedding dim and pooling are packed back to back in one weight tensor
``[rows, D]`` and pooled by one :func:`lattice.ops.jagged_embedding_pool` call; tables of other dims
(or pooling) form other groups. The op's table axis is per *feature*: a feature names the row range
of its table, so several features may share one table (and its rows).

With ``fused_optimizer="sgd"`` or ``"rowwise_adagrad"`` the backward updates the weights in place
(FBGEMM-style: no weight gradient ever exists; the weights are parameters that do not require grad,
so the model's dense optimizer leaves them alone). With ``fused_optimizer=None`` the weights get
sparse COO gradients through autograd, for ``torch.optim.SGD`` / ``SparseAdam`` / ``Adagrad``.
The fused optimizer's state is a buffer, so ``state_dict`` carries it and a checkpoint resumes exactly.

Initial values come from the tables' ``init`` in seeded chunks of whole rows (:func:`init_table_block`), from
one seed per collection (``init_seed``, drawn from the global generator by default): any block of a table, such
as a shard of it on another rank, can be drawn alone and gets the values the whole table would. Inside
:func:`deferred_tables` a collection keeps its tables on the meta device, for a
:class:`~lattice.nn.sharded.ShardedEmbeddingBagCollection` to draw only its own shards.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lattice.ops._memory import empty_huge_pages
from lattice.ops.pooling import (
    jagged_embedding_pool,
    jagged_embedding_pool_fused,
    optimizer_mode,
    pooling_mode,
)
from lattice.sparse import KeyedJaggedTensor

__all__ = ["UniformInit", "NormalInit", "EmbeddingTableConfig", "EmbeddingBagCollection", "deferred_tables",
           "init_table_block"]

INIT_CHUNK_ROWS = 4096  # rows drawn per seeded chunk: a table's initial values do not depend on how it is split
_DEFERRED = contextvars.ContextVar("lattice_deferred_tables", default=False)


@dataclass
class UniformInit:
    """Uniform in ``[-bound, bound]``; ``bound=None`` means ``sqrt(1 / num_embeddings)`` (TorchRec's)."""

    bound: Optional[float] = None

    def __call__(self, weight: Tensor, num_embeddings: int) -> None:
        bound = self.bound if self.bound is not None else math.sqrt(1.0 / max(num_embeddings, 1))
        nn.init.uniform_(weight, -bound, bound)


@dataclass
class NormalInit:
    """Normal with mean ``mean`` and standard deviation ``std``."""

    std: float = 0.01
    mean: float = 0.0

    def __call__(self, weight: Tensor, num_embeddings: int) -> None:
        nn.init.normal_(weight, self.mean, self.std)


@dataclass
class EmbeddingTableConfig:
    """One embedding table.

    Args:
        name: table name (unique in a collection).
        num_embeddings: rows; feature ids must lie in ``[0, num_embeddings)``.
        embedding_dim: ``D``.
        feature_names: the sparse features looked up in this table (default: ``[name]``); several
            features may share one table.
        pooling: ``"sum"`` or ``"mean"`` over a bag.
        init: :class:`UniformInit` or :class:`NormalInit`.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: List[str] = field(default_factory=list)
    pooling: str = "sum"
    init: Union[UniformInit, NormalInit] = field(default_factory=UniformInit)

    def __post_init__(self) -> None:
        if not self.feature_names:
            self.feature_names = [self.name]
        self.feature_names = list(self.feature_names)
        if self.num_embeddings <= 0:
            raise ValueError(f"table {self.name!r}: num_embeddings must be > 0, got {self.num_embeddings}")
        if self.embedding_dim <= 0:
            raise ValueError(f"table {self.name!r}: embedding_dim must be > 0, got {self.embedding_dim}")
        pooling_mode(self.pooling)  # validates


@contextlib.contextmanager
def deferred_tables() -> Iterator[None]:
    """Inside, every :class:`EmbeddingBagCollection` built puts its tables and optimizer state on the meta device
    (whatever its ``device``): their geometry and init seed, none of their memory. It still draws its
    ``init_seed``, so the global generator, and every layer built after it, is where a real build leaves them.
    :meth:`lattice.nn.sharded.ShardedEmbeddingBagCollection.from_collection` turns such a collection into
    shards whose values are those the full tables would have had."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def draw_init_seed() -> int:
    """A collection's ``init_seed`` from the global CPU generator (one draw, whatever the tables' size). Drawn
    outside any active fake-tensor mode (a build under ``FakeTensorMode``, as export and planners do), where a
    fake draw has no value to read."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return int(torch.randint(0, 2**62, (1,), device="cpu"))


def _chunk_seed(init_seed: int, table: str, chunk: int) -> int:
    return (init_seed * 1_000_003 + zlib.crc32(table.encode()) * 7919 + chunk) % (2**63)


@torch.no_grad()
def init_table_block(out: Tensor, table: EmbeddingTableConfig, init_seed: int, row_start: int = 0,
                     col_start: int = 0) -> None:
    """Writes into ``out [rows, cols]`` the initial values of rows ``[row_start, row_start + rows)`` and columns
    ``[col_start, col_start + cols)`` of ``table``: whole rows are drawn by ``table.init`` on the CPU in chunks of
    4096 rows, each seeded from ``(init_seed, table.name, chunk)``, and only the chunks the block overlaps are
    drawn. A block (a row- or column-wise shard) thus gets the values of the whole table, and the global
    generator is left as it was."""
    rows, cols = out.shape
    if rows == 0 or cols == 0:
        return
    first, last = row_start // INIT_CHUNK_ROWS, (row_start + rows - 1) // INIT_CHUNK_ROWS
    with torch.random.fork_rng(devices=[]):
        for c in range(first, last + 1):
            lo, hi = c * INIT_CHUNK_ROWS, min((c + 1) * INIT_CHUNK_ROWS, table.num_embeddings)
            torch.manual_seed(_chunk_seed(init_seed, table.name, c))
            chunk = torch.empty(hi - lo, table.embedding_dim, device="cpu")
            table.init(chunk, table.num_embeddings)
            a, b = max(lo, row_start), min(hi, row_start + rows)
            out[a - row_start : b - row_start].copy_(chunk[a - lo : b - lo, col_start : col_start + cols])


class _Group:
    """Tables of one (dim, pooling) packed in one weight tensor, and the features pooled from them."""

    def __init__(self, key: str, dim: int, pooling: str):
        self.key = key
        self.dim = dim
        self.pooling = pooling
        self.tables: List[EmbeddingTableConfig] = []
        self.table_start: Dict[str, int] = {}
        self.rows = 0
        self.features: List[str] = []  # in module feature order

    def add_table(self, cfg: EmbeddingTableConfig) -> None:
        self.tables.append(cfg)
        self.table_start[cfg.name] = self.rows
        self.rows += cfg.num_embeddings


def mixed_dims_error(owner: str, dims: Sequence[int]) -> ValueError:
    """The error of ``forward`` (which stacks ``[B, F, D]``) on a collection whose tables differ in dim."""
    return ValueError(f"{owner}.forward returns [B, F, D] and needs one embedding dim; tables have dims "
                      f"{sorted(set(dims))}: use forward_dict()")


def checked_tables(tables: Sequence[EmbeddingTableConfig], owner: str) -> List[EmbeddingTableConfig]:
    """``tables`` as a list, refused (naming ``owner``) when empty or when two tables share a name."""
    tables = list(tables)
    if not tables:
        raise ValueError(f"{owner} needs at least one table")
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}: duplicate table names in {names}")
    return tables


class EmbeddingBagCollection(nn.Module):
    """Pooled embeddings ``[B, F, D]`` of the F features served by ``tables``.

    Args:
        tables: the tables; feature order is the tables' ``feature_names`` in order.
        fused_optimizer: ``None`` (sparse gradients via autograd), ``"sgd"`` or ``"rowwise_adagrad"``
            (in-place update inside backward).
        lr, eps, weight_decay: the fused optimizer's hyper-parameters (``weight_decay`` is L2:
            added to the gradient, FBGEMM's mode 1). ``lr`` may be changed later with
            :meth:`set_learning_rate`.
        dtype: weight storage dtype (float32, bfloat16 or float16; pooling accumulates in fp32).
        is_weighted: pass the KeyedJaggedTensor's weights as per-sample weights (sum pooling only).
        device: where to allocate the weights (the meta device inside :func:`deferred_tables`).
        init_seed: seed of the tables' initial values (:func:`init_table_block`); default: drawn from the
            global generator, so ``torch.manual_seed`` before the build fixes it.

    ``forward(kjt)`` takes a :class:`~lattice.sparse.KeyedJaggedTensor` holding (at least) the
    module's features, in any key order, and returns ``[B, F, D]`` in :attr:`feature_names` order when
    every table has the same dim; :meth:`forward_dict` returns ``{feature: [B, D_f]}`` for any dims.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingTableConfig],
        fused_optimizer: Optional[str] = None,
        lr: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dtype: torch.dtype = torch.float32,
        is_weighted: bool = False,
        device: Optional[Union[str, torch.device]] = None,
        init_seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        tables = checked_tables(tables, "EmbeddingBagCollection")
        if _DEFERRED.get():
            device = torch.device("meta")
        if fused_optimizer is not None:
            optimizer_mode(fused_optimizer)  # validates
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"EmbeddingBagCollection: dtype must be float32, bfloat16 or float16, got {dtype}")
        if is_weighted and any(t.pooling != "sum" for t in tables):
            raise ValueError("EmbeddingBagCollection: is_weighted needs sum pooling in every table")
        self.tables = tables
        self.fused_optimizer = fused_optimizer
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.is_weighted = is_weighted
        self.init_seed = draw_init_seed() if init_seed is None else int(init_seed)
        self.process_group = None
        self.gradient_divisor: Optional[float] = None
        self._table_of_feature: Dict[str, EmbeddingTableConfig] = {}
        self.feature_names: List[str] = []
        for t in tables:
            for f in t.feature_names:
                if f in self._table_of_feature:
                    raise ValueError(f"EmbeddingBagCollection: feature {f!r} is served by two tables")
                self._table_of_feature[f] = t
                self.feature_names.append(f)
        self.embedding_dims = [self._table_of_feature[f].embedding_dim for f in self.feature_names]

        groups: Dict[str, _Group] = {}
        for t in tables:
            key = f"d{t.embedding_dim}_{t.pooling}"
            if key not in groups:
                groups[key] = _Group(key, t.embedding_dim, t.pooling)
            groups[key].add_table(t)
        for f in self.feature_names:
            t = self._table_of_feature[f]
            groups[f"d{t.embedding_dim}_{t.pooling}"].features.append(f)
        self._groups = list(groups.values())

        self.weights = nn.ParameterDict()
        self.optimizer_state = nn.Module()  # holds one buffer per group (row-wise Adagrad)
        for g in self._groups:
            w = empty_huge_pages(g.rows, g.dim, dtype=dtype, device=device)
            self.weights[g.key] = nn.Parameter(w, requires_grad=fused_optimizer is None)
            state = empty_huge_pages(g.rows if fused_optimizer == "rowwise_adagrad" else 0, device=device).zero_()
            self.optimizer_state.register_buffer(g.key, state)
            # Per-feature row ranges [F_g, 2]: features that share a table name the same rows. When every
            # table serves one feature in packing order, the packed [T+1] form says the same.
            ranges = [(g.table_start[self._table_of_feature[f].name],
                       g.table_start[self._table_of_feature[f].name] + self._table_of_feature[f].num_embeddings)
                      for f in g.features]
            packed = all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)) and ranges[0][0] == 0
            tro = (torch.tensor([r[0] for r in ranges] + [ranges[-1][1]], dtype=torch.int64) if packed
                   else torch.tensor(ranges, dtype=torch.int64))
            self.register_buffer(f"_tro_{g.key}", tro.to(device), persistent=False)

        # Group-major feature order (the order pooled outputs come out) and the permutation back.
        self._group_major = [f for g in self._groups for f in g.features]
        pos = {f: i for i, f in enumerate(self._group_major)}
        perm = [pos[f] for f in self.feature_names]
        self._out_perm: Optional[List[int]] = None if perm == list(range(len(perm))) else perm
        self._uniform_dim = len(set(self.embedding_dims)) == 1
        self.reset_parameters()

    # ---- parameters and state ----------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialize every table from its ``init`` and :attr:`init_seed` (the same values each time) and zero
        the optimizer state. Tables on the meta device have no values to set."""
        for g in self._groups:
            w = self.weights[g.key]
            if not w.is_meta:
                for t in g.tables:
                    start = g.table_start[t.name]
                    init_table_block(w[start : start + t.num_embeddings], t, self.init_seed)
            getattr(self.optimizer_state, g.key).zero_()

    def _group_of_table(self, name: str) -> _Group:
        for g in self._groups:
            if name in g.table_start:
                return g
        raise KeyError(f"EmbeddingBagCollection has no table {name!r}; tables are {[t.name for t in self.tables]}")

    def embedding_weight(self, table: str) -> Tensor:
        """The ``[num_embeddings, D]`` rows of one table (a view into its group's packed weights)."""
        g = self._group_of_table(table)
        start = g.table_start[table]
        n = next(t.num_embeddings for t in g.tables if t.name == table)
        return self.weights[g.key][start : start + n]

    def optimizer_state_of(self, table: str) -> Tensor:
        """The ``[num_embeddings]`` row-wise Adagrad state of one table (empty unless rowwise_adagrad)."""
        g = self._group_of_table(table)
        state = getattr(self.optimizer_state, g.key)
        if state.numel() == 0:
            return state
        start = g.table_start[table]
        n = next(t.num_embeddings for t in g.tables if t.name == table)
        return state[start : start + n]

    def set_fused_optimizer(self, fused_optimizer: Optional[str], lr: Optional[float] = None,
                            eps: Optional[float] = None, weight_decay: Optional[float] = None) -> None:
        """Switch between sparse autograd gradients (``None``) and an optimizer fused into the backward
        (``"sgd"``, ``"rowwise_adagrad"``), e.g. when a trainer configures it. Weights are kept; row-wise
        Adagrad state is allocated (zeros) when newly needed and dropped when no longer used."""
        if fused_optimizer is not None:
            optimizer_mode(fused_optimizer)  # validates
        self.fused_optimizer = fused_optimizer
        if lr is not None:
            self.lr = float(lr)
        if eps is not None:
            self.eps = float(eps)
        if weight_decay is not None:
            self.weight_decay = float(weight_decay)
        for g in self._groups:
            w = self.weights[g.key]
            w.requires_grad_(fused_optimizer is None)
            state = getattr(self.optimizer_state, g.key)
            rows = g.rows if fused_optimizer == "rowwise_adagrad" else 0
            if state.numel() != rows:
                self.optimizer_state.register_buffer(g.key, empty_huge_pages(rows, device=w.device).zero_())

    def set_process_group(self, process_group, gradient_divisor: Optional[float] = None) -> None:
        """Keep this replica identical to the other data-parallel ranks' replicas.

        With a process group of several ranks, the fused optimizer's backward exchanges the touched
        rows' gradients with the other ranks and applies the global batch's update (see
        :mod:`lattice.ops.row_exchange`); ``gradient_divisor`` (default: the group size) matches the
        dense gradients' averaging. ``None`` turns the exchange off. Has no effect with sparse autograd
        gradients (``fused_optimizer=None``), which the dense data-parallel machinery reduces.
        """
        self.process_group = process_group
        self.gradient_divisor = gradient_divisor

    def fused_state_names(self, prefix: str = "") -> List[str]:
        """Names (``state_dict`` keys, with ``prefix``) of the weights and optimizer state that the fused
        optimizer owns, for data-parallel wrappers to leave alone."""
        if self.fused_optimizer is None:
            return []
        names = [f"{prefix}weights.{g.key}" for g in self._groups]
        names += [f"{prefix}optimizer_state.{g.key}" for g in self._groups]
        return names

    def set_learning_rate(self, lr: float) -> None:
        """Learning rate of the fused optimizer from the next backward on (e.g. from a scheduler)."""
        self.lr = float(lr)

    # ---- forward -----------------------------------------------------------------------------
    def _split_by_group(self, features: KeyedJaggedTensor) -> List[KeyedJaggedTensor]:
        keys = features.keys()
        if keys != self._group_major:
            index = features.index_per_key()
            missing = [f for f in self._group_major if f not in index]
            if missing:
                raise KeyError(
                    f"EmbeddingBagCollection: the KeyedJaggedTensor lacks features {missing} (it has {keys})"
                )
            features = features.permute([index[f] for f in self._group_major])
        if len(self._groups) == 1:
            return [features]
        return features.split([len(g.features) for g in self._groups])

    def _pool_group(self, g: _Group, kjt: KeyedJaggedTensor) -> Tensor:
        weights = self.weights[g.key]
        tro = getattr(self, f"_tro_{g.key}")
        indices, offsets = kjt.values(), kjt.offsets()
        psw = kjt.weights_or_none() if self.is_weighted else None
        if self.fused_optimizer is not None and self.training:
            return jagged_embedding_pool_fused(
                weights, getattr(self.optimizer_state, g.key), tro, indices, offsets, g.pooling, psw,
                optimizer=self.fused_optimizer, learning_rate=self.lr, eps=self.eps, weight_decay=self.weight_decay,
                process_group=self.process_group, gradient_divisor=self.gradient_divisor,
            )
        if self.fused_optimizer is not None:
            weights = weights.detach()
        return jagged_embedding_pool(weights, tro, indices, offsets, g.pooling, psw)

    def _pooled_groups(self, features: KeyedJaggedTensor) -> List[Tensor]:
        return [self._pool_group(g, kjt) for g, kjt in zip(self._groups, self._split_by_group(features))]

    def forward(self, features: KeyedJaggedTensor) -> Tensor:
        """``[B, F, D]`` pooled embeddings in :attr:`feature_names` order (all tables of one dim)."""
        if not self._uniform_dim:
            raise mixed_dims_error("EmbeddingBagCollection", self.embedding_dims)
        pooled = self._pooled_groups(features)
        out = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        if self._out_perm is not None:
            out = out[:, self._out_perm]
        return out

    def forward_dict(self, features: KeyedJaggedTensor) -> Dict[str, Tensor]:
        """``{feature: [B, D_f]}`` for every feature, any mix of dims."""
        out: Dict[str, Tensor] = {}
        for g, pooled in zip(self._groups, self._pooled_groups(features)):
            for i, f in enumerate(g.features):
                out[f] = pooled[:, i]
        return {f: out[f] for f in self.feature_names}

    def extra_repr(self) -> str:
        tables = ", ".join(f"{t.name}({t.num_embeddings}x{t.embedding_dim}, {t.pooling})" for t in self.tables)
        return f"tables=[{tables}], fused_optimizer={self.fused_optimizer!r}, lr={self.lr}"
