"""The read plan of a Parquet/CSV dataset: which rows each shard of an epoch reads.

1. **Plan** (once, from metadata): every file's chunks (Parquet row groups, CSV blocks) become units.
   Schema/column/type mismatches are raised here, before training, naming file and column. With a
   row filter (a train/val/test split) each unit's kept-row count is computed from its key column.
   Parquet row-group statistics are checked too (ids outside ``[0, num_embeddings)`` under
   ``oov: error``, binary labels outside {0, 1}), so such files fail before training starts.
2. **Order**: with ``shuffle`` the units are permuted by ``(seed, epoch)``; the concatenated row stream
   is cut into ``world_size * num_workers`` contiguous shards of equal size (±1 row), shard
   ``rank * num_workers + worker``, so every row is read exactly once per epoch and ranks get equal
   work. A unit on a shard boundary is read by both neighbours, each keeping its own rows.

:class:`~lattice.data.dataset.ParquetBatchDataset` reads the shards; the plan is a pure function of the
files, the schema and the row filter, so every worker and every resumed run computes the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from lattice.data.arrow import is_int, is_list_or_view, is_stringlike
from lattice.data.builder import TRUTH_PREFIX
from lattice.data.errors import DataError
from lattice.data.schema import Schema
from lattice.data.sources import ChunkReader, DataSource, FileInfo, discover
from lattice.data.splits import RowFilter

__all__ = ["Unit", "ReadPlan", "build_plan", "check_file", "check_statistics"]


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
        if is_list_or_view(t):
            vt = t.value_type.value_type if pa.types.is_dictionary(t.value_type) else t.value_type
            return is_int(vt) or is_stringlike(vt)
        return is_int(t) or is_stringlike(t)
    if kind == "sequence":
        if is_list_or_view(t):
            vt = t.value_type.value_type if pa.types.is_dictionary(t.value_type) else t.value_type
            return is_int(vt) or is_stringlike(vt)
        return False
    if kind == "timestamps":
        return is_list_or_view(t) and (is_int(t.value_type) or pa.types.is_timestamp(t.value_type))
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
