"""Streaming reader: Parquet/CSV datasets -> :class:`Batch` es, sharded, shuffled, resumable.

How an epoch is read:

1. **Plan** (once, from metadata): every file's chunks (Parquet row groups, CSV blocks) become units.
   Schema/column/type mismatches are raised here, before training, naming file and column. With a
   row filter (a train/val/test split) each unit's kept-row count is computed from its key column.
2. **Order**: with ``shuffle`` the units are permuted by ``(seed, epoch)``; the concatenated row stream
   is cut into ``world_size * num_workers`` contiguous shards of equal size (±1 row), shard
   ``rank * num_workers + worker``, so every row is read exactly once per epoch and ranks get equal
   work. A unit on a shard boundary is read by both neighbours, each keeping its own rows.
3. **Shuffle**: each shard's stream is cut into windows of ``shuffle_buffer`` rows (bounded memory);
   the rows of a window are permuted by ``(seed, epoch, shard, window)`` and cut into batches.
4. **Build**: every chunk is validated and canonicalized once (:meth:`BatchBuilder.prepare`) and
   converted to a :class:`~lattice.data.block.Block` (numpy views in the layout batches are cut
   from), in a read-ahead thread so Parquet decoding overlaps batch building; every batch is
   assembled from row ranges (in order) or sorted row indices (shuffled) of the blocks it spans
   (:meth:`BatchBuilder.assemble`), without concatenating chunks. In a DataLoader worker of a
   :class:`LatticeDataLoader` the batch is assembled into one of a few shared-memory slots the
   worker reuses, and the main process copies it out (one copy per block) and hands the slot back
   (:mod:`lattice.data.transfer`): fresh shared memory per batch would cost a page fault per page.

Parquet row-group statistics are checked at plan time too (ids outside ``[0, num_embeddings)`` under
``oov: error``, binary labels outside {0, 1}), so such files fail before training starts.

Resuming: the position is ``(epoch, batches consumed by this rank)``; since the shards, windows and
permutations are pure functions of the plan and the seed, a resumed reader recomputes where each
worker stood (DataLoader workers are consumed round-robin) and starts from the window holding that
position, without rereading what came before.
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lattice.batch import Batch
from lattice.data.block import Block
from lattice.data.transfer import RingBatch, WorkerRing, close_rings, open_rings
from lattice.data.builder import TRUTH_PREFIX, BatchBuilder, ChunkContext, is_int, is_listlike, is_stringlike
from lattice.data.errors import DataError
from lattice.data.schema import Schema
from lattice.data.sources import ChunkReader, DataSource, FileInfo, as_sources, discover
from lattice.data.splits import RowFilter

__all__ = ["ReadPlan", "ParquetBatchDataset", "LatticeDataLoader", "round_robin_take", "identity_collate"]

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset with __len__ may be inaccurate under several workers; ours
# shards by worker and reports each rank's exact batch count, so the warning does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def identity_collate(batch: Batch) -> Batch:
    """The reader already yields whole :class:`Batch` es."""
    return batch


def round_robin_take(counts: Sequence[int], n: int) -> List[int]:
    """How many items each of ``len(counts)`` round-robin producers (``counts[w]`` items each, an
    exhausted producer drops out) has delivered after ``n`` items in total -- the order in which a
    DataLoader consumes its workers."""
    counts = [int(c) for c in counts]
    n = min(int(n), sum(counts))
    if n <= 0:
        return [0] * len(counts)
    lo, hi = 0, max(counts)  # largest full round r with sum(min(c, r)) <= n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) <= n:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(c, lo) for c in counts]
    rest = n - sum(taken)
    for w, c in enumerate(counts):
        if rest == 0:
            break
        if c > lo:
            taken[w] += 1
            rest -= 1
    return taken


def _dist_rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------
@dataclass
class Unit:
    file: int  # index into plan.files
    chunk: int  # row group / CSV block
    rows: int  # rows kept (after the row filter)


class ReadPlan:
    """Files and units of a dataset, with the per-epoch order and shard slices."""

    def __init__(self, files: List[FileInfo], units: List[Unit], filtered_out: int = 0) -> None:
        self.files = files
        self.units = units
        self.filtered_out = filtered_out
        self.total_rows = int(sum(u.rows for u in units))
        self._rows = np.array([u.rows for u in units], dtype=np.int64)

    def unit_order(self, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
        if not shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([seed, epoch, 0x0DE5]).permutation(len(self.units))

    def shard_range(self, shard: int, num_shards: int) -> Tuple[int, int]:
        n = self.total_rows
        return shard * n // num_shards, (shard + 1) * n // num_shards

    def shard_rows(self, num_shards: int) -> List[int]:
        return [b - a for a, b in (self.shard_range(s, num_shards) for s in range(num_shards))]

    def shard_slices(self, epoch: int, shuffle: bool, seed: int, shard: int, num_shards: int) -> List[Tuple[int, int, int]]:
        """``[(unit, a, b)]``: the shard's rows, as row ranges of (filtered) units, in stream order."""
        order = self.unit_order(epoch, shuffle, seed)
        rows = self._rows[order]
        ends = np.cumsum(rows)
        starts = ends - rows
        lo, hi = self.shard_range(shard, num_shards)
        out = []
        first = int(np.searchsorted(ends, lo, side="right"))
        for k in range(first, len(order)):
            s0, e0 = int(starts[k]), int(ends[k])
            if s0 >= hi:
                break
            a, b = max(lo, s0) - s0, min(hi, e0) - s0
            if b > a:
                out.append((int(order[k]), a, b))
        return out


def _type_ok(kind: str, t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return True
    if kind == "dense" or kind == "label":
        return pa.types.is_floating(t) or is_int(t) or pa.types.is_boolean(t)
    if kind == "sparse":
        if is_listlike(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
            vt = t.value_type.value_type if pa.types.is_dictionary(t.value_type) else t.value_type
            return is_int(vt) or is_stringlike(vt)
        return is_int(t) or is_stringlike(t)
    if kind == "sequence":
        if is_listlike(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
            vt = t.value_type.value_type if pa.types.is_dictionary(t.value_type) else t.value_type
            return is_int(vt) or is_stringlike(vt)
        return False
    if kind == "timestamps":
        return (is_listlike(t) or pa.types.is_list_view(t)) and (is_int(t.value_type) or pa.types.is_timestamp(t.value_type))
    if kind == "delay":
        return pa.types.is_floating(t) or is_int(t) or pa.types.is_duration(t)
    if kind == "id":
        return is_int(t) or is_stringlike(t)
    if kind == "example_id":
        return is_int(t)
    if kind == "timestamp":
        return is_int(t) or pa.types.is_floating(t) or pa.types.is_timestamp(t)
    if kind == "domain":
        return is_int(t) or is_stringlike(t)
    return True


_WANT = {
    "dense": "numeric", "label": "numeric or boolean", "sparse": "integer, string or a list of those",
    "sequence": "a list of integers or strings", "timestamps": "a list of integers", "delay": "numeric seconds",
    "id": "integer or string", "example_id": "integer", "timestamp": "integer, float or timestamp",
    "domain": "string or integer",
}


def check_file(info: FileInfo, schema: Schema) -> None:
    """Raise a :class:`DataError` for every schema/data mismatch visible in a file's Arrow schema."""
    cols = {f.name: f.type for f in info.arrow_schema}

    def bad(col: str, msg: str) -> DataError:
        return DataError(msg, file=info.path, column=col)

    if info.domain is not None:
        if info.domain not in schema.domain_names:
            raise DataError(f"the source's domain {info.domain!r} is not in the schema (domains: "
                            f"{schema.domain_names})", file=info.path)
        domains = [info.domain]
    else:
        if len(schema.domains) > 1 and (schema.domain_column is None or schema.domain_column not in cols):
            raise bad(schema.domain_column or "domain",
                      f"missing domain column: the schema has {len(schema.domains)} domains; name the column "
                      f"with domain_column or give the source its domain")
        domains = schema.domain_names

    def need(kind: str, col: Optional[str], label: str, present_in: Optional[List[bool]] = None) -> None:
        if col is None:
            return
        if col not in cols:
            if present_in is None or all(present_in):
                hint = ""
                if kind in ("id", "timestamp", "example_id"):
                    hint = f" (set {label} to null in the schema if the data has none)"
                raise bad(col, f"missing column for {label}{hint}")
            return  # absent in some domains: checked per row when read
        if not _type_ok(kind, cols[col]):
            raise bad(col, f"{label} must be {_WANT[kind]}, got {cols[col]}")

    if info.domain is None and schema.domain_column in cols and len(schema.domains) > 1:
        need("domain", schema.domain_column, "domain_column")
    need("example_id", schema.example_id_column, "example_id_column")
    need("id", schema.user_id_column, "user_id_column")
    need("id", schema.item_id_column, "item_id_column")
    need("timestamp", schema.timestamp_column, "timestamp_column")
    for f in schema.features:
        pres = [schema.domain_has_feature(d, f.name) for d in domains]
        if not any(pres):
            continue
        need(f.kind, f.source, f"{f.kind} feature {f.name!r}", pres)
        if f.timestamps_column and f.source in cols:
            need("timestamps", f.timestamps_column, f"timestamps of {f.name!r}", pres)
    for t in schema.tasks:
        pres = [schema.domain_has_task(d, t.name) for d in domains]
        if not any(pres):
            continue
        need("label", t.source, f"label of task {t.name!r}", pres)
        if t.delay_column and t.delay_column in cols:
            need("delay", t.delay_column, f"delay of task {t.name!r}", pres)
    for t in schema.tasks:
        p = TRUTH_PREFIX + t.name
        if p in cols and not _type_ok("dense", cols[p]):
            raise bad(p, f"true-probability column must be numeric, got {cols[p]}")


def check_statistics(info: FileInfo, schema: Schema) -> None:
    """Catch out-of-range ids (``oov: error``) and binary labels outside {0, 1} from the Parquet row-group
    statistics, before any row is read. Only columns every domain of the file uses are checked (a
    domain that lacks a feature may hold anything there)."""
    if info.format != "parquet":
        return
    domains = [info.domain] if info.domain is not None else schema.domain_names
    ranges: Dict[str, Tuple[float, float, str]] = {}
    for f in schema.features:
        if f.kind != "dense" and f.oov == "error" and all(schema.domain_has_feature(d, f.name) for d in domains):
            ranges[f.source] = (0, f.num_embeddings - 1, f"ids of {f.kind} feature {f.name!r} must lie in "
                                                        f"[0, {f.num_embeddings})")
    for t in schema.tasks:
        if t.kind == "binary" and all(schema.domain_has_task(d, t.name) for d in domains):
            ranges[t.source] = (0, 1, f"labels of binary task {t.name!r} must be 0 or 1")
    if not ranges:
        return
    import pyarrow.parquet as pq

    md = pq.ParquetFile(info.path).metadata
    leaf_of = {}
    for j in range(md.num_columns):
        path = md.schema.column(j).path
        top = path.split(".")[0]
        if top in ranges and (path == top or path.startswith(top + ".list.")):
            leaf_of[j] = top
    for rg in range(md.num_row_groups):
        group = md.row_group(rg)
        for j, col in leaf_of.items():
            st = group.column(j).statistics
            if st is None or not st.has_min_max or not isinstance(st.min, (int, float)):
                continue
            lo, hi, what = ranges[col]
            if st.min < lo or st.max > hi:
                raise DataError(f"{what}; the row group's statistics say min {st.min}, max {st.max}",
                                file=info.path, column=col, row_group=rg)


def build_plan(sources: Sequence[DataSource], schema: Schema, row_filter: Optional[RowFilter] = None,
               reader: Optional[ChunkReader] = None) -> ReadPlan:
    """Discover files, check them against the schema (columns, types, row-group statistics), count
    (filtered) rows per unit."""
    files = discover(list(sources))
    for info in files:
        check_file(info, schema)
        check_statistics(info, schema)
    units: List[Unit] = []
    filtered_out = 0
    reader = reader or ChunkReader()
    for fi, info in enumerate(files):
        for c, n in enumerate(info.chunk_rows):
            if row_filter is None:
                units.append(Unit(fi, c, n))
                continue
            cols = row_filter.columns(schema)
            table = reader.read(info, c, [x for x in cols if x in info.columns])
            rows = info.chunk_starts[c] + np.arange(n, dtype=np.int64)
            keep = row_filter.mask(table, schema, info.path, info.file_index, rows, info.chunk_label(c))
            k = int(keep.sum())
            filtered_out += n - k
            if k:
                units.append(Unit(fi, c, k))
    return ReadPlan(files, units, filtered_out)


# ------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------
class ParquetBatchDataset(IterableDataset):
    """An ``IterableDataset`` of :class:`Batch` es over Parquet/CSV sources.

    Args:
        sources: datasets (paths or :class:`DataSource` s; per-domain sources are consolidated lazily:
            a column a domain lacks is absent, not zero).
        schema: the union schema.
        batch_size: rows per batch (the last batch of a worker may be smaller unless ``drop_last``).
        shuffle: permute units and rows, differently every epoch.
        shuffle_buffer: rows per shuffle window (rounded up to a multiple of ``batch_size``); bounds memory.
        seed: seed of every permutation.
        drop_last: drop each worker's last partial batch.
        row_filter: keep only these rows (a split); the count filtered out is logged.
        truth: read ``p_<task>`` columns into ``Batch.true_probs`` (``None``: when every file has them).
        zipper: ``assign`` (training) or ``oracle`` (evaluation) windows, see :class:`BatchBuilder`.
        teacher: a :class:`lattice.data.teacher.TeacherTable` joined on ``example_id``.
        even_batches: make every rank yield the same number of batches (DDP) by stopping each rank at the
            smallest rank's count; the rows this leaves out are logged.
        rank, world_size: override the ``torch.distributed`` ones (tests, custom launchers).
        readahead: units (row groups / CSV blocks) read and prepared ahead in background threads, so
            Parquet decoding overlaps batch building (0: read in the consuming thread).
        read_threads: threads reading and preparing those units (Parquet decoding and most numpy work
            release the GIL, so on a host with spare cores several units decode at once; on a busy
            2-core host 1 costs the least CPU). CSV input always uses 1 (a CSV file streams in order).
    """

    def __init__(
        self,
        sources,
        schema: Schema,
        *,
        batch_size: int = 1024,
        shuffle: bool = False,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
        row_filter: Optional[RowFilter] = None,
        truth: Optional[bool] = None,
        zipper: str = "assign",
        zipper_seed: int = 0,
        teacher=None,
        even_batches: bool = False,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        readahead: int = 2,
        read_threads: int = 1,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.sources = as_sources(sources)
        if not self.sources:
            raise ValueError("ParquetBatchDataset needs at least one source")
        self.schema = schema
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.window = max(1, math.ceil(max(int(shuffle_buffer), 1) / self.batch_size)) * self.batch_size
        self.seed = int(seed)
        self.drop_last = drop_last
        self.row_filter = row_filter
        self._truth = truth
        self.zipper = zipper
        self.zipper_seed = zipper_seed
        self.teacher = teacher
        self.even_batches = even_batches
        self.rank = rank
        self.world_size = world_size
        self.readahead = int(readahead)
        self.read_threads = int(read_threads)
        self._local = threading.local()
        self._rings = None  # (token, per-worker pipe ends, slots): set by LatticeDataLoader per epoch
        self.num_workers = 0  # set by LatticeDataLoader
        self._plan: Optional[ReadPlan] = None
        self._builder: Optional[BatchBuilder] = None
        # iteration state, set by the loader before each epoch
        self._epoch = 0
        self._resume_batches = 0
        self._reader: Optional[ChunkReader] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        state["_local"] = None
        return state

    # ---- plan -----------------------------------------------------------------------------------
    @property
    def plan(self) -> ReadPlan:
        if self._plan is None:
            self._plan = build_plan(self.sources, self.schema, self.row_filter, self._chunk_reader())
            if self.row_filter is not None and self._plan.filtered_out:
                log.info("row filter %s kept %d rows, left out %d", self.row_filter, self._plan.total_rows,
                         self._plan.filtered_out)
        return self._plan

    @property
    def truth(self) -> bool:
        if self._truth is None:
            prefixed = [TRUTH_PREFIX + t.name for t in self.schema.tasks]
            self._truth = all(any(p in info.columns for p in prefixed) for info in self.plan.files)
        return self._truth

    @property
    def builder(self) -> BatchBuilder:
        if self._builder is None:
            self._builder = BatchBuilder(self.schema, truth=self.truth, zipper=self.zipper, zipper_seed=self.zipper_seed)
        return self._builder

    @property
    def num_rows(self) -> int:
        return self.plan.total_rows

    def _chunk_reader(self) -> ChunkReader:
        """This thread's reader (read-ahead threads each keep their own open files)."""
        if threading.current_thread() is threading.main_thread():
            if self._reader is None:
                self._reader = ChunkReader()
            return self._reader
        if getattr(self, "_local", None) is None:
            self._local = threading.local()
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = ChunkReader()
        return reader

    def _rank_world(self) -> Tuple[int, int]:
        r, w = _dist_rank_world()
        return (self.rank if self.rank is not None else r, self.world_size if self.world_size is not None else w)

    # ---- counts ---------------------------------------------------------------------------------
    def _batches_for(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def worker_batches(self, rank: int, world_size: int, num_workers: int) -> List[int]:
        """Batches each worker of ``rank`` yields in an epoch (before ``even_batches``)."""
        W = max(1, num_workers)
        rows = self.plan.shard_rows(world_size * W)
        return [self._batches_for(rows[rank * W + w]) for w in range(W)]

    def worker_quota(self, rank: int, world_size: int, num_workers: int) -> List[int]:
        """Batches each worker of ``rank`` yields, after ``even_batches``."""
        counts = self.worker_batches(rank, world_size, num_workers)
        if not self.even_batches or world_size == 1:
            return counts
        least = min(sum(self.worker_batches(r, world_size, num_workers)) for r in range(world_size))
        return round_robin_take(counts, least)

    def num_batches(self, num_workers: Optional[int] = None, rank: Optional[int] = None,
                    world_size: Optional[int] = None) -> int:
        """Batches this rank yields per epoch."""
        r, w = self._rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
        nw = self.num_workers if num_workers is None else num_workers
        return sum(self.worker_quota(rank, world_size, nw))

    def __len__(self) -> int:
        return self.num_batches()

    def left_out_rows(self, world_size: int, num_workers: int) -> int:
        """Rows ``even_batches`` leaves out per epoch over all ranks (0 when off)."""
        if not self.even_batches or world_size == 1:
            return 0
        W = max(1, num_workers)
        rows = self.plan.shard_rows(world_size * W)
        left = 0
        for r in range(world_size):
            full = self.worker_batches(r, world_size, num_workers)
            quota = self.worker_quota(r, world_size, num_workers)
            for w in range(W):
                shard_rows = rows[r * W + w]
                kept = min(shard_rows, quota[w] * self.batch_size) if quota[w] < full[w] else shard_rows
                left += shard_rows - kept
        return left

    # ---- epoch / resume -----------------------------------------------------------------------
    def set_epoch(self, epoch: int, resume_batches: int = 0) -> None:
        """The epoch the next iteration reads, and how many of this rank's batches to skip (resume)."""
        self._epoch = int(epoch)
        self._resume_batches = int(resume_batches)

    # ---- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        ring = None
        if info is not None and self._rings is not None:  # set by LatticeDataLoader for this epoch
            token, conns, slots = self._rings
            ring = WorkerRing(token, worker, conns[worker], slots)
        return self.iter_shard(self._epoch, rank, world, worker, num_workers, self._resume_batches, ring=ring)

    def iter_shard(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                   resume_batches: int = 0, ring: Optional[WorkerRing] = None) -> Iterator[Batch]:
        """The batches of one worker of one rank in ``epoch``, after this rank has consumed
        ``resume_batches`` batches (across its workers, round-robin). With ``ring`` (DataLoader
        workers of a :class:`LatticeDataLoader`) batches are assembled into its shared-memory slots
        and yielded as :class:`~lattice.data.transfer.RingBatch` es."""
        plan = self.plan
        W = max(1, num_workers)
        quota = self.worker_quota(rank, world_size, W)
        skip = round_robin_take(quota, resume_batches)[worker]
        shard, num_shards = rank * W + worker, world_size * W
        return self._shard_batches(plan, epoch, shard, num_shards, skip, quota[worker], ring)

    def _shard_batches(self, plan: ReadPlan, epoch: int, shard: int, num_shards: int, skip: int,
                       quota: int, ring: Optional[WorkerRing] = None) -> Iterator[Batch]:
        slices = plan.shard_slices(epoch, self.shuffle, self.seed, shard, num_shards)
        n_rows = sum(b - a for _, a, b in slices)
        B, C = self.batch_size, self.window
        if skip >= quota:
            return
        bounds = np.concatenate([[0], np.cumsum([b - a for _, a, b in slices])]).astype(np.int64)
        emitted = skip
        start = skip * B
        first_slice = int(np.searchsorted(bounds, (start // C) * C, side="right") - 1)
        threads = 1 if any(f.format == "csv" for f in plan.files) else self.read_threads  # CSV streams in order
        units = _UnitLoader(self, plan, [u for u, _, _ in slices[first_slice:]], self.readahead, threads)
        try:
            for j in range(start // C, math.ceil(n_rows / C)):
                lo, hi = j * C, min((j + 1) * C, n_rows)
                parts = self._window(units, slices, bounds, lo, hi)
                ends = np.cumsum([b - a for _, a, b in parts])
                perm = None
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, epoch, shard, j, 0x5EED]).permutation(hi - lo)
                first = start - lo if j == start // C else 0
                for off in range(first, hi - lo, B):
                    if emitted >= quota:
                        return
                    n = min(B, hi - lo - off)
                    if n < B and self.drop_last:
                        return
                    if perm is None:
                        segments = _range_segments(parts, ends, off, off + n)
                    else:
                        # sorted rows: same batch content, forward memory access
                        segments = _row_segments(parts, ends, np.sort(perm[off: off + n]))
                    batch = self.builder.assemble(segments, ring=ring)
                    if self.teacher is not None:
                        batch = self.teacher.join(batch)
                    emitted += 1
                    yield batch if ring is None else ring.wrap(batch)
        finally:
            units.close()

    @staticmethod
    def _window(units: "_UnitLoader", slices, bounds: np.ndarray, lo: int, hi: int) -> List[Tuple[Block, int, int]]:
        """Rows ``lo..hi-1`` of the shard stream as ``[(block, a, b)]`` (rows ``a..b-1`` of each), in order."""
        parts = []
        k = int(np.searchsorted(bounds, lo, side="right") - 1)
        while k < len(slices) and bounds[k] < hi:
            unit, a, b = slices[k]
            s0 = int(bounds[k])
            a2 = a + max(0, lo - s0)
            b2 = a + min(hi, int(bounds[k + 1])) - s0
            parts.append((units.get(unit), a2, b2))
            k += 1
        return parts

    def load_unit(self, plan: ReadPlan, unit_index: int) -> pa.Table:
        """A unit's prepared (validated, canonical, filtered) table."""
        unit = plan.units[unit_index]
        info = plan.files[unit.file]
        builder = self.builder
        cols = builder.required_columns(info.columns)
        if self.row_filter is not None:
            cols = list(dict.fromkeys(cols + [c for c in self.row_filter.columns(self.schema) if c in info.columns]))
        raw = self._chunk_reader().read(info, unit.chunk, cols)
        start = info.chunk_starts[unit.chunk]
        rows = start + np.arange(raw.num_rows, dtype=np.int64)
        if self.row_filter is not None:
            keep = self.row_filter.mask(raw, self.schema, info.path, info.file_index, rows, info.chunk_label(unit.chunk))
            if int(keep.sum()) != unit.rows:
                raise DataError(f"row filter kept {int(keep.sum())} rows, the plan counted {unit.rows} "
                                f"(file changed while reading?)", file=info.path, row_group=info.chunk_label(unit.chunk))
            if not keep.all():
                raw = raw.filter(pa.array(keep))
                rows = rows[keep]
        ctx = ChunkContext(info.path, info.chunk_label(unit.chunk), start, info.file_index, info.domain)
        return builder.prepare(raw, ctx, rows=rows)

    def load_block(self, plan: ReadPlan, unit_index: int) -> Block:
        """A unit's prepared rows as a :class:`Block` (what batches are cut from)."""
        return self.builder.block(self.load_unit(plan, unit_index))

    def validate(self) -> int:
        """Read and check every unit now (before training); returns the number of rows checked."""
        plan = self.plan
        total = 0
        for i in range(len(plan.units)):
            total += self.load_unit(plan, i).num_rows
        return total


def _range_segments(parts, ends: np.ndarray, lo: int, hi: int) -> List[Tuple[Block, Tuple[int, int]]]:
    """Window rows ``lo..hi-1`` as ``(block, (a, b))`` segments (``ends``: cumulative part sizes)."""
    out = []
    k = int(np.searchsorted(ends, lo, side="right"))
    while lo < hi:
        block, a, b = parts[k]
        s0 = int(ends[k]) - (b - a)
        take = min(hi, int(ends[k])) - lo
        out.append((block, (a + lo - s0, a + lo - s0 + take)))
        lo += take
        k += 1
    return out


def _row_segments(parts, ends: np.ndarray, rows: np.ndarray) -> List[Tuple[Block, np.ndarray]]:
    """Sorted window rows as ``(block, local rows)`` segments."""
    if len(parts) == 1:
        block, a, _ = parts[0]
        return [(block, rows + a if a else rows)]
    cuts = np.searchsorted(rows, ends)
    out, prev = [], 0
    for (block, a, b), end, cut in zip(parts, ends, cuts):
        if cut > prev:
            out.append((block, rows[prev:cut] - (int(end) - (b - a)) + a))
        prev = cut
    return out


class _UnitLoader:
    """The prepared units of one shard pass (as :class:`Block` s), in stream order: the next ``ahead``
    units are read and prepared by one background thread (pyarrow and numpy release the GIL, so
    decoding overlaps batch building); the last two are kept for windows that straddle them."""

    def __init__(self, dataset: ParquetBatchDataset, plan: ReadPlan, order: List[int], ahead: int,
                 threads: int = 1) -> None:
        self.dataset, self.plan, self.ahead = dataset, plan, ahead
        self.order = list(dict.fromkeys(order))  # consecutive slices of one unit: read once
        self.pos = {u: i for i, u in enumerate(self.order)}
        self.cache: "OrderedDict[int, Block]" = OrderedDict()
        self.pending: Dict[int, Any] = {}
        self.pool = None
        if ahead > 0:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="lattice-readahead")

    def get(self, unit: int) -> Block:
        block = self.cache.get(unit)
        if self.pool is not None:  # keep this unit and the next ones coming
            i = self.pos.get(unit, -1)
            for nxt in ([unit] if block is None else []) + self.order[i + 1: i + 1 + self.ahead]:
                if nxt not in self.cache and nxt not in self.pending:
                    self.pending[nxt] = self.pool.submit(self.dataset.load_block, self.plan, nxt)
        if block is None:
            future = self.pending.pop(unit, None)
            block = future.result() if future is not None else self.dataset.load_block(self.plan, unit)
            self.cache[unit] = block
            while len(self.cache) > 2:
                self.cache.popitem(last=False)
        return block

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pending.clear()
        self.cache.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ------------------------------------------------------------------------------------------------
# DataLoader with a resumable position
# ------------------------------------------------------------------------------------------------
class LatticeDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ParquetBatchDataset` that knows its epoch and position.

    - Each ``iter()`` reads the next epoch (reshuffled); :meth:`set_epoch` picks one explicitly.
    - ``len()`` is this rank's batch count, so Lightning knows the epoch length.
    - :meth:`state_dict` / :meth:`load_state_dict` save and restore ``(epoch, batches consumed)``;
      Lightning calls them for mid-epoch checkpoints, and the next ``iter()`` continues where the
      saved run stopped (every remaining row exactly once). The state is the same on every rank, as
      DDP ranks step in lockstep.

    ``persistent_workers`` is not supported: the epoch and position travel to the workers with the
    dataset at the start of each epoch.

    ``ring_slots``: shared-memory slots per worker that batches are handed over in and reused
    (default ``prefetch_factor + 2``; 0: a fresh shared-memory block per batch, as a plain DataLoader).
    """

    def __init__(self, dataset: ParquetBatchDataset, num_workers: int = 0, pin_memory: bool = False,
                 timeout: float = 0, prefetch_factor: Optional[int] = None, multiprocessing_context=None,
                 ring_slots: Optional[int] = None, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("LatticeDataLoader does not support persistent_workers (the epoch and resume "
                             "position are sent to fresh workers each epoch)")
        kwargs.pop("persistent_workers", None)
        # Lightning re-instantiates loaders (e.g. for predict) passing these back with neutral values;
        # only a real setting is an error.
        neutral = {"batch_size": (None,), "shuffle": (None, False), "sampler": (None,), "batch_sampler": (None,),
                   "collate_fn": (None, identity_collate), "drop_last": (False,)}
        for bad, allowed in neutral.items():
            if bad in kwargs:
                value = kwargs.pop(bad)
                if not any(value is a for a in allowed):
                    raise ValueError(f"LatticeDataLoader: {bad} is set on the dataset, not the loader (got {value!r})")
        if not isinstance(dataset, ParquetBatchDataset):
            raise TypeError(f"LatticeDataLoader needs a ParquetBatchDataset, got {type(dataset).__name__}")
        dataset.num_workers = num_workers
        extra = {}
        if num_workers > 0:
            extra["prefetch_factor"] = prefetch_factor or 2
            extra["multiprocessing_context"] = multiprocessing_context
        super().__init__(dataset, batch_size=None, collate_fn=identity_collate, num_workers=num_workers,
                         pin_memory=pin_memory, timeout=timeout, **extra, **kwargs)
        self._next_epoch = 0
        self._next_skip = 0
        # batches in flight per worker: prefetch_factor queued + one being consumed + one being built
        self.ring_slots = (int(prefetch_factor or 2) + 2) if ring_slots is None else int(ring_slots)
        self._epoch: Optional[int] = None
        self._consumed = 0

    def __len__(self) -> int:
        return self.dataset.num_batches(self.num_workers)

    @property
    def epoch(self) -> int:
        """The epoch being read (or the next one, before the first ``iter()``)."""
        return self._next_epoch if self._epoch is None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Read ``epoch`` on the next ``iter()`` (from its start unless a loaded state says otherwise)."""
        if int(epoch) != self._next_epoch:
            self._next_skip = 0
        self._next_epoch = int(epoch)

    def __iter__(self):
        self.dataset.plan  # noqa: B018  (plan once here, not in every worker)
        epoch, skip = self._next_epoch, self._next_skip
        self.dataset.set_epoch(epoch, skip)
        self._epoch, self._consumed = epoch, skip
        self._next_epoch, self._next_skip = epoch + 1, 0
        token = None
        if self.num_workers > 0 and self.ring_slots > 0:  # workers hand batches over in reused shared memory
            token, conns = open_rings(self.num_workers, self.multiprocessing_context)
            self.dataset._rings = (token, conns, self.ring_slots)
        try:
            it = super().__iter__()
        except BaseException:
            if token is not None:
                close_rings(token)
            raise
        finally:
            self.dataset._rings = None
        return self._counting(it, token)

    def _counting(self, it, token=None):
        try:
            for batch in it:
                if isinstance(batch, RingBatch):
                    batch = batch.materialize()
                self._consumed += 1
                yield batch
        finally:
            if token is not None:
                close_rings(token)

    def _layout(self) -> Dict[str, Any]:
        rank, world = self.dataset._rank_world()
        return {
            "world_size": world,
            "num_workers": self.num_workers,
            "batch_size": self.dataset.batch_size,
            "rows": self.dataset.num_rows,
            "shuffle": self.dataset.shuffle,
            "seed": self.dataset.seed,
            "schema": self.dataset.schema.fingerprint(),
        }

    def state_dict(self) -> Dict[str, Any]:
        if self._epoch is None:
            epoch, batches = self._next_epoch, self._next_skip
        elif self._consumed >= len(self):
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._consumed
        return {"epoch": epoch, "batches": batches, "layout": self._layout()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        layout = state.get("layout")
        if layout is not None:
            mine = self._layout()
            diff = {k: (layout.get(k), v) for k, v in mine.items() if layout.get(k) != v}
            if diff and int(state.get("batches", 0)) > 0:
                detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"cannot resume the data position mid-epoch: the reader layout changed ({detail}); "
                                 f"resume with the same data, world size, workers, batch size and seed")
        self._next_epoch = int(state["epoch"])
        self._next_skip = int(state.get("batches", 0))
        self._epoch = None
