"""Prepared rows as numpy arrays (:class:`Block`) and batch assembly from them (:func:`assemble`).

A :class:`Block` holds one prepared chunk (a Parquet row group, a CSV block, or any prepared table)
in the layout batches are cut from, converted once per chunk: per-row fields as row-major arrays
(``dense [n, Fd]``, ``labels [n, T]``, ...), so a batch's field is one contiguous copy or one
``take``; sparse features whose every bag holds exactly one id as a ``[R, n]`` id matrix per run of
such consecutive keys (one 2-D copy for the run); other list features as ``(offsets [n + 1],
values)``, zero-copy views of the Arrow buffers, with features that have equal offsets (a sequence
and its timestamps, sequences of one history) sharing one offsets array so a shuffled batch
computes each gather index once.

:func:`assemble` cuts a :class:`Batch` from segments of blocks (a row range or sorted row indices of
each), so a batch that straddles two chunks, or a shuffled batch drawn from a window over two
chunks, needs no concatenated copy of the chunks. All outputs land in two allocations (shared memory
inside a DataLoader worker). Nothing loops over rows in Python: per batch the work is a fixed number
of numpy calls per field, per run of one-id sparse keys, and per list feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch

from lattice.data.batch import Batch
from lattice.sparse import KeyedJaggedTensor

__all__ = ["Block", "BlockSpec", "assemble"]

# a segment's rows: a range ``(a, b)`` of the block, or sorted ``int64`` row indices into it
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


# ------------------------------------------------------------------------------------------------
# Arrow helpers (prepared tables hold only int64/float32 columns and large_list<int64>)
# ------------------------------------------------------------------------------------------------
def _array(table: pa.Table, i: int) -> pa.Array:
    col = table.column(i)
    if col.num_chunks == 1:
        return col.chunk(0)
    if col.num_chunks == 0:
        return pa.array([], type=col.type)
    return col.combine_chunks()


_NP = {pa.int64(): np.int64, pa.float32(): np.float32}


def _values(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of an int64/float32 array (undefined values at null slots)."""
    n = len(arr)
    dt = _NP[arr.type]
    buf = arr.buffers()[1]
    if buf is None or n == 0:
        return np.zeros(n, dtype=dt)
    return np.frombuffer(buf, dtype=dt, count=arr.offset + n)[arr.offset:]


def _valid(arr: pa.Array) -> Optional[np.ndarray]:
    """``[n]`` bool validity, or ``None`` when nothing is null."""
    if arr.null_count == 0:
        return None
    n = len(arr)
    if pa.types.is_null(arr.type):
        return np.zeros(n, dtype=bool)
    bits = np.unpackbits(np.frombuffer(arr.buffers()[0], dtype=np.uint8), bitorder="little")
    return bits[arr.offset: arr.offset + n].astype(bool)


def _list(arr: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """``(offsets [n + 1] int64 into values, values int64)`` of a large_list<int64> (or list) array."""
    n = len(arr)
    if pa.types.is_null(arr.type) or n == 0:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    dt = np.int64 if pa.types.is_large_list(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=dt, count=arr.offset + n + 1)[arr.offset:]
    return offsets.astype(np.int64, copy=False), _values(arr.values)


def _float_column(arr: pa.Array, out: np.ndarray, mask: np.ndarray) -> None:
    """``out[:] = values (0 where null)``, ``mask[:] = valid``."""
    if pa.types.is_null(arr.type):
        out[:] = 0
        mask[:] = False
        return
    vals = _values(arr)
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
    """Keys ``k0 .. k0 + R - 1`` of a kind where every bag holds exactly one id: ``ids [R, n]``."""

    k0: int
    ids: np.ndarray


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
            return _array(table, pos[name])

        rows: Dict[str, np.ndarray] = {}
        for key, name in (("domain", "_domain"), ("example_id", "_example_id"), ("user_id", "_user_id"),
                          ("item_id", "_item_id")):
            rows[key] = _values(col(name))
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
            window[:, j] = _values(col("w:" + t))
            if truth is not None:
                _float_column(col("p:" + t), truth[:, j], scratch)
        rows["labels"], rows["label_mask"], rows["label_window"] = labels, label_mask, window
        if truth is not None:
            rows["true_probs"] = truth
        known: List[np.ndarray] = []  # distinct offsets arrays (shared between equal ones)

        def lists(names: Sequence[str], scalars: bool) -> list:
            parts: list = []
            run: List[np.ndarray] = []
            for k, name in enumerate(names):
                o, v = _list(col(name))
                if scalars and len(v) and o[-1] - o[0] == n and (np.diff(o) == 1).all():
                    run.append(v[o[0]: o[-1]])
                    continue
                if run:
                    parts.append(Scalars(k - len(run), np.stack(run)))
                    run = []
                for seen in known:
                    if np.array_equal(seen, o):
                        o = seen
                        break
                else:
                    known.append(o)
                parts.append(Lists(k, o, v))
            if run:
                parts.append(Scalars(len(names) - len(run), np.stack(run)))
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

    def __init__(self, specs: Dict[str, Tuple[Tuple[int, ...], type]], shared: bool) -> None:
        layout, total = {}, 0
        for key, (shape, dtype) in specs.items():
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            layout[key] = (total, nbytes, shape, dtype)
            total += (nbytes + 63) // 64 * 64
        total = max(total, 64)
        if shared:
            base = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
        else:  # numpy's allocator reuses freed blocks (fresh pages are expensive on some hosts)
            base = torch.from_numpy(np.empty(total, dtype=np.uint8))
        self.torch: Dict[str, torch.Tensor] = {}
        self.np: Dict[str, np.ndarray] = {}
        for key, (off, nbytes, shape, dtype) in layout.items():
            view = base[off: off + nbytes].view(_TORCH_DTYPE[np.dtype(dtype)]).view(shape)
            self.torch[key] = view
            self.np[key] = view.numpy()


def _count(rows: Rows) -> int:
    return rows[1] - rows[0] if isinstance(rows, tuple) else len(rows)


class _Gathers:
    """Per (segment, offsets array): the selected bags' starts, lengths and value count (cached, so
    features sharing offsets compute them once)."""

    def __init__(self) -> None:
        self.cache: Dict[Tuple[int, int], tuple] = {}
        self.index: Dict[Tuple[int, int], np.ndarray] = {}

    def bags(self, seg: int, o: np.ndarray, rows: Rows):
        key = (seg, id(o))
        got = self.cache.get(key)
        if got is None:
            if isinstance(rows, tuple):
                a, b = rows
                got = (None, None, int(o[b] - o[a]))
            else:
                starts = o[rows]
                lens = o[rows + 1] - starts
                got = (starts, lens, int(lens.sum()))
            self.cache[key] = got
        return got

    def take_index(self, seg: int, o: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Positions in ``values`` of the selected bags' ids, in order."""
        key = (seg, id(o))
        idx = self.index.get(key)
        if idx is None:
            starts, lens, total = self.bags(seg, o, rows)
            ends = np.cumsum(lens)
            idx = np.repeat(starts - (ends - lens), lens) + np.arange(total, dtype=np.int64)
            self.index[key] = idx
        return idx


def _totals(segments, kind: str, gathers: _Gathers) -> List[int]:
    """Values per key of ``kind`` over all segments (for the arena size and ``length_per_key``)."""
    totals: Dict[int, int] = {}
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                for r in range(len(part.ids)):
                    totals[part.k0 + r] = totals.get(part.k0 + r, 0) + m
            else:
                totals[part.k] = totals.get(part.k, 0) + gathers.bags(s, part.offsets, rows)[2]
    return [totals.get(k, 0) for k in range(len(totals))]


def _fill_lengths(segments, kind: str, B: int, lengths: np.ndarray, gathers: _Gathers) -> None:
    L = lengths.reshape(-1, B) if B else lengths
    pos = 0
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                L[part.k0: part.k0 + len(part.ids), pos: pos + m] = 1
            elif isinstance(rows, tuple):
                np.subtract(part.offsets[rows[0] + 1: rows[1] + 1], part.offsets[rows[0]: rows[1]],
                            out=L[part.k, pos: pos + m])
            else:
                L[part.k, pos: pos + m] = gathers.bags(s, part.offsets, rows)[1]
        pos += m


def _fill_values(segments, kind: str, B: int, offsets: np.ndarray, values: np.ndarray, gathers: _Gathers) -> None:
    """Each segment's ids of each key at that key's bags' positions (``offsets``: the batch's)."""
    if not len(values):
        return
    starts = offsets[:-1].reshape(-1, B)  # [K, B] where each bag lands in ``values``
    pos = 0
    for s, (block, rows) in enumerate(segments):
        m = _count(rows)
        for part in block.jagged[kind]:
            if isinstance(part, Scalars):
                R = len(part.ids)
                src = part.ids[:, rows[0]: rows[1]] if isinstance(rows, tuple) else part.ids[:, rows]
                at = starts[part.k0: part.k0 + R, pos]
                step = int(at[1] - at[0]) if R > 1 else m
                if R == 1 or (np.diff(at) == step).all():  # the run's ids form one strided 2-D slice
                    out = np.lib.stride_tricks.as_strided(values[int(at[0]):], shape=(R, m),
                                                          strides=(step * 8, 8), writeable=True)
                    out[...] = src
                else:
                    for r in range(R):
                        values[int(at[r]): int(at[r]) + m] = src[r]
                continue
            at = int(starts[part.k, pos]) if m else 0
            if isinstance(rows, tuple):
                a, b = int(part.offsets[rows[0]]), int(part.offsets[rows[1]])
                values[at: at + b - a] = part.values[a:b]
            else:
                idx = gathers.take_index(s, part.offsets, rows)
                if len(idx):
                    np.take(part.values, idx, out=values[at: at + len(idx)])
        pos += m


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
    ``a..b-1``, or ``(block, rows)`` with sorted ``int64`` indices).

    The per-row tensors are views of one buffer and the jagged parts views of another (two
    allocations per batch; in shared memory when ``shared``); ``.clone()`` a tensor kept long after
    the step to let its batch go."""
    segments = [(blk, r) for blk, r in segments if _count(r) > 0] or list(segments[:1])
    B = sum(_count(r) for _, r in segments)
    Fs, Fq = len(spec.sparse), len(spec.seq)
    gathers = _Gathers()
    s_tot = _totals(segments, "s", gathers) if Fs else []
    q_tot = _totals(segments, "q", gathers) if Fq else []
    t_tot = _totals(segments, "t", gathers) if spec.seq_ts else []
    s_tot += [0] * (Fs - len(s_tot))
    q_tot += [0] * (Fq - len(q_tot))
    first = segments[0][0].rows
    row_specs = {key: ((B,) + arr.shape[1:], arr.dtype) for key, arr in first.items()}
    row_specs["sparse_mask"] = ((B, Fs), np.bool_)
    jagged = {
        "s_offsets": ((Fs * B + 1,), np.int64), "s_lengths": ((Fs * B,), np.int64), "s_values": ((sum(s_tot),), np.int64),
        "q_offsets": ((Fq * B + 1,), np.int64), "q_lengths": ((Fq * B,), np.int64), "q_values": ((sum(q_tot),), np.int64),
    }
    if spec.seq_ts:
        jagged["t_values"] = ((sum(t_tot),), np.int64)
    # two blocks: per-row tensors (small; metrics may keep ids/labels) and the jagged parts (large)
    rowwise, out = _Arena(row_specs, shared), _Arena(jagged, shared)
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
                np.take(arr, rows, axis=0, out=dst)
        pos += m
    if B:
        np.take(spec.sparse_presence, n["domain"], axis=0, out=n["sparse_mask"])
    for kind, F in (("s", Fs), ("q", Fq)):
        offsets, lengths = n[kind + "_offsets"], n[kind + "_lengths"]
        offsets[0] = 0
        if F and B:
            _fill_lengths(segments, kind, B, lengths, gathers)
            np.cumsum(lengths, out=offsets[1:])
            _fill_values(segments, kind, B, offsets, n[kind + "_values"], gathers)
    sparse = _kjt(spec.sparse_keys, t["s_values"], t["s_lengths"], t["s_offsets"], B, s_tot)
    sequences = _kjt(spec.seq_keys, t["q_values"], t["q_lengths"], t["q_offsets"], B, q_tot)
    seq_ts = None
    if spec.seq_ts:  # same layout as the sequences: shares their lengths and offsets
        if Fq and B:
            _fill_values(segments, "t", B, n["q_offsets"], n["t_values"], gathers)
        seq_ts = _kjt(spec.seq_keys, t["t_values"], t["q_lengths"], t["q_offsets"], B, q_tot)
    return Batch(
        dense=t["dense"], dense_mask=t["dense_mask"], sparse=sparse, sparse_mask=t["sparse_mask"],
        sequences=sequences, sequence_timestamps=seq_ts, domain=t["domain"], labels=t["labels"],
        label_mask=t["label_mask"], label_window=t["label_window"], example_id=t["example_id"],
        user_id=t["user_id"], item_id=t["item_id"], true_probs=t.get("true_probs"),
    )
