"""The dataset: the shards of a :class:`~lattice.data.plan.ReadPlan` as :class:`Batch` es, shuffled and resumable.

How a shard is read (the plan fixes which rows it holds, see :mod:`lattice.data.plan`):

1. **Shuffle**: the shard's stream is cut into windows of ``shuffle_buffer`` rows (bounded memory);
   the rows of a window are permuted by ``(seed, epoch, shard, window)`` and cut into batches.
2. **Build**: every chunk is validated and canonicalized once (:meth:`BatchBuilder.prepare`) and
   converted to a :class:`~lattice.data.block.Block` (numpy views in the layout batches are cut
   from), in a read-ahead thread so Parquet decoding overlaps batch building; every batch is
   assembled from row ranges (in order) or sorted row indices (shuffled) of the blocks it spans
   (:meth:`BatchBuilder.assemble`), without concatenating chunks.

Resuming: the position is ``(epoch, batches consumed by this rank)``; since the shards, windows and
permutations are pure functions of the plan and the seed, a resumed reader recomputes where each
worker stood (DataLoader workers are consumed round-robin) and starts from the window holding that
position, without rereading what came before. How batches travel from DataLoader workers is the
loader's business (:mod:`lattice.data.loader`).
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import torch.distributed as dist
from torch.utils.data import IterableDataset, get_worker_info

from lattice.batch import Batch
from lattice.data.block import Block
from lattice.data.builder import TRUTH_PREFIX, BatchBuilder, ChunkContext
from lattice.data.errors import DataError
from lattice.data.plan import ReadPlan, build_plan
from lattice.data.schema import Schema
from lattice.data.sources import ChunkReader, as_sources
from lattice.data.splits import RowFilter

__all__ = ["ParquetBatchDataset", "round_robin_take", "dist_rank_world"]

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset with __len__ may be inaccurate under several workers; ours
# shards by worker and reports each rank's exact batch count, so the warning does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


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


def dist_rank_world() -> Tuple[int, int]:
    """``(rank, world size)`` of ``torch.distributed``, ``(0, 1)`` when it is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

class ParquetBatchDataset(IterableDataset):
    """An ``IterableDataset`` of :class:`Batch` es over Parquet/CSV sources (see the module docstring).

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

    def rank_world(self) -> Tuple[int, int]:
        """``(rank, world size)``: the ones given, else torch.distributed's."""
        r, w = dist_rank_world()
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
        r, w = self.rank_world()
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
        rank, world = self.rank_world()
        return self.iter_shard(self._epoch, rank, world, worker, num_workers, self._resume_batches)

    def iter_shard(self, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                   resume_batches: int = 0) -> Iterator[Batch]:
        """The batches of one worker of one rank in ``epoch``, after this rank has consumed
        ``resume_batches`` batches (across its workers, round-robin)."""
        plan = self.plan
        W = max(1, num_workers)
        quota = self.worker_quota(rank, world_size, W)
        skip = round_robin_take(quota, resume_batches)[worker]
        shard, num_shards = rank * W + worker, world_size * W
        return self._shard_batches(plan, epoch, shard, num_shards, skip, quota[worker])

    def _shard_batches(self, plan: ReadPlan, epoch: int, shard: int, num_shards: int, skip: int,
                       quota: int) -> Iterator[Batch]:
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
                    # in the process's own memory, which its allocator reuses: a DataLoader moves it
                    batch = self.builder.assemble(segments, shared=False)
                    if self.teacher is not None:
                        batch = self.teacher.join(batch)
                    emitted += 1
                    yield batch
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
