"""Where each embedding table lives across ranks: the data a planner writes and a sharded collection reads.

A :class:`ShardingPlan` maps table names to a :class:`TablePlacement`. A placement is plain data (no process
group, no tensors), so a plan round-trips through YAML/JSON, is saved beside a checkpoint, and is printed by
``lattice plan``. The shard geometry is derived here once, so the collection, the checkpoint code and the
planner's memory figures agree on it.

Kinds (TorchRec's names):

- ``replicated``: every rank holds the whole table (today's layout; DDP-style exchange of row gradients).
- ``table_wise``: the whole table on one rank, ``ranks == [r]``.
- ``row_wise``: contiguous row ranges, one per rank in ``ranks``; rank ``ranks[i]`` holds rows
  ``[row_bounds[i], row_bounds[i+1])``.
- ``column_wise``: column slices of ``D``, one per rank in ``ranks``; rank ``ranks[i]`` holds columns
  ``[col_bounds[i], col_bounds[i+1])`` of every row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

__all__ = ["PLACEMENT_KINDS", "TablePlacement", "ShardingPlan", "even_bounds", "shard_bytes"]

PLACEMENT_KINDS = ("replicated", "table_wise", "row_wise", "column_wise")

# Bytes of fused-optimizer state per stored row: row-wise Adagrad keeps one float32 per row (shared by every
# column slice of a column-wise shard); SGD and autograd (None) keep none.
_STATE_BYTES_PER_ROW = {None: 0, "sgd": 0, "rowwise_adagrad": 4}


def even_bounds(total: int, parts: int) -> List[int]:
    """``parts + 1`` boundaries splitting ``range(total)`` into contiguous pieces whose sizes differ by at most
    one, larger pieces first (``even_bounds(10, 3) == [0, 4, 7, 10]``)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds


@dataclass
class TablePlacement:
    """One table's placement.

    Args:
        kind: one of :data:`PLACEMENT_KINDS`.
        ranks: the ranks holding a shard, in shard order (``[]`` for ``replicated``: every rank).
        num_embeddings: the table's rows (kept so the geometry is known without the schema).
        embedding_dim: the table's ``D``.
        row_bounds: for ``row_wise``, ``len(ranks) + 1`` row boundaries; default :func:`even_bounds`.
        col_bounds: for ``column_wise``, ``len(ranks) + 1`` column boundaries; default :func:`even_bounds`.
    """

    kind: str
    num_embeddings: int
    embedding_dim: int
    ranks: List[int] = field(default_factory=list)
    row_bounds: Optional[List[int]] = None
    col_bounds: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.kind not in PLACEMENT_KINDS:
            raise ValueError(f"placement kind must be one of {PLACEMENT_KINDS}, got {self.kind!r}")
        self.ranks = [int(r) for r in self.ranks]
        if self.kind == "replicated" and self.ranks:
            raise ValueError(f"a replicated table names no ranks, got ranks={self.ranks}")
        if self.kind == "table_wise" and len(self.ranks) != 1:
            raise ValueError(f"a table_wise table lives on exactly one rank, got ranks={self.ranks}")
        if self.kind in ("row_wise", "column_wise") and not self.ranks:
            raise ValueError(f"a {self.kind} table needs at least one rank, got ranks={self.ranks}")
        if len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct, got {self.ranks}")
        if self.kind == "row_wise":
            self.row_bounds = self._check_bounds(self.row_bounds, self.num_embeddings, "row_bounds")
        if self.kind == "column_wise":
            self.col_bounds = self._check_bounds(self.col_bounds, self.embedding_dim, "col_bounds")

    def _check_bounds(self, bounds: Optional[List[int]], total: int, name: str) -> List[int]:
        if bounds is None:
            return even_bounds(total, len(self.ranks))
        bounds = [int(b) for b in bounds]
        if len(bounds) != len(self.ranks) + 1 or bounds[0] != 0 or bounds[-1] != total or any(
                a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{name} must rise from 0 to {total} in {len(self.ranks)} steps, got {bounds}")
        return bounds

    def holds(self, rank: int) -> bool:
        """Whether ``rank`` stores any part of this table."""
        return self.kind == "replicated" or rank in self.ranks

    def shard_shape(self, rank: int) -> Tuple[int, int]:
        """``(rows, cols)`` of the shard on ``rank``; ``(0, 0)`` where the rank holds none."""
        if self.kind == "replicated":
            return self.num_embeddings, self.embedding_dim
        if rank not in self.ranks:
            return 0, 0
        i = self.ranks.index(rank)
        if self.kind == "table_wise":
            return self.num_embeddings, self.embedding_dim
        if self.kind == "row_wise":
            return self.row_bounds[i + 1] - self.row_bounds[i], self.embedding_dim
        return self.num_embeddings, self.col_bounds[i + 1] - self.col_bounds[i]

    def shard_offsets(self, rank: int) -> Tuple[int, int]:
        """``(first_row, first_col)`` of the shard on ``rank`` within the whole table."""
        if self.kind == "row_wise" and rank in self.ranks:
            return self.row_bounds[self.ranks.index(rank)], 0
        if self.kind == "column_wise" and rank in self.ranks:
            return 0, self.col_bounds[self.ranks.index(rank)]
        return 0, 0


@dataclass
class ShardingPlan:
    """Placements of every table for one world size.

    Args:
        world_size: the number of ranks the plan was made for.
        tables: table name -> :class:`TablePlacement`.
    """

    world_size: int
    tables: Dict[str, TablePlacement] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tables = {name: p if isinstance(p, TablePlacement) else TablePlacement(**p)
                       for name, p in self.tables.items()}
        for name, p in self.tables.items():
            bad = [r for r in p.ranks if not 0 <= r < self.world_size]
            if bad:
                raise ValueError(f"table {name!r}: ranks {bad} lie outside world_size {self.world_size}")

    def to_dict(self) -> Dict:
        """Plain data for YAML/JSON (and ``torch.save``)."""
        return {"world_size": self.world_size, "tables": {n: asdict(p) for n, p in self.tables.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ShardingPlan":
        return cls(world_size=int(data["world_size"]), tables=dict(data["tables"]))


def shard_bytes(placement: TablePlacement, rank: int, itemsize: int, optimizer: Optional[str]) -> int:
    """Bytes ``rank`` stores for one table under ``placement``: its shard's weights (``rows * cols * itemsize``)
    plus the fused optimizer's state (row-wise Adagrad: 4 bytes per stored row, on every shard that holds the
    row, column-wise slices included; SGD or ``None``: nothing). 0 where the rank holds no shard.

    Args:
        placement: the table's placement.
        rank: the rank asked about.
        itemsize: bytes per weight element (4 for float32, 2 for bfloat16/float16).
        optimizer: ``None``, ``"sgd"`` or ``"rowwise_adagrad"``.
    """
    if optimizer not in _STATE_BYTES_PER_ROW:
        raise ValueError(f"optimizer must be one of {list(_STATE_BYTES_PER_ROW)}, got {optimizer!r}")
    rows, cols = placement.shard_shape(rank)
    return rows * cols * int(itemsize) + rows * _STATE_BYTES_PER_ROW[optimizer]
