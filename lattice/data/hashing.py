"""Deterministic, vectorized hashing (numpy over Arrow buffers; no Python loop over rows).

Used for string ids, out-of-range ids under ``oov: hash``, Lattice Zipper window assignment and
hash splits. Every function is a pure function of its inputs, so results agree across processes,
workers, ranks and reruns.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

__all__ = ["splitmix64", "mix", "hash_strings", "hash_to_range", "to_unit_interval"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK63 = np.uint64(0x7FFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijective, well-mixed ``uint64 -> uint64`` map."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64, copy=True)
        return _finalize(z)


def _finalize(z: np.ndarray) -> np.ndarray:
    """splitmix64 of ``z`` (uint64) in place (no temporaries beyond one scratch array)."""
    with np.errstate(over="ignore"):
        z += _GOLDEN
        t = z >> _S30
        z ^= t
        z *= _M1
        np.right_shift(z, _S27, out=t)
        z ^= t
        z *= _M2
        np.right_shift(z, _S31, out=t)
        z ^= t
        return z


def mix(*columns: np.ndarray, seed: int = 0) -> np.ndarray:
    """Hash several int64 columns (same length) and a seed into one ``uint64`` per row."""
    h = splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))  # the same for every row
    h = np.broadcast_to(h, (len(columns[0]),))
    for col in columns:
        h = _finalize(np.bitwise_xor(h, np.asarray(col, dtype=np.int64).view(np.uint64)))
    return h


def to_unit_interval(h: np.ndarray) -> np.ndarray:
    """``uint64`` hashes to floats uniform in ``[0, 1)`` (53 random bits)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_to_range(values: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Map int64 ``values`` into ``[0, n)`` with a seeded mix (not a plain modulo, so negative and
    patterned ids spread evenly)."""
    h = splitmix64(np.asarray(values, dtype=np.int64).view(np.uint64) ^ np.uint64(seed))
    return (h % np.uint64(n)).astype(np.int64)


_POW_CACHE: dict = {}
_P = np.uint64(0x100000001B3)  # FNV prime; the polynomial base


def _powers(n: int) -> np.ndarray:
    pw = _POW_CACHE.get("pw")
    if pw is None or len(pw) < n:
        size = max(n, 64, 2 * (0 if pw is None else len(pw)))
        pw = np.empty(size, dtype=np.uint64)
        pw[0] = 1
        with np.errstate(over="ignore"):
            for i in range(1, size):  # runs once per size doubling, not per row
                pw[i] = pw[i - 1] * _P
        _POW_CACHE["pw"] = pw
    return pw[:n]


def hash_strings(arr: pa.Array, seed: int = 0) -> np.ndarray:
    """``uint64`` hash of every string/binary value of ``arr`` (nulls hash like the empty string).

    A polynomial hash over the UTF-8 bytes, computed for all rows at once from the Arrow offsets and
    data buffers (``sum_j byte_j * P^(len-1-j)`` via one cumulative sum), then finalized with
    splitmix64 mixed with the length and the seed.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_null(arr.type):
        arr = pa.array([""] * len(arr), type=pa.string())
    if pa.types.is_dictionary(arr.type):
        dict_hash = hash_strings(arr.dictionary, seed)
        idx = np.asarray(arr.indices.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        return dict_hash[idx]
    if pa.types.is_string(arr.type) or pa.types.is_binary(arr.type):
        off_dtype = np.int32
    elif pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type):
        off_dtype = np.int64
    elif pa.types.is_string_view(arr.type) or pa.types.is_binary_view(arr.type):
        return hash_strings(arr.cast(pa.large_binary() if pa.types.is_binary_view(arr.type) else pa.large_string()), seed)
    else:
        raise TypeError(f"hash_strings needs a string or binary array, got {arr.type}")
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_dtype, count=arr.offset + n + 1)[arr.offset:].astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    data = (
        np.frombuffer(bufs[2], dtype=np.uint8, count=end)[start:end]
        if bufs[2] is not None and end > start
        else np.zeros(0, dtype=np.uint8)
    )
    rel = offsets - start
    lengths = np.diff(rel)
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        lengths = np.where(valid, lengths, 0)
        keep = np.repeat(valid, np.diff(rel))
    else:
        keep = None
    total = len(data)
    if total:
        # exponent of byte j inside its row: (row end - 1 - j)
        row_of_byte = np.repeat(np.arange(n), np.diff(rel))
        exps = rel[1:][row_of_byte] - 1 - np.arange(total)
        pw = _powers(int(exps.max()) + 1 if total else 1)
        with np.errstate(over="ignore"):
            contrib = data.astype(np.uint64) * pw[exps]
            if keep is not None:
                contrib = np.where(keep, contrib, np.uint64(0))
            csum = np.concatenate([np.zeros(1, dtype=np.uint64), np.cumsum(contrib, dtype=np.uint64)])
            poly = csum[rel[1:]] - csum[rel[:-1]]
    else:
        poly = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return splitmix64(poly ^ splitmix64(lengths.astype(np.uint64) ^ np.uint64(seed)))


def string_ids(arr: pa.Array, n: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Strings to non-negative int64 ids (in ``[0, n)`` when ``n`` is given)."""
    h = hash_strings(arr, seed)
    if n is None:
        return (h & _MASK63).astype(np.int64)
    return (h % np.uint64(n)).astype(np.int64)
