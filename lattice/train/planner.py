"""The sharding planner: which embedding table goes where across ranks (``lattice plan``).

From the tables (rows, ``D``, dtype, the features on each), the per-rank memory budget, the world size and the
pooling factors measured on a data sample (:func:`measure_pooling_factors`), :func:`plan_tables` chooses each
table's :class:`~lattice.nn.placement.TablePlacement`: replicated, table-wise (TW), row-wise (RW) or column-wise
(CW). A :class:`CostModel` estimates, for every candidate placement, the bytes each rank stores
(:func:`~lattice.nn.placement.shard_bytes`), the bytes each rank sends per training step (forward and backward)
and the seconds that costs at the model's network and memory bandwidths. The search is a greedy pass (largest
tables first, each to its cheapest placement that fits) followed by local refinement (re-placing one table at a
time while the objective improves) until ``time_limit_s``. The objective is the slowest rank's estimated step
time, weighted by how full the fullest rank's memory is::

    objective = max_r time[r] * (1 + memory_weight * max_r bytes[r] / memory_per_rank)

so, among plans of about the same speed, the one that leaves the most headroom on its fullest rank wins.

Per-rank bytes sent per step for one table (``B`` samples per rank, ``W`` ranks, ``n`` ids and ``b`` pooled bags
per sample over the table's features, ``I`` bytes per id, ``O`` bytes per pooled value):

- replicated: the row-gradient exchange (:mod:`lattice.ops.row_exchange`): the rank's ``U`` unique rows, ids and
  ``D`` gradients, to each of the ``W - 1`` others, ``(W - 1) U (I + D O)``; ``U`` is the expected number of
  distinct rows among ``B n`` uniform draws, ``N (1 - exp(-B n / N))`` (an upper bound for skewed ids).
- table-wise on rank ``o``: every other rank sends its ids and lengths, ``B (n + b) I``, and in the backward its
  pooled gradients, ``B b D O``; rank ``o`` sends the pooled outputs, ``(W - 1) B b D O``.
- column-wise over ``k`` ranks: the ids and lengths go to each of the ``k`` holders, the pooled slices come back
  from each holder and their gradients go back to it; row-wise Adagrad all-reduces one partial sum per touched
  row among the holders.
- row-wise over all ranks: each id goes to the rank holding its row (a share ``1 - rows_r / N`` leaves the
  rank), the lengths to every holder; each holder reduce-scatters the partial pooled sums of all ``W B`` bags,
  ``(W - 1) B b D O``, and receives the pooled gradients, ``B b D O`` from every other rank.

Lookup time on a holder counts its share of the global batch's ids, ``D`` values each, read in the forward and
read and written by the fused update (3 passes), at the memory bandwidth.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Collection, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from lattice.nn.embedding import EmbeddingTableConfig
from lattice.nn.placement import PLACEMENT_KINDS, ShardingPlan, TablePlacement, shard_bytes

__all__ = [
    "CostModel",
    "PlanError",
    "TableEstimate",
    "PlanEstimate",
    "plan_tables",
    "plan_with_estimate",
    "estimate_plan",
    "format_plan",
    "measure_pooling_factors",
    "network_tables",
    "parse_bytes",
    "format_bytes",
]

DEFAULT_TIME_LIMIT_S = 5.0  # the search's default wall-clock bound

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(text: Union[str, int, float], what: str = "memory size") -> int:
    """Bytes in ``"4GiB"``, ``"512MB"``, ``"1.5 GB"`` or a plain number (binary units KiB/MiB/GiB/TiB, decimal
    K/KB/M/MB/G/GB/T/TB). Raises ``ValueError`` naming ``what`` for anything else."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot read {text!r} as a size; write e.g. 4GiB, 512MB or 1000000")
        value, unit = float(match.group(1)), match.group(2).lower()
    nbytes = value * _UNITS[unit]
    if not (math.isfinite(nbytes) and nbytes > 0):
        raise ValueError(f"{what} must be > 0, got {text!r}")
    return int(nbytes)


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with 3 significant digits (``1.50 GiB``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


@dataclass
class CostModel:
    """The planner's constants (all configurable; :meth:`describe` prints them).

    Args:
        batch_size: samples per rank per step (``data.batch_size``).
        network_gbit_s: each rank's network bandwidth in Gbit/s (what it can send per second).
        memory_gb_s: memory bandwidth in GB/s for table lookups and fused updates.
        index_bytes: bytes per id and per length sent (int64 KeyedJaggedTensor values and lengths).
        output_bytes: bytes per pooled value or gradient sent (float32).
        update_passes: passes over the looked-up rows per step: the forward read, and the fused update's read
            and write.
        memory_weight: how much the fullest rank's memory share counts against step time in the objective.
    """

    batch_size: int = 1024
    network_gbit_s: float = 100.0
    memory_gb_s: float = 100.0
    index_bytes: int = 8
    output_bytes: int = 4
    update_passes: int = 3
    memory_weight: float = 0.1

    def __post_init__(self) -> None:
        for name in ("batch_size", "network_gbit_s", "memory_gb_s", "index_bytes", "output_bytes", "update_passes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {getattr(self, name)!r}")
        if self.memory_weight < 0:
            raise ValueError(f"CostModel.memory_weight must be >= 0, got {self.memory_weight!r}")

    @property
    def network_bytes_s(self) -> float:
        return self.network_gbit_s * 1e9 / 8

    @property
    def memory_bytes_s(self) -> float:
        return self.memory_gb_s * 1e9

    def describe(self) -> str:
        """The constants and the objective, a line each."""
        return "\n".join([
            "cost model:",
            f"  batch per rank      {self.batch_size} samples",
            f"  network bandwidth   {self.network_gbit_s:g} Gbit/s per rank (bytes sent per step / bandwidth)",
            f"  memory bandwidth    {self.memory_gb_s:g} GB/s ({self.update_passes} passes over looked-up rows)",
            f"  bytes per id        {self.index_bytes}; per pooled value {self.output_bytes}",
            f"  objective           max step time x (1 + {self.memory_weight:g} x fullest rank's memory share)",
        ])


class PlanError(ValueError):
    """No placement of a table fits the memory per rank."""


@dataclass
class _Table:
    """One table as the planner sees it: geometry, per-sample load and the bytes of one full copy."""

    name: str
    rows: int
    dim: int
    itemsize: int
    ids: float  # ids looked up per sample, over the table's features
    bags: float  # pooled outputs per sample (a sequence event is a bag of one)

    def full_bytes(self, optimizer: Optional[str]) -> int:
        return shard_bytes(TablePlacement("replicated", self.rows, self.dim), 0, self.itemsize, optimizer)


@dataclass
class TableEstimate:
    """One table's figures under its placement.

    Attributes:
        name, placement: the table and where it lives.
        bytes_per_rank: ``[W]`` bytes of weights and optimizer state on each rank.
        sent_per_rank: ``[W]`` estimated bytes each rank sends per step (forward and backward).
        seconds_per_rank: ``[W]`` estimated seconds per step on each rank (sending and lookups).
    """

    name: str
    placement: TablePlacement
    bytes_per_rank: List[int]
    sent_per_rank: List[float]
    seconds_per_rank: List[float]


@dataclass
class PlanEstimate:
    """A plan's figures: per table, and summed per rank."""

    plan: ShardingPlan
    tables: List[TableEstimate]
    memory_per_rank: Optional[int]
    cost: CostModel
    objective: float = float("nan")

    @property
    def bytes_per_rank(self) -> List[int]:
        return [sum(t.bytes_per_rank[r] for t in self.tables) for r in range(self.plan.world_size)]

    @property
    def sent_per_rank(self) -> List[float]:
        return [sum(t.sent_per_rank[r] for t in self.tables) for r in range(self.plan.world_size)]

    @property
    def seconds_per_rank(self) -> List[float]:
        return [sum(t.seconds_per_rank[r] for t in self.tables) for r in range(self.plan.world_size)]

    def to_dict(self) -> Dict[str, Any]:
        return {"plan": self.plan.to_dict(), "cost_model": asdict(self.cost), "memory_per_rank": self.memory_per_rank,
                "bytes_per_rank": self.bytes_per_rank, "sent_per_rank": self.sent_per_rank,
                "seconds_per_rank": self.seconds_per_rank, "objective": self.objective,
                "tables": {t.name: {"bytes_per_rank": t.bytes_per_rank, "sent_per_rank": t.sent_per_rank,
                                    "seconds_per_rank": t.seconds_per_rank} for t in self.tables}}


def _unique_rows(draws: float, rows: int) -> float:
    """Expected distinct rows among ``draws`` uniform draws from ``rows``."""
    return rows * -math.expm1(-draws / rows) if draws > 0 else 0.0


class _Costs:
    """Per-rank memory, bytes sent and seconds of one table under one placement."""

    def __init__(self, world_size: int, cost: CostModel, optimizer: Optional[str]):
        self.W, self.cost, self.optimizer = world_size, cost, optimizer

    def __call__(self, t: _Table, p: TablePlacement) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        W, c = self.W, self.cost
        B, I, O = c.batch_size, c.index_bytes, c.output_bytes
        mem = np.array([shard_bytes(p, r, t.itemsize, self.optimizer) for r in range(W)], dtype=np.float64)
        sent = np.zeros(W)
        looked = np.zeros(W)  # values (ids x columns) read per pass on each rank
        ids_b, bags_b = B * t.ids * I, B * t.bags * I  # one rank's ids and lengths
        if p.kind == "replicated" or W == 1:
            looked[:] = B * t.ids * t.dim
            if W > 1:
                u = _unique_rows(B * t.ids, t.rows)
                sent[:] = (W - 1) * u * (I + t.dim * O)
                looked += (W - 1) * u * t.dim  # the other ranks' rows, updated here too
        elif p.kind == "table_wise":
            (o,) = p.ranks
            sent[:] = ids_b + bags_b + B * t.bags * t.dim * O
            sent[o] = (W - 1) * B * t.bags * t.dim * O
            looked[o] = W * B * t.ids * t.dim
        elif p.kind == "column_wise":
            widths = {r: p.shard_shape(r)[1] for r in p.ranks}
            k = len(p.ranks)
            for r in range(W):
                others = [h for h in p.ranks if h != r]
                sent[r] += len(others) * (ids_b + bags_b) + sum(B * t.bags * widths[h] * O for h in others)
            for h in p.ranks:
                sent[h] += (W - 1) * B * t.bags * widths[h] * O
                looked[h] = W * B * t.ids * widths[h]
                if self.optimizer == "rowwise_adagrad" and k > 1:  # ring all-reduce of one sum per touched row
                    sent[h] += 2 * (k - 1) / k * _unique_rows(W * B * t.ids, t.rows) * 4
        else:  # row_wise
            share = {r: p.shard_shape(r)[0] / t.rows for r in p.ranks}
            for r in range(W):
                holders_else = [h for h in p.ranks if h != r]
                sent[r] += ids_b * (1 - share.get(r, 0.0)) + len(holders_else) * (bags_b + B * t.bags * t.dim * O)
            for h in p.ranks:
                sent[h] += (W - 1) * B * t.bags * t.dim * O
                looked[h] = W * B * t.ids * share[h] * t.dim
        seconds = sent / c.network_bytes_s + looked * t.itemsize * c.update_passes / c.memory_bytes_s
        return mem, sent, seconds


def _candidates(t: _Table, W: int, kind: Optional[str], load: np.ndarray) -> List[TablePlacement]:
    """Placements to try for ``t``, replicated first (a tie keeps the simplest): TW on every rank, RW over all
    ranks, CW over 2, 4, ... and all ranks (the least loaded ones; at most ``D`` of them)."""
    kinds = PLACEMENT_KINDS if kind is None else (kind,)
    out: List[TablePlacement] = []
    if "replicated" in kinds:
        out.append(TablePlacement("replicated", t.rows, t.dim))
    if W == 1 and kind is None:
        return out
    order = [int(r) for r in np.argsort(load, kind="stable")]
    if "table_wise" in kinds:
        out += [TablePlacement("table_wise", t.rows, t.dim, [r]) for r in range(W)]
    if "row_wise" in kinds:
        out.append(TablePlacement("row_wise", t.rows, t.dim, list(range(W))))
    if "column_wise" in kinds:
        sizes = {k for k in (2 ** i for i in range(1, W.bit_length() + 1)) if k <= W} | {W}
        for k in sorted(s for s in sizes if 1 <= s <= t.dim and (s > 1 or kind == "column_wise")):
            out.append(TablePlacement("column_wise", t.rows, t.dim, sorted(order[:k])))
    return out


def _override_placement(name: str, value: Any, t: _Table, W: int) -> Tuple[str, Optional[TablePlacement]]:
    """``(kind, fixed placement or None)`` from an override: a kind, or a mapping ``{kind, ranks, row_bounds,
    col_bounds}`` (with ``ranks``, the placement is taken as given)."""
    if isinstance(value, TablePlacement):
        value = asdict(value)
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping) or "kind" not in value:
        raise ValueError(f"override of table {name!r}: expected a placement kind {PLACEMENT_KINDS} or a mapping "
                         f"with 'kind', got {value!r}")
    kind = str(value["kind"])
    if kind not in PLACEMENT_KINDS:
        raise ValueError(f"override of table {name!r}: placement kind must be one of {PLACEMENT_KINDS}, got {kind!r}")
    if value.get("ranks") is None:
        if kind == "replicated" and any(value.get(k) is not None for k in ("row_bounds", "col_bounds")):
            raise ValueError(f"override of table {name!r}: a replicated table takes no bounds")
        return kind, None
    try:
        p = TablePlacement(kind, t.rows, t.dim, list(value["ranks"]), value.get("row_bounds"), value.get("col_bounds"))
    except ValueError as exc:
        raise ValueError(f"override of table {name!r}: {exc}") from None
    bad = [r for r in p.ranks if not 0 <= r < W]
    if bad:
        raise ValueError(f"override of table {name!r}: ranks {bad} lie outside world_size {W}")
    return kind, p


def _prepare(tables: Sequence[EmbeddingTableConfig], pooling_factors: Optional[Mapping[str, float]],
             sequence_features: Collection[str], dtype: Union[torch.dtype, Mapping[str, torch.dtype]]) -> List[_Table]:
    out: List[_Table] = []
    names = [t.name for t in tables]
    if len(set(names)) != len(names):
        raise ValueError(f"plan_tables: duplicate table names in {names}")
    if not tables:
        raise ValueError("plan_tables needs at least one table")
    for t in tables:
        ids = bags = 0.0
        for f in t.feature_names:
            if pooling_factors is None:
                p = 1.0
            elif f not in pooling_factors:
                raise ValueError(f"pooling_factors has no entry for feature {f!r} (table {t.name!r}); it has "
                                 f"{sorted(pooling_factors)}")
            else:
                p = float(pooling_factors[f])
                if not (math.isfinite(p) and p >= 0):
                    raise ValueError(f"pooling factor of feature {f!r} must be a finite number >= 0, got {p!r}")
            ids += p
            bags += p if f in sequence_features else 1.0
        d = dtype.get(t.name, torch.float32) if isinstance(dtype, Mapping) else dtype
        out.append(_Table(t.name, int(t.num_embeddings), int(t.embedding_dim), torch.empty((), dtype=d).element_size(),
                          ids, bags))
    return out


def _objective(mem: np.ndarray, seconds: np.ndarray, budget: float, weight: float, remaining: float = 0.0) -> float:
    """The objective; with ``remaining`` seconds of tables still to place, the slowest rank's time is bounded
    below by the mean once they are spread evenly (the greedy pass's look-ahead: without it, the first tables
    would all take the evenest placement, however much more traffic it sends in all)."""
    slowest = max(float(seconds.max()), (float(seconds.sum()) + remaining) / seconds.size)
    return slowest * (1.0 + weight * float(mem.max()) / budget)


def plan_tables(
    tables: Sequence[EmbeddingTableConfig],
    world_size: int,
    memory_per_rank: Union[int, str],
    pooling_factors: Optional[Mapping[str, float]] = None,
    *,
    overrides: Optional[Mapping[str, Any]] = None,
    cost: Optional[CostModel] = None,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
    optimizer: Optional[str] = "rowwise_adagrad",
    dtype: Union[torch.dtype, Mapping[str, torch.dtype]] = torch.float32,
    sequence_features: Collection[str] = (),
) -> ShardingPlan:
    """Place every table across ``world_size`` ranks within ``memory_per_rank`` (see the module docstring).

    Args:
        tables: the tables (rows, ``D`` and the features looked up in each); names must be unique.
        world_size: ranks to plan for.
        memory_per_rank: bytes of table and optimizer storage each rank may hold (an int or ``"4GiB"``).
        pooling_factors: mean ids per sample of every feature (:func:`measure_pooling_factors`); ``None``: 1.
        overrides: table -> a placement kind (``"row_wise"``; the planner picks the ranks) or a mapping
            ``{kind, ranks, row_bounds, col_bounds}`` taken as given (e.g. from YAML).
        cost: the cost model's constants (default :class:`CostModel`).
        time_limit_s: wall-clock bound of the search. The greedy pass always completes (one evaluation per
            candidate per table); refinement stops at the limit.
        optimizer: the fused optimizer (``"rowwise_adagrad"`` keeps 4 bytes per row, ``"sgd"``/``None`` none).
        dtype: weight dtype of every table, or a mapping table -> dtype (default float32).
        sequence_features: features whose ids are sequence events (each a bag of one pooled output).

    Returns:
        the :class:`~lattice.nn.placement.ShardingPlan`.

    Raises:
        PlanError: a table fits on no placement; the message names it and the bytes it needs.
    """
    return _plan(tables, world_size, memory_per_rank, pooling_factors, overrides=overrides, cost=cost,
                 time_limit_s=time_limit_s, optimizer=optimizer, dtype=dtype,
                 sequence_features=sequence_features).plan


def _plan(tables, world_size, memory_per_rank, pooling_factors, *, overrides, cost, time_limit_s, optimizer, dtype,
          sequence_features) -> PlanEstimate:
    deadline = time.monotonic() + max(0.0, float(time_limit_s))
    cost = cost or CostModel()
    W = int(world_size)
    if W < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    budget = parse_bytes(memory_per_rank, "memory_per_rank")
    prepared = _prepare(tables, pooling_factors, set(sequence_features), dtype)
    by_name = {t.name: t for t in prepared}
    unknown = sorted(set(overrides or {}) - set(by_name))
    if unknown:
        raise ValueError(f"overrides name tables {unknown} that do not exist; tables are {sorted(by_name)}")
    fixed_kind: Dict[str, str] = {}
    fixed: Dict[str, TablePlacement] = {}
    for name, value in (overrides or {}).items():
        fixed_kind[name], p = _override_placement(name, value, by_name[name], W)
        if p is not None:
            fixed[name] = p
    costs = _Costs(W, cost, optimizer)

    mem, secs = np.zeros(W), np.zeros(W)
    chosen: Dict[str, Tuple[TablePlacement, np.ndarray, np.ndarray, np.ndarray]] = {}

    def place(t: _Table, p: TablePlacement) -> None:
        m, s, sec = costs(t, p)
        chosen[t.name] = (p, m, s, sec)
        np.add(mem, m, out=mem)
        np.add(secs, sec, out=secs)

    def best(t: _Table, remaining: float = 0.0) -> Optional[Tuple[float, TablePlacement]]:
        top: Optional[Tuple[float, TablePlacement]] = None
        for p in _candidates(t, W, fixed_kind.get(t.name), secs):
            m, _, sec = costs(t, p)
            if (mem + m).max() > budget:
                continue
            obj = _objective(mem + m, secs + sec, budget, cost.memory_weight, remaining)
            if top is None or obj < top[0] * (1 - 1e-12):
                top = (obj, p)
        return top

    for name, p in fixed.items():
        place(by_name[name], p)
        if mem.max() > budget:
            r = int(mem.argmax())
            raise PlanError(f"table {name!r}: its overridden placement {p.kind} on ranks {p.ranks or 'all'} puts "
                            f"{format_bytes(mem[r])} of tables on rank {r}, over memory_per_rank "
                            f"{format_bytes(budget)}")
    order = sorted((t for t in prepared if t.name not in fixed), key=lambda t: (-t.full_bytes(optimizer), t.name))
    # the least seconds (summed over ranks) each table can cost, for the greedy pass's look-ahead
    least = {t.name: min(float(costs(t, p)[2].sum()) for p in _candidates(t, W, fixed_kind.get(t.name), secs))
             for t in order}
    remaining = sum(least.values())
    for t in order:
        remaining -= least[t.name]
        top = best(t, max(remaining, 0.0))
        if top is None:
            raise _no_fit(t, W, budget, mem, fixed_kind.get(t.name), costs)
        place(t, top[1])

    # Refinement: lift one table out and put it back at its best placement, bottleneck tables first.
    movable = [t for t in prepared if t.name not in fixed]
    improved = True
    while improved and movable and time.monotonic() < deadline:
        improved = False
        current = _objective(mem, secs, budget, cost.memory_weight)
        slow = int(secs.argmax())
        for t in sorted(movable, key=lambda t: -chosen[t.name][3][slow]):
            if time.monotonic() >= deadline:
                break
            p_old, m_old, _, sec_old = chosen[t.name]
            mem -= m_old
            secs -= sec_old
            top = best(t)
            if top is not None and top[0] < current * (1 - 1e-9):
                place(t, top[1])
                current = top[0]
                improved = True
            else:
                mem += m_old
                secs += sec_old
    plan = ShardingPlan(W, {t.name: chosen[t.name][0] for t in prepared})
    estimate = _estimate(plan, prepared, costs, budget, cost)
    return estimate


def _no_fit(t: _Table, W: int, budget: int, mem: np.ndarray, kind: Optional[str], costs: _Costs) -> PlanError:
    need = min(((costs(t, p)[0].max(), p) for p in _candidates(t, W, kind, np.zeros(W))), key=lambda x: x[0])
    smallest = need[1].kind + (f" over {len(need[1].ranks)} ranks" if len(need[1].ranks) > 1 else "")
    total = t.full_bytes(costs.optimizer)
    if need[0] > budget:
        why = f"more than memory_per_rank {format_bytes(budget)}"
    else:
        why = (f"but the tables placed before it leave at most {format_bytes(budget - mem.min())} free on a rank "
               f"(memory_per_rank {format_bytes(budget)})")
    return PlanError(f"table {t.name!r} ({t.rows} rows x {t.dim}) needs {format_bytes(total)} ({total} bytes, weights "
                     f"and {costs.optimizer or 'no'} optimizer state); its smallest placement, {smallest}, needs "
                     f"{format_bytes(need[0])} on a rank, {why}. Raise --memory-per-rank or --world-size.")


def _estimate(plan: ShardingPlan, prepared: List[_Table], costs: _Costs, budget: Optional[int],
              cost: CostModel) -> PlanEstimate:
    rows = []
    mem, secs = np.zeros(plan.world_size), np.zeros(plan.world_size)
    for t in prepared:
        m, s, sec = costs(t, plan.tables[t.name])
        mem += m
        secs += sec
        rows.append(TableEstimate(t.name, plan.tables[t.name], [int(x) for x in m], [float(x) for x in s],
                                  [float(x) for x in sec]))
    objective = _objective(mem, secs, budget or max(float(mem.max()), 1.0), cost.memory_weight)
    return PlanEstimate(plan, rows, budget, cost, objective)


def estimate_plan(
    plan: ShardingPlan,
    tables: Sequence[EmbeddingTableConfig],
    pooling_factors: Optional[Mapping[str, float]] = None,
    *,
    memory_per_rank: Union[int, str, None] = None,
    cost: Optional[CostModel] = None,
    optimizer: Optional[str] = "rowwise_adagrad",
    dtype: Union[torch.dtype, Mapping[str, torch.dtype]] = torch.float32,
    sequence_features: Collection[str] = (),
) -> PlanEstimate:
    """The cost model's figures for ``plan`` (any plan, e.g. an all-replicated or all-row-wise one to compare):
    bytes stored, bytes sent and seconds, per table and rank. Arguments as for :func:`plan_tables`."""
    cost = cost or CostModel()
    prepared = _prepare(tables, pooling_factors, set(sequence_features), dtype)
    missing = sorted({t.name for t in prepared} - set(plan.tables))
    if missing:
        raise ValueError(f"the plan places no table {missing}; it has {sorted(plan.tables)}")
    budget = None if memory_per_rank is None else parse_bytes(memory_per_rank, "memory_per_rank")
    return _estimate(plan, prepared, _Costs(plan.world_size, cost, optimizer), budget, cost)


def plan_with_estimate(tables, world_size, memory_per_rank, pooling_factors=None, **kwargs) -> PlanEstimate:
    """:func:`plan_tables`, returning the plan with its :class:`PlanEstimate` (what ``lattice plan`` prints)."""
    kwargs.setdefault("overrides", None)
    kwargs.setdefault("cost", None)
    kwargs.setdefault("time_limit_s", DEFAULT_TIME_LIMIT_S)
    kwargs.setdefault("optimizer", "rowwise_adagrad")
    kwargs.setdefault("dtype", torch.float32)
    kwargs.setdefault("sequence_features", ())
    return _plan(tables, world_size, memory_per_rank, pooling_factors, **kwargs)


def format_plan(estimate: PlanEstimate) -> str:
    """The plan as a table (table, placement, ranks, bytes on rank 0 | 1 | ..., estimated bytes each rank sends per
    step, the slowest rank's estimated milliseconds) with the per-rank totals and the cost model under it."""
    W = estimate.plan.world_size

    def per_rank(values, fmt) -> str:
        return " | ".join(fmt(v) for v in values)

    header = ["table", "placement", "ranks", "bytes per rank", "sent per step per rank", "est. ms per step"]
    lines = []
    for t in estimate.tables:
        p = t.placement
        ranks = "all" if p.kind == "replicated" else ",".join(map(str, p.ranks))
        lines.append([t.name, p.kind, ranks, per_rank(t.bytes_per_rank, format_bytes),
                      per_rank(t.sent_per_rank, format_bytes), f"{max(t.seconds_per_rank) * 1e3:.3g}"])
    lines.append(["(total)", "", f"{W} ranks", per_rank(estimate.bytes_per_rank, format_bytes),
                  per_rank(estimate.sent_per_rank, format_bytes), f"{max(estimate.seconds_per_rank) * 1e3:.3g}"])
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    if estimate.memory_per_rank is not None:
        full = max(estimate.bytes_per_rank) / estimate.memory_per_rank
        out.append(f"memory per rank {format_bytes(estimate.memory_per_rank)}; fullest rank {100 * full:.3g}% full")
    out.append(estimate.cost.describe())
    return "\n".join(out)


def measure_pooling_factors(batches: Iterable[Any], num_batches: int = 8) -> Dict[str, float]:
    """Mean ids per sample of every sparse and sequence feature over the first ``num_batches`` batches.

    Args:
        batches: :class:`~lattice.batch.Batch` es (e.g. a DataModule's ``train_dataloader()``).
        num_batches: how many to read.

    Returns:
        ``{feature: ids per sample}`` (empty and absent bags count as 0 ids).
    """
    ids: Dict[str, float] = {}
    samples = 0
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        samples += int(batch.domain.shape[0])
        for kjt in (batch.sparse, batch.sequences):
            if kjt is None:
                continue
            for key, n in zip(kjt.keys(), kjt.length_per_key()):
                ids[key] = ids.get(key, 0.0) + float(n)
    if samples == 0:
        raise ValueError("measure_pooling_factors: the data gave no batch to measure")
    return {k: v / samples for k, v in ids.items()}


def network_tables(network: torch.nn.Module) -> Tuple[List[EmbeddingTableConfig], Dict[str, torch.dtype]]:
    """The embedding tables of every :class:`~lattice.nn.EmbeddingBagCollection` in ``network``, and each one's
    weight dtype. A name already taken by an earlier collection (the wide path's tables repeat the deep ones') is
    qualified by its collection's module path, ``wide.processor.tables.collections.sparse_d32.user``."""
    from lattice.nn.embedding import EmbeddingBagCollection

    found: List[Tuple[str, EmbeddingTableConfig, torch.dtype]] = []
    for path, module in network.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            dtypes = {g.key: module.weights[g.key].dtype for g in module._groups}
            for t in module.tables:
                found.append((path, t, dtypes[module._group_of_table(t.name).key]))
    tables: List[EmbeddingTableConfig] = []
    dtypes: Dict[str, torch.dtype] = {}
    for path, t, d in found:
        name = t.name if t.name not in dtypes else f"{path}.{t.name}"
        tables.append(EmbeddingTableConfig(name, t.num_embeddings, t.embedding_dim, list(t.feature_names), t.pooling,
                                           t.init))
        dtypes[name] = d
    return tables, dtypes
