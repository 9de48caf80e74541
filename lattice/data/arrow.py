"""Arrow buffers as numpy: the helpers every reader of Arrow data in ``lattice.data`` shares.

Columns as one contiguous array, validity bitmaps as bool masks, fixed-width values and list offsets
as zero-copy numpy views, type predicates. Nothing here knows the schema.
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import pyarrow as pa

__all__ = ["column", "valid_mask", "primitive_view", "list_parts", "int_values", "decode", "first_true",
           "is_int", "is_stringlike", "is_listlike", "is_list_or_view", "ragged_arange"]


def column(table: pa.Table, name: Union[str, int]) -> pa.Array:
    """One column (by name or position) as a single contiguous Array (combining chunks only when there are several)."""
    col = table.column(name)
    if col.num_chunks == 1:
        return col.chunk(0)
    if col.num_chunks == 0:
        return pa.array([], type=col.type)
    return col.combine_chunks()


def valid_mask(arr: pa.Array) -> np.ndarray:
    """``[n]`` bool validity from the Arrow bitmap (all True without nulls)."""
    n = len(arr)
    if arr.null_count == 0:
        return np.ones(n, dtype=bool)
    if pa.types.is_null(arr.type):
        return np.zeros(n, dtype=bool)
    bitmap = arr.buffers()[0]
    bits = np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little")
    return bits[arr.offset: arr.offset + n].astype(bool)


_NP_INT = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
}
_NP_FLOAT = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


def primitive_view(arr: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a fixed-width numeric array (values at null slots are undefined)."""
    dt = _NP_INT.get(arr.type) or _NP_FLOAT.get(arr.type)
    if dt is None:
        raise TypeError(f"not a fixed-width numeric array: {arr.type}")
    n = len(arr)
    buf = arr.buffers()[1]
    if buf is None or n == 0:
        return np.zeros(n, dtype=dt)
    return np.frombuffer(buf, dtype=dt, count=arr.offset + n)[arr.offset:]


def list_parts(arr: pa.Array) -> Tuple[np.ndarray, pa.Array]:
    """``(offsets [n+1] int64 into child, child)`` of a list/large_list/fixed_size_list array."""
    n = len(arr)
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        offsets = (np.arange(n + 1, dtype=np.int64) + arr.offset) * size
        return offsets, arr.values
    if pa.types.is_large_list(t):
        dt = np.int64
    elif pa.types.is_list(t):
        dt = np.int32
    else:
        raise TypeError(f"not a list array: {t}")
    buf = arr.buffers()[1]
    if buf is None:
        return np.zeros(n + 1, dtype=np.int64), arr.values
    offsets = np.frombuffer(buf, dtype=dt, count=arr.offset + n + 1)[arr.offset:]
    return offsets.astype(np.int64, copy=False), arr.values


def is_int(t: pa.DataType) -> bool:
    """Any signed or unsigned integer type."""
    return pa.types.is_integer(t)


def is_stringlike(t: pa.DataType) -> bool:
    """String or binary, plain, large or view."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t) or pa.types.is_string_view(t) or pa.types.is_binary_view(t))


def is_listlike(t: pa.DataType) -> bool:
    """list, large_list or fixed_size_list (list views are decoded to large lists first, see :func:`decode`)."""
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_list_or_view(t: pa.DataType) -> bool:
    """:func:`is_listlike`, or a list view (which :func:`decode` turns into a large list)."""
    return is_listlike(t) or pa.types.is_list_view(t) or pa.types.is_large_list_view(t)


def decode(arr: pa.Array) -> pa.Array:
    """Dictionary arrays decoded, list views as large lists; any other array as it is."""
    if pa.types.is_dictionary(arr.type):
        return arr.dictionary_decode()
    if pa.types.is_list_view(arr.type) or pa.types.is_large_list_view(arr.type):
        return arr.cast(pa.large_list(arr.type.value_type))
    return arr


def int_values(arr: pa.Array) -> np.ndarray:
    """int64 numpy of an integer array (copy only when the width differs)."""
    v = primitive_view(arr)
    if v.dtype == np.uint64:
        with np.errstate(over="ignore"):
            return v.astype(np.int64)  # > 2^63 wraps negative, then fails the range check
    return v.astype(np.int64, copy=False)


def first_true(mask: np.ndarray) -> int:
    """Index of the first True of a bool ``[n]`` array (0 when none is)."""
    return int(np.argmax(mask))


def ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """``concat([arange(l) for l in lengths])`` without a loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
