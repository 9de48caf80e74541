"""Prepared rows as numpy arrays (:class:`Block`) and batch assembly from them (:func:`assemble`).

A :class:`Block` holds one prepared chunk (a Parquet row group, a CSV block, or any prepared table)
in the layout batches are cut from, converted once per chunk: per-row fields as row-major arrays
(``dense [n, Fd]``, ``labels [n, T]``, ...), so a batch's field is one contiguous copy or one
``take``; sparse features whose every bag holds exactly one id as plain id arrays (their offsets
and lengths are then written without reading any: one arithmetic sequence per run of such keys);
other list features as ``(offsets [n + 1], values)``. Ids and list parts are zero-copy views of the
Arrow buffers; features with equal offsets (a sequence and its timestamps, sequences of one
history) share one offsets array, so a shuffled batch computes each gather index once.

:func:`assemble` cuts a :class:`Batch` from segments of blocks (a row range or row indices of each),
so a batch that straddles two chunks, or a shuffled batch drawn from a window over two chunks,
needs no concatenated copy of the chunks. All outputs land in two allocations (shared memory inside
a DataLoader worker). Nothing loops over rows in Python: per batch the work is a fixed number of
numpy calls per field, per one-id sparse key, and per list feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch

from lattice.batch import Batch
from lattice.data.arrow import column, list_parts, primitive_view, valid_mask
from lattice.sparse import KeyedJaggedTensor

__all__ = ["Block", "BlockSpec", "assemble"]

# a segment's rows: a range ``(a, b)`` of the block, or ``int64`` row indices into it (in range; any
# order and repeats allowed, sorted reads memory forward). Indices are not checked here: gathers use
# ``mode="wrap"``, numpy's fastest, which equals the checked result for indices in range.
Rows = Union[Tuple[int, int], np.ndarray]


@dataclass
class BlockSpec:
    """What a :class:`Block` / :class:`Batch` holds for one schema (built by :class:`BatchBuilder`)."""

    dense: List[str]  # prepared column names, in schema order
    sparse: List[str]
    seq: List[str]
    seq_ts: List[str]  # timestamps columns (``ts:`` names) when the batch carries them, else []
    tasks: List[str]  # task names (prepared ``l:``, ``w:``, ``p:`` columns)
    truth: bool
    sparse_keys: List[str]
    seq_keys: List[str]
    sparse_presence: np.ndarray  # [num_domains, Fs] bool
    timestamp: bool = False  # the schema has a timestamp column: Batch.timestamp carries it


# prepared tables hold only int64/float32 columns and large_list<int64>
def _valid(arr: pa.Array) -> Optional[np.ndarray]:
    """``[n]`` bool validity, or ``None`` when nothing is null."""
    return None if arr.null_count == 0 else valid_mask(arr)


def _list(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1] int64 into values, values int64)`` of a large_list<int64> (or list) array."""
    if pa.types.is_null(arr.type) or len(arr) == 0:
        return np.zeros(len(arr) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    offsets, values = list_parts(arr)
    return offsets, primitive_view(values)


def _float_column(arr: pa.Array, out: np.ndarray, mask: np.ndarray) -> None:
    """``out[:] = values (0 where null)``, ``mask[:] = valid``."""
    if pa.types.is_null(arr.type):
        out[:] = 0
        mask[:] = False
        return
    vals = primitive_view(arr)
    valid = _valid(arr)
    if valid is None:
        out[:] = vals
        mask[:] = True
    else:
        np.copyto(out, np.where(valid, vals, np.float32(0)))
        mask[:] = valid


# ------------------------------------------------------------------------------------------------
# Block
# ------------------------------------------------------------------------------------------------
@dataclass
class Scalars:
    """Keys ``k0 .. k0 + R - 1`` of a kind where every bag holds exactly one id: ``ids[r] [n]``
    (zero-copy views of the Arrow buffers)."""

    k0: int
    ids: List[np.ndarray]


@dataclass
class Lists:
    """Key ``k``: bag ``r`` is ``values[offsets[r]: offsets[r + 1]]``."""

    k: int
    offsets: np.ndarray  # [n + 1] int64 (not rebased: offsets[0] may be > 0)
    values: np.ndarray


class Block:
    """One prepared chunk as numpy arrays (see the module docstring). Built by :meth:`from_table`."""

    def __init__(self, n: int, rows: Dict[str, np.ndarray], jagged: Dict[str, list]) -> None:
        self.n = n
        self.rows = rows  # Batch field name -> [n, ...] array
        self.jagged = jagged  # "s" / "q" / "t" -> [Scalars | Lists]

    @staticmethod
    def from_table(table: pa.Table, spec: BlockSpec) -> "Block":
        """A block of a prepared table (:meth:`BatchBuilder.prepare` output, or slices/concatenations)."""
        n = table.num_rows
        pos = {name: i for i, name in enumerate(table.schema.names)}  # name lookups are slow in pyarrow

        def col(name: str) -> pa.Array:
            return column(table, pos[name])

        rows: Dict[str, np.ndarray] = {}
        for key, name in (("domain", "_domain"), ("example_id", "_example_id"), ("user_id", "_user_id"),
                          ("item_id", "_item_id")):
            rows[key] = primitive_view(col(name))
        if spec.timestamp:
            rows["timestamp"] = primitive_view(col("_timestamp"))
        Fd, T = len(spec.dense), len(spec.tasks)
        dense, dense_mask = np.empty((n, Fd), np.float32), np.empty((n, Fd), np.bool_)
        for j, name in enumerate(spec.dense):
            _float_column(col(name), dense[:, j], dense_mask[:, j])
        rows["dense"], rows["dense_mask"] = dense, dense_mask
        labels, label_mask = np.empty((n, T), np.float32), np.empty((n, T), np.bool_)
        window = np.empty((n, T), np.int64)
        truth = np.empty((n, T), np.float32) if spec.truth else None
        scratch = np.empty(n, np.bool_)
        for j, t in enumerate(spec.tasks):
            _float_column(col("l:" + t), labels[:, j], label_mask[:, j])
            window[:, j] = primitive_view(col("w:" + t))
            if truth is not None:
                _float_column(col("p:" + t), truth[:, j], scratch)
        rows["labels"], rows["label_mask"], rows["label_window"] = labels, label_mask, window
        if truth is not None:
            rows["true_probs"] = truth
        known: List[np.ndarray] = []  # distinct offsets arrays (shared between equal ones)
        one_each: Dict[tuple, np.ndarray] = {}  # offsets seen to hold one id per row (prepare shares them),
        # kept alive so that no other array can take their address meanwhile

        def lists(names: Sequence[str], scalars: bool) -> list:
            parts: list = []
            run: List[np.ndarray] = []
            for k, name in enumerate(names):
                o, v = _list(col(name))
                if scalars and len(v) and o[-1] - o[0] == n:
                    key = (o.__array_interface__["data"][0], len(o))
                    if key in one_each or (np.diff(o) == 1).all():
                        one_each[key] = o
                        run.append(v[o[0]: o[-1]])
                        continue
                if run:
                    parts.append(Scalars(k - len(run), run))
                    run = []
                for seen in known:
                    if np.array_equal(seen, o):
                        o = seen
                        break
                else:
                    known.append(o)
                parts.append(Lists(k, o, v))
            if run:
                parts.append(Scalars(len(names) - len(run), run))
            return parts

        jagged = {"s": lists(spec.sparse, True), "q": lists(spec.seq, False)}
        if spec.seq_ts:
            jagged["t"] = lists(spec.seq_ts, False)
        return Block(n, rows, jagged)


# ------------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------------
_TORCH_DTYPE = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}


class _Arena:
    """Output buffers carved out of a single allocation (64-byte aligned views); in shared memory when
    ``shared``, so a DataLoader worker passes them as one block instead of one per tensor."""

    def __init__(self, specs: Dict[str, Tuple[Tuple[int, ...], np.dtype]]) -> None:
        layout, total = [], 0
        for key, (shape, dtype) in specs.items():
            dtype = np.dtype(dtype)
            size = 1
            for d in shape:
                size *= d
            layout.append((key, total, shape, dtype))
            total += (size * dtype.itemsize + 63) // 64 * 64
        self.layout, self.nbytes = layout, max(total, 64)

    def carve(self, shared: bool = False) -> "_Arena":
        """Allocate :attr:`nbytes` and cut the views."""
        total = self.nbytes
        if shared:
            base = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
            base_np = base.numpy()
        else:  # numpy's allocator reuses freed blocks (fresh pages are expensive on some hosts)
            base_np = np.empty(total, dtype=np.uint8)
            base = torch.from_numpy(base_np)
        typed: Dict[np.dtype, torch.Tensor] = {}
        self.torch: Dict[str, torch.Tensor] = {}
        self.np: Dict[str, np.ndarray] = {}
        for key, off, shape, dtype in self.layout:
            tb = typed.get(dtype)
            if tb is None:
                tb = typed[dtype] = base.view(_TORCH_DTYPE[dtype])
            strides, st = [], 1
            for d in reversed(shape):
                strides.append(st)
                st *= d
            self.torch[key] = tb.as_strided(shape, strides[::-1], tb.storage_offset() + off // dtype.itemsize)
            self.np[key] = np.ndarray(shape, dtype, buffer=base_np, offset=off)
        return self


def _count(rows: Rows) -> int:
    return rows[1] - rows[0] if isinstance(rows, tuple) else len(rows)


class _Gathers:
    """Per (segment, offsets array): the selected bags' starts, lengths, ends and value count, and the
    positions of their ids (cached, so features sharing offsets compute them once)."""

    def __init__(self) -> None:
        self.cache: Dict[Tuple[int, int], tuple] = {}
        self.index: Dict[Tuple[int, int], np.ndarray] = {}

    def bags(self, seg: int, o: np.ndarray, rows: Rows):
        """``(starts, lengths, ends, total)`` (``None`` arrays for a row range)."""
        key = (seg, id(o))
        got = self.cache.get(key)
        if got is None:
            if isinstance(rows, tuple):
                a, b = rows
                got = (None, None, None, int(o[b] - o[a]))
            else:
                starts = o[rows]
                lens = o[rows + 1] - starts
                ends = np.cumsum(lens)
                got = (starts, lens, ends, int(ends[-1]) if len(ends) else 0)
            self.cache[key] = got
        return got

    def take_index(self, seg: int, o: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Positions in ``values`` of the selected bags' ids, in order."""
        key = (seg, id(o))
        idx = self.index.get(key)
        if idx is None:
            starts, lens, ends, total = self.bags(seg, o, rows)
            idx = np.repeat(starts - (ends - lens), lens) + np.arange(total, dtype=np.int64)
            self.index[key] = idx
        return idx


_ARANGE = [np.arange(1, 2, dtype=np.int64)]


def _arange1(n: int) -> np.ndarray:
    """``1 .. n`` (int64), from a cache."""
    if len(_ARANGE[0]) < n:
        _ARANGE[0] = np.arange(1, max(n, 2 * len(_ARANGE[0])) + 1, dtype=np.int64)
    return _ARANGE[0][:n]


def _totals(segments, kind: str, K: int, gathers: _Gathers) -> List[List[int]]:
    """``[segment][key]`` values of ``kind`` (for the arena size, offsets and ``length_per_key``)."""
    out = []
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        tot = [0] * K
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                for r in range(len(part.ids)):
                    tot[part.k0 + r] = m
            else:
                tot[part.k] = gathers.bags(s, part.offsets, rows)[3]
        out.append(tot)
    return out


def _fill_layout(segments, kind: str, B: int, seg_totals: List[List[int]], offsets: np.ndarray,
                 lengths: np.ndarray, gathers: _Gathers) -> List[List[int]]:
    """Key-major ``offsets [K*B+1]`` and ``lengths [K*B]`` of the batch; returns ``[segment][key]``
    where that segment's ids of that key start in ``values``."""
    K = len(seg_totals[0])
    key_start, acc = [], 0
    for k in range(K):
        key_start.append(acc)
        acc += sum(t[k] for t in seg_totals)
    offsets[0] = 0
    L = lengths.reshape(K, B)
    O = offsets[1:].reshape(K, B)  # O[k, j]: end of bag j of key k
    cursor = list(key_start)
    out, pos = [], 0
    single = len(segments) == 1
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        out.append(list(cursor))
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                R = len(part.ids)
                L[part.k0: part.k0 + R, pos: pos + m] = 1
                if single:  # the run's bags are one arithmetic sequence
                    np.add(_arange1(R * m), cursor[part.k0], out=O[part.k0: part.k0 + R].reshape(-1))
                else:
                    for k in range(part.k0, part.k0 + R):
                        np.add(_arange1(m), cursor[k], out=O[k, pos: pos + m])
                for k in range(part.k0, part.k0 + R):
                    cursor[k] += m
                continue
            k, o = part.k, part.offsets
            if isinstance(rows, tuple):
                a, b = rows
                np.subtract(o[a + 1: b + 1], o[a: b], out=L[k, pos: pos + m])
                np.add(o[a + 1: b + 1], cursor[k] - int(o[a]), out=O[k, pos: pos + m])
            else:
                _, lens, ends, _ = gathers.bags(s, o, rows)
                L[k, pos: pos + m] = lens
                np.add(ends, cursor[k], out=O[k, pos: pos + m])
            cursor[k] += seg_totals[s][k]
        pos += m
    return out


def _fill_values(segments, kind: str, seg_starts: List[List[int]], values: np.ndarray, gathers: _Gathers) -> None:
    """Each segment's ids of each key at that key's place in ``values``."""
    if not len(values):
        return
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        starts = seg_starts[s]
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                for r, ids in enumerate(part.ids):
                    at = starts[part.k0 + r]
                    if isinstance(rows, tuple):
                        values[at: at + m] = ids[rows[0]: rows[1]]
                    else:
                        np.take(ids, rows, out=values[at: at + m], mode="wrap")
                continue
            at = starts[part.k]
            if isinstance(rows, tuple):
                a, b = int(part.offsets[rows[0]]), int(part.offsets[rows[1]])
                values[at: at + b - a] = part.values[a:b]
            else:
                idx = gathers.take_index(s, part.offsets, rows)
                if len(idx):
                    np.take(part.values, idx, out=values[at: at + len(idx)], mode="wrap")


def _kjt(keys: List[str], values: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor, stride: int,
         length_per_key: List[int]) -> KeyedJaggedTensor:
    offset_per_key = [0]
    for n in length_per_key:
        offset_per_key.append(offset_per_key[-1] + n)
    return KeyedJaggedTensor(keys, values, lengths=lengths, offsets=offsets, stride=stride,
                             length_per_key=list(length_per_key), offset_per_key=offset_per_key,
                             validate=False)  # assemble guarantees the invariants


def assemble(segments: Sequence[Tuple[Block, Rows]], spec: BlockSpec, shared: bool = False) -> Batch:
    """The :class:`Batch` of the concatenated rows of ``segments`` (``(block, (a, b))`` for rows
    ``a..b-1``, or ``(block, rows)`` with ``int64`` indices in ``[0, block.n)``, see :data:`Rows`).

    The per-row tensors are views of one buffer and the jagged parts views of another (two
    allocations per batch; in shared memory when ``shared``); ``.clone()`` a tensor kept long after
    the step to let its batch go."""
    segments = [(blk, r) for blk, r in segments if _count(r) > 0] or list(segments[:1])
    B = sum(_count(r) for _, r in segments)
    Fs, Fq = len(spec.sparse), len(spec.seq)
    gathers = _Gathers()
    s_seg = _totals(segments, "s", Fs, gathers)
    q_seg = _totals(segments, "q", Fq, gathers)
    s_tot = [sum(t[k] for t in s_seg) for k in range(Fs)]
    q_tot = [sum(t[k] for t in q_seg) for k in range(Fq)]
    first = segments[0][0].rows
    row_specs = {key: ((B,) + arr.shape[1:], arr.dtype) for key, arr in first.items()}
    row_specs["sparse_mask"] = ((B, Fs), np.bool_)
    jagged = {
        "s_offsets": ((Fs * B + 1,), np.int64), "s_lengths": ((Fs * B,), np.int64), "s_values": ((sum(s_tot),), np.int64),
        "q_offsets": ((Fq * B + 1,), np.int64), "q_lengths": ((Fq * B,), np.int64), "q_values": ((sum(q_tot),), np.int64),
    }
    if spec.seq_ts:
        jagged["t_values"] = ((sum(q_tot),), np.int64)
    # two blocks: per-row tensors (small; metrics may keep ids/labels) and the jagged parts (large)
    rowwise, out = _Arena(row_specs), _Arena(jagged)
    rowwise.carve(shared)
    out.carve(shared)
    n = {**rowwise.np, **out.np}
    t = {**rowwise.torch, **out.torch}
    pos = 0
    for block, rows in segments:
        m = _count(rows)
        for key, arr in block.rows.items():
            dst = n[key][pos: pos + m]
            if isinstance(rows, tuple):
                dst[...] = arr[rows[0]: rows[1]]
            else:
                np.take(arr, rows, axis=0, out=dst, mode="wrap")
        pos += m
    if B:
        np.take(spec.sparse_presence, n["domain"], axis=0, out=n["sparse_mask"])
    n["s_offsets"][0] = n["q_offsets"][0] = 0
    q_starts = None
    for kind, F, seg in (("s", Fs, s_seg), ("q", Fq, q_seg)):
        if F and B:
            starts = _fill_layout(segments, kind, B, seg, n[kind + "_offsets"], n[kind + "_lengths"], gathers)
            _fill_values(segments, kind, starts, n[kind + "_values"], gathers)
            if kind == "q":
                q_starts = starts
    sparse = _kjt(spec.sparse_keys, t["s_values"], t["s_lengths"], t["s_offsets"], B, s_tot)
    sequences = _kjt(spec.seq_keys, t["q_values"], t["q_lengths"], t["q_offsets"], B, q_tot)
    seq_ts = None
    if spec.seq_ts:  # same layout as the sequences: shares their lengths and offsets
        if q_starts is not None:
            _fill_values(segments, "t", q_starts, n["t_values"], gathers)
        seq_ts = _kjt(spec.seq_keys, t["t_values"], t["q_lengths"], t["q_offsets"], B, q_tot)
    return Batch(
        dense=t["dense"], dense_mask=t["dense_mask"], sparse=sparse, sparse_mask=t["sparse_mask"],
        sequences=sequences, sequence_timestamps=seq_ts, domain=t["domain"], labels=t["labels"],
        label_mask=t["label_mask"], label_window=t["label_window"], example_id=t["example_id"],
        user_id=t["user_id"], item_id=t["item_id"], true_probs=t.get("true_probs"),
        timestamp=t.get("timestamp"),
    )
