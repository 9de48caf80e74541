"""Deterministic row filters that carve train/val/test out of one dataset: by a hash of the example id
or by timestamp. A filter is a pure function of a row, so every worker and rank agrees on it."""
from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lattice.data.arrow import column, decode, int_values, valid_mask
from lattice.data.builder import EXAMPLE_ID_FILE_SHIFT
from lattice.data.errors import DataError
from lattice.data.hashing import mix, to_unit_interval
from lattice.data.schema import Schema

__all__ = ["RowFilter", "hash_split", "time_split", "write_slices"]


@dataclass(frozen=True)
class RowFilter:
    """Keep rows whose key lies in ``[lo, hi)``.

    ``kind="hash"``: the key is a hash of the example id mapped to ``[0, 1)`` (the example id is
    derived from file and row when the schema has no example-id column). ``kind="time"``: the key is
    the timestamp column (seconds).
    """

    kind: str
    lo: float
    hi: float
    seed: int = 0

    def columns(self, schema: Schema) -> List[str]:
        col = schema.example_id_column if self.kind == "hash" else schema.timestamp_column
        return [col] if col else []

    def mask(self, table: pa.Table, schema: Schema, file: str, file_index: int, rows: np.ndarray,
             row_group: Optional[int]) -> np.ndarray:
        """``[n]`` bool: which rows of this raw chunk pass (``rows``: their indices in the file)."""
        if self.kind == "hash":
            col = schema.example_id_column
            if col is None:
                key = (np.int64(file_index) << np.int64(EXAMPLE_ID_FILE_SHIFT)) | rows
            else:
                key = self._ints(table, col, file, rows, row_group, "example_id")
            u = to_unit_interval(mix(key, seed=self.seed + 0x51))
            return (u >= self.lo) & (u < self.hi)
        if self.kind == "time":
            col = schema.timestamp_column
            if col is None:
                raise DataError("a time split needs a timestamp column (schema.timestamp_column is null)")
            ts = self._ints(table, col, file, rows, row_group, "timestamp")
            return (ts >= self.lo) & (ts < self.hi)
        raise ValueError(f"unknown filter kind {self.kind!r}")

    @staticmethod
    def _ints(table, col, file, rows, row_group, what) -> np.ndarray:
        if col not in table.column_names:
            raise DataError(f"missing {what} column (needed by the split)", file=file, column=col, row_group=row_group)
        arr = decode(column(table, col))
        if arr.null_count:
            i = int(np.argmax(~valid_mask(arr)))
            raise DataError(f"null {what}", file=file, column=col, row_group=row_group, row=int(rows[i]))
        if pa.types.is_timestamp(arr.type):
            arr = arr.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
        if pa.types.is_floating(arr.type):
            return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float64).astype(np.int64)
        if not pa.types.is_integer(arr.type):
            raise DataError(f"{what} column must be integer, got {arr.type}", file=file, column=col, row_group=row_group)
        return int_values(arr)


def hash_split(val_fraction: float, test_fraction: float, seed: int = 0) -> dict:
    """``{"train"|"val"|"test": RowFilter}`` by example-id hash."""
    _check_fractions(val_fraction, test_fraction)
    a = 1.0 - val_fraction - test_fraction
    b = 1.0 - test_fraction
    return {
        "train": RowFilter("hash", 0.0, a, seed),
        "val": RowFilter("hash", a, b, seed),
        "test": RowFilter("hash", b, 1.0 + 1e-9, seed),
    }


def time_split(cut_val: float, cut_test: float) -> dict:
    """``{"train"|"val"|"test": RowFilter}``: train before ``cut_val``, val until ``cut_test``, test after."""
    inf = float(np.iinfo(np.int64).max)
    return {
        "train": RowFilter("time", -inf, cut_val),
        "val": RowFilter("time", cut_val, cut_test),
        "test": RowFilter("time", cut_test, inf),
    }


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
                         f"and sum to less than 1")


def write_slices(tables: Mapping[str, pa.Table], schema: Schema, out_dir: str,
                 slices: Mapping[str, Tuple[Sequence[str], RowFilter]], row_group_size: int = 4096) -> Dict[str, int]:
    """Cuts per-domain tables into slices on disk: ``out_dir/<slice>/<domain>.parquet`` holds the rows of
    ``tables[domain]`` (in order) that pass the slice's filter, for each domain the slice lists (one file per
    domain: their columns may differ). Returns the rows written per slice.

    Args:
        tables: domain -> its rows.
        schema: names the filters' timestamp / example-id columns.
        slices: slice name -> (domains, filter), e.g. from :func:`time_split` or a ``RowFilter("time", lo, hi)``.
    """
    rows: Dict[str, int] = {}
    for name, (domains, row_filter) in slices.items():
        directory = os.path.join(out_dir, name)
        os.makedirs(directory, exist_ok=True)
        rows[name] = 0
        for domain in domains:
            if domain not in tables:
                raise ValueError(f"slice {name!r} names domain {domain!r}, which has no table (have {sorted(tables)})")
            table = tables[domain]
            path = os.path.join(directory, f"{domain}.parquet")
            keep = row_filter.mask(table, schema, path, 0, np.arange(table.num_rows), None)
            part = table.filter(keep)
            pq.write_table(part, path, row_group_size=row_group_size)
            rows[name] += part.num_rows
    return rows
