"""Arrow -> :class:`Batch`, vectorized, in two steps.

1. :meth:`BatchBuilder.prepare` turns one raw chunk of a source (a row group, or a CSV block) into a
   canonical Arrow table and validates it, with the file, row group and row positions at hand for
   error messages: domains to indices, ids hashed/checked, dense columns to float32 with a null where
   absent, sparse/sequence columns to ``list<int64>`` (truncated, empty where absent), labels to
   float32 with a null where masked, Lattice Zipper windows assigned. Untouched columns stay
   zero-copy.
2. :meth:`BatchBuilder.block` turns a prepared table into a :class:`~lattice.data.block.Block`
   (numpy views of the Arrow buffers in the layout batches are cut from, once per chunk), and
   :meth:`BatchBuilder.assemble` cuts a :class:`Batch` from row ranges or sorted row indices of blocks:
   list offsets/values become KeyedJaggedTensor offsets/values (key-major), validity bitmaps masks.
   :meth:`BatchBuilder.build` does both for one table. No Python loop over rows anywhere.

Shuffling and batching happen between the two steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import get_worker_info

from lattice.batch import Batch
from lattice.data.arrow import (column, decode, first_true, int_values, is_int, is_listlike, is_stringlike,
                                list_parts, primitive_view, ragged_arange, valid_mask)
from lattice.data.block import Block, BlockSpec, Rows, assemble
from lattice.data.errors import DataError
from lattice.data.hashing import hash_to_range, string_ids
from lattice.data.schema import FeatureSpec, Schema, TaskSpec
from lattice.data import zipper as _zipper

__all__ = ["BatchBuilder", "ChunkContext", "TRUTH_PREFIX", "EXAMPLE_ID_FILE_SHIFT"]

TRUTH_PREFIX = "p_"
# example_id of a row when the schema has no example_id column: (file index << 40) | row in file
EXAMPLE_ID_FILE_SHIFT = 40

# prepared-table column names
_DOMAIN, _EXAMPLE_ID, _USER, _ITEM, _TS, _ROW = "_domain", "_example_id", "_user_id", "_item_id", "_timestamp", "_row"


@dataclass
class ChunkContext:
    """Where a raw chunk comes from (for error messages and derived example ids)."""

    file: str
    row_group: Optional[int] = None
    row_offset: int = 0  # row index in the file of the chunk's first row
    file_index: int = 0  # global index of the file among all sources
    domain: Optional[str] = None  # the source's fixed domain, if any

    def error(self, message: str, column: Optional[str] = None, local_row: Optional[int] = None) -> DataError:
        row = None if local_row is None else self.row_offset + int(local_row)
        return DataError(message, file=self.file, column=column, row_group=self.row_group, row=row)


# ------------------------------------------------------------------------------------------------
# The builder
# ------------------------------------------------------------------------------------------------
class BatchBuilder:
    """Validates raw Arrow chunks against a :class:`Schema` and builds :class:`Batch` es.

    Args:
        schema: the union schema.
        truth: read ``p_<task>`` true-probability columns into ``Batch.true_probs``.
        zipper: ``assign`` (training: each row gets a hashed Lattice Zipper window and the label under
            it) or ``oracle`` (evaluation: every row gets the longest window).
        zipper_seed: seed of the window assignment hash.
    """

    def __init__(self, schema: Schema, *, truth: bool = False, zipper: str = "assign", zipper_seed: int = 0):
        if zipper not in ("assign", "oracle"):
            raise ValueError(f"zipper must be 'assign' or 'oracle', got {zipper!r}")
        self.schema = schema
        self.truth = truth
        self.zipper = zipper
        self.zipper_seed = zipper_seed
        self._dense = schema.dense_features
        self._sparse = schema.sparse_features
        self._seq = schema.sequence_features
        self._presence = {k: schema.feature_presence(k) for k in ("dense", "sparse", "sequence")}
        self._task_presence = schema.task_presence()
        self._domain_names = pa.array(schema.domain_names, type=pa.string())
        self._seq_ts = any(f.timestamps_column for f in self._seq)
        self._block_spec: Optional[BlockSpec] = None
        self._arange_cache: Optional[pa.Array] = None

    # ---- step 1: raw chunk -> prepared table ----------------------------------------------------
    def required_columns(self, available: Sequence[str]) -> List[str]:
        """The subset of ``available`` columns :meth:`prepare` reads."""
        want = set(self.schema.required_columns())
        if self.truth:
            want.update(TRUTH_PREFIX + t.name for t in self.schema.tasks)
        return [c for c in available if c in want]

    def prepare(self, table: pa.Table, ctx: ChunkContext, rows: Optional[np.ndarray] = None) -> pa.Table:
        """Validate and canonicalize one raw chunk. ``rows``: the chunk rows' indices in the file
        (default ``row_offset + arange(n)``); they travel as ``_row`` for later messages."""
        s = self.schema
        n = table.num_rows
        local = np.arange(n, dtype=np.int64)
        file_rows = (ctx.row_offset + local) if rows is None else np.asarray(rows, dtype=np.int64)
        names = set(table.column_names)

        def err(message: str, col: Optional[str], i: Optional[int]) -> DataError:
            row = None if i is None else int(file_rows[i])
            return DataError(message, file=ctx.file, column=col, row_group=ctx.row_group, row=row)

        out: Dict[str, pa.Array] = {}
        # -- domain
        domain = self._domains(table, ctx, names, err)
        out[_DOMAIN] = pa.array(domain, type=pa.int64())
        # -- ids
        if s.example_id_column is not None:
            eid = self._int_column(table, s.example_id_column, names, err, "example_id", allow_string=False)
        else:
            eid = (np.int64(ctx.file_index) << np.int64(EXAMPLE_ID_FILE_SHIFT)) | file_rows
        out[_EXAMPLE_ID] = pa.array(eid, type=pa.int64())
        user = self._optional_ids(table, s.user_id_column, names, err, n)
        item = self._optional_ids(table, s.item_id_column, names, err, n)
        ts = self._optional_ids(table, s.timestamp_column, names, err, n, timestamp=True)
        out[_USER], out[_ITEM], out[_TS] = (pa.array(x, type=pa.int64()) for x in (user, item, ts))
        out[_ROW] = pa.array(file_rows, type=pa.int64())

        everywhere = np.ones(n, dtype=bool)

        def present(matrix: np.ndarray, j: int) -> np.ndarray:
            """``[n]`` bool: does each row's domain have feature/task ``j``."""
            col = matrix[:, j]
            return everywhere if col.all() else col[domain]

        # -- dense
        for j, f in enumerate(self._dense):
            out["f:" + f.name] = self._dense_column(table, f, present(self._presence["dense"], j), names, err)
        # -- sparse / sequence
        for kind, feats in (("sparse", self._sparse), ("sequence", self._seq)):
            for j, f in enumerate(feats):
                bag, stamps = self._id_list_column(table, f, present(self._presence[kind], j), names, err)
                out["f:" + f.name] = bag
                if kind == "sequence" and self._seq_ts:
                    out["ts:" + f.name] = stamps
        # -- labels
        for j, t in enumerate(s.tasks):
            label, window = self._label_column(table, t, present(self._task_presence, j), names, err, user, item, ts)
            out["l:" + t.name] = label
            out["w:" + t.name] = window
            if self.truth:
                out["p:" + t.name] = self._truth_column(table, t, names, err)
        return pa.table(out)

    def _domains(self, table, ctx, names, err) -> np.ndarray:
        s = self.schema
        n = table.num_rows
        if ctx.domain is not None:
            try:
                idx = s.domain_index(ctx.domain)
            except KeyError:
                raise err(f"the source's domain {ctx.domain!r} is not in the schema (domains: {s.domain_names})",
                          None, None) from None
            return np.full(n, idx, dtype=np.int64)
        col = s.domain_column
        if col is None or col not in names:
            if len(s.domains) == 1:
                return np.zeros(n, dtype=np.int64)
            raise err(f"missing domain column (the schema has {len(s.domains)} domains; name the domain "
                      f"column with domain_column or give each source its domain)", col, None)
        arr = decode(column(table, col))
        if arr.null_count:
            raise err("null domain", col, first_true(~valid_mask(arr)))
        if is_int(arr.type) or is_stringlike(arr.type):
            as_str = arr.cast(pa.string())
        else:
            raise err(f"domain column must be string or integer, got {arr.type}", col, None)
        idx = pc.index_in(as_str, value_set=self._domain_names)
        if idx.null_count:
            i = first_true(~valid_mask(idx))
            raise err(f"domain {as_str[i].as_py()!r} is not in the schema (domains: {s.domain_names})", col, i)
        return int_values(idx)

    def _int_column(self, table, col, names, err, what, allow_string=True) -> np.ndarray:
        if col not in names:
            raise err(f"missing {what} column", col, None)
        arr = decode(column(table, col))
        if arr.null_count:
            raise err(f"null {what}", col, first_true(~valid_mask(arr)))
        if is_int(arr.type):
            return int_values(arr)
        if allow_string and is_stringlike(arr.type):
            return string_ids(arr)
        raise err(f"{what} column must be {'integer or string' if allow_string else 'int64'}, got {arr.type}",
                  col, None)

    def _optional_ids(self, table, col, names, err, n, timestamp=False) -> np.ndarray:
        if col is None:
            return np.zeros(n, dtype=np.int64)
        if timestamp:
            if col not in names:
                raise err("missing timestamp column (set timestamp_column: null in the schema if the data has "
                          "none)", col, None)
            arr = decode(column(table, col))
            if arr.null_count:
                raise err("null timestamp", col, first_true(~valid_mask(arr)))
            return self._seconds(arr, col, err)
        return self._int_column(table, col, names, err, col)

    @staticmethod
    def _seconds(arr: pa.Array, col, err) -> np.ndarray:
        """Timestamps as int64 seconds (int, float or Arrow timestamp columns)."""
        t = arr.type
        if pa.types.is_timestamp(t):
            return arr.cast(pa.timestamp("s"), safe=False).cast(pa.int64()).to_numpy(zero_copy_only=False)
        if is_int(t):
            return int_values(arr)
        if pa.types.is_floating(t):
            v = primitive_view(arr).astype(np.float64)
            ok = np.isfinite(v) | ~valid_mask(arr)
            if not ok.all():
                raise err(f"timestamp {v[first_true(~ok)]} is not finite", col, first_true(~ok))
            return v.astype(np.int64)
        raise err(f"timestamp column must be integer, float or timestamp, got {t}", col, None)

    def _dense_column(self, table, f: FeatureSpec, present: np.ndarray, names, err) -> pa.Array:
        n = table.num_rows
        col = f.source
        if col not in names:
            if present.any():
                raise err(f"missing column for dense feature {f.name!r}", col, first_true(present))
            return pa.nulls(n, type=pa.float32())
        arr = decode(column(table, col))
        t = arr.type
        if pa.types.is_floating(t) or is_int(t):
            vals = primitive_view(arr)
        elif pa.types.is_boolean(t):
            vals = np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.float32)
        elif pa.types.is_null(t):
            vals = np.zeros(n, dtype=np.float32)
        else:
            raise err(f"dense feature {f.name!r} must be numeric, got {t}", col, None)
        keep = present & valid_mask(arr) if arr.null_count else present
        with np.errstate(over="ignore", invalid="ignore"):
            v32 = vals.astype(np.float32, copy=False)
        if self.schema.nan_policy(f) == "missing" and pa.types.is_floating(t):
            keep = keep & ~np.isnan(v32)  # NaN = absent, like a null
        bad = keep & ~np.isfinite(v32)
        if bad.any():
            i = first_true(bad)
            hint = ("; to read NaN as absent, set nan: missing on the feature (or dense_nan: missing in the schema)"
                    if np.isnan(v32[i]) else "")
            raise err(f"dense feature {f.name!r} has non-finite value {float(vals[i])!r}{hint}", col, i)
        if keep.all() and arr.type == pa.float32() and arr.null_count == 0:
            return arr  # zero-copy
        return pa.array(np.where(keep, v32, np.float32(0)), type=pa.float32(), mask=~keep)

    def _id_list_column(self, table, f: FeatureSpec, present: np.ndarray, names, err):
        """Returns (list<int64> ids, list<int64> timestamps or None)."""
        n = table.num_rows
        col = f.source
        if col not in names:
            if present.any():
                raise err(f"missing column for {f.kind} feature {f.name!r}", col, first_true(present))
            empty = pa.LargeListArray.from_arrays(pa.array(np.zeros(n + 1, np.int64)), pa.array([], pa.int64()))
            return empty, (empty if f.timestamps_column else None)
        arr = decode(column(table, col))
        t = arr.type
        if f.kind == "sparse" and is_int(t) and not arr.null_count and n and present.all():
            ids = int_values(arr)  # one id per row, all present: in range -> a zero-copy bag per row
            if int(ids.min()) >= 0 and int(ids.max()) < f.num_embeddings:
                values = arr if t == pa.int64() else pa.array(ids, type=pa.int64())
                return pa.LargeListArray.from_arrays(self._arange_offsets(n), values), None
        if pa.types.is_null(t):  # an all-null column (e.g. an empty CSV column)
            if f.kind == "sequence" and present.any():
                raise err(f"null list in sequence feature {f.name!r}", col, first_true(present))
            empty = pa.LargeListArray.from_arrays(pa.array(np.zeros(n + 1, np.int64)), pa.array([], pa.int64()))
            return empty, (empty if f.kind == "sequence" and self._seq_ts else None)
        if is_listlike(t):
            offsets, child = list_parts(arr)
            child = decode(child)
            if arr.null_count:
                null_rows = ~valid_mask(arr)
                bad = null_rows & present
                if bad.any():
                    raise err(f"null list in {f.kind} feature {f.name!r} (a list column may only be null where "
                              f"the row's domain lacks the feature)", col, first_true(bad))
                present = present & ~null_rows
            scalar = False
        elif f.kind == "sparse" and (is_int(t) or is_stringlike(t)):
            # one id per row; a null is an empty bag
            offsets = np.arange(n + 1, dtype=np.int64)
            child = arr
            scalar = True
        else:
            want = "a list of integers or strings" if f.kind == "sequence" else "integer, string or a list of those"
            raise err(f"{f.kind} feature {f.name!r} must be {want}, got {t}", col, None)
        ct = child.type
        if not (is_int(ct) or is_stringlike(ct)):
            raise err(f"{f.kind} feature {f.name!r} must hold integer or string ids, got {t}", col, None)
        start, end = int(offsets[0]), int(offsets[-1])
        child = child.slice(start, end - start)
        rel = offsets - start
        lengths = np.diff(rel)
        fast = self._fast_path(table, f, arr, child, rel, lengths, present, names)
        if fast is not None:
            return fast
        # which values survive: rows present in this domain; for scalar columns also non-null values
        if scalar:
            val_keep = present & valid_mask(child) if child.null_count else present
            row_len = val_keep.astype(np.int64)
        else:
            val_keep = np.repeat(present, lengths)
            row_len = np.where(present, lengths, 0)
            if child.null_count:
                bad_val = ~valid_mask(child) & val_keep
                if bad_val.any():
                    row = int(np.searchsorted(rel, first_true(bad_val), side="right") - 1)
                    raise err(f"null id inside a list of {f.kind} feature {f.name!r}", col, row)
        if val_keep.all():
            val_keep = None
        if is_stringlike(ct):
            ids = string_ids(child, f.num_embeddings)
        else:
            ids = self._check_range(int_values(child), f, col, err, rel, val_keep)
        stamps = None
        if f.kind == "sequence" and f.timestamps_column:
            stamps = self._timestamps(table, f, rel, lengths, present, names, err)
        if val_keep is not None:
            ids = ids[val_keep]
            if stamps is not None:
                stamps = stamps[val_keep]
        new_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(row_len, out=new_off[1:])
        # truncate: sparse keeps the first max_length ids, a sequence the last (most recent) ones
        if f.max_length is not None and n and int(row_len.max()) > f.max_length:
            cut = np.minimum(row_len, f.max_length)
            row_start = new_off[:-1] + ((row_len - cut) if f.kind == "sequence" else 0)
            sel = np.repeat(row_start, cut) + ragged_arange(cut)
            ids = ids[sel]
            if stamps is not None:
                stamps = stamps[sel]
            new_off[1:] = np.cumsum(cut)
        off_arr = pa.array(new_off, type=pa.int64())
        bag = pa.LargeListArray.from_arrays(off_arr, pa.array(ids, type=pa.int64()))
        ts_arr = None
        if f.kind == "sequence" and self._seq_ts:
            ts_vals = stamps if stamps is not None else np.zeros(len(ids), dtype=np.int64)
            ts_arr = pa.LargeListArray.from_arrays(off_arr, pa.array(ts_vals, type=pa.int64()))
        return bag, ts_arr

    def _arange_offsets(self, n: int) -> pa.Array:
        """``0 .. n`` as an int64 Arrow array (list offsets of one value per row), cached."""
        cached = self._arange_cache
        if cached is None or len(cached) < n + 1:
            cached = self._arange_cache = pa.array(np.arange(max(n + 1, 65537), dtype=np.int64))
        return cached.slice(0, n + 1)

    def _fast_path(self, table, f: FeatureSpec, arr, child, rel, lengths, present, names):
        """Zero-copy ``(bag, timestamps)`` when a column needs no change: every row present, no nulls,
        int64 ids in range, nothing to truncate. ``None`` when the general path must run."""
        if child.type != pa.int64() or child.null_count or arr.null_count or not present.all():
            return None
        v = primitive_view(child)
        if len(v) and (int(v.min()) < 0 or int(v.max()) >= f.num_embeddings):
            return None
        if f.max_length is not None and len(lengths) and int(lengths.max()) > f.max_length:
            return None
        offsets = pa.array(rel, type=pa.int64())
        bag = pa.LargeListArray.from_arrays(offsets, child)
        if not (f.kind == "sequence" and self._seq_ts):
            return bag, None
        if not f.timestamps_column:
            return bag, pa.LargeListArray.from_arrays(offsets, pa.array(np.zeros(len(v), np.int64)))
        col = f.timestamps_column
        if col not in names:
            return None
        ts = decode(column(table, col))
        if not is_listlike(ts.type) or ts.null_count:
            return None
        t_off, t_child = list_parts(ts)
        if t_child.type != pa.int64() or not np.array_equal(t_off - t_off[0], rel):
            return None
        t_child = t_child.slice(int(t_off[0]), int(t_off[-1] - t_off[0]))
        if t_child.null_count:
            return None
        return bag, pa.LargeListArray.from_arrays(offsets, t_child)

    @staticmethod
    def _check_range(ids, f: FeatureSpec, col, err, rel, val_keep) -> np.ndarray:
        if len(ids) == 0:
            return ids
        n_emb = f.num_embeddings
        if val_keep is None and int(ids.min()) >= 0 and int(ids.max()) < n_emb:
            return ids
        oob = (ids < 0) | (ids >= n_emb)
        if val_keep is not None:
            oob &= val_keep
        if not oob.any():
            return ids
        if f.oov == "hash":
            return np.where(oob, hash_to_range(ids, n_emb), ids)
        pos = first_true(oob)
        row = int(np.searchsorted(rel, pos, side="right") - 1)
        v = int(ids[pos])
        why = f"negative id {v}" if v < 0 else f"id {v} is out of range [0, {n_emb})"
        raise err(f"{why} in {f.kind} feature {f.name!r} (oov: error; set oov: hash to hash such ids into range, "
                  f"or raise num_embeddings)", col, row)

    def _timestamps(self, table, f, rel, lengths, keep_rows, names, err) -> np.ndarray:
        col = f.timestamps_column
        if col not in names:
            if keep_rows.any():
                raise err(f"missing timestamps column of sequence feature {f.name!r}", col, first_true(keep_rows))
            return np.zeros(int(rel[-1]), dtype=np.int64)
        arr = decode(column(table, col))
        if not is_listlike(arr.type):
            raise err(f"timestamps of sequence feature {f.name!r} must be a list column, got {arr.type}", col, None)
        offsets, child = list_parts(arr)
        child = decode(child)
        t_len = np.diff(offsets)
        if arr.null_count:
            t_len = np.where(valid_mask(arr), t_len, -1)
        mismatch = keep_rows & (t_len != lengths)
        if mismatch.any():
            i = first_true(mismatch)
            raise err(f"timestamps of sequence feature {f.name!r} have {max(int(t_len[i]), 0) if t_len[i] >= 0 else 'null'} "
                      f"entries but the sequence has {int(lengths[i])}", col, i)
        start = int(offsets[0])
        child = child.slice(start, int(offsets[-1]) - start)
        if child.null_count:
            raise err(f"null timestamp inside sequence feature {f.name!r}", col, None)
        secs = self._seconds(child, col, err)
        # align to the sequence's value positions (rows without the feature may differ in length)
        if np.array_equal(offsets - start, rel):
            return secs
        out = np.zeros(int(rel[-1]), dtype=np.int64)
        rows = np.nonzero(keep_rows)[0]
        src = np.repeat(offsets[rows] - start, lengths[rows]) + ragged_arange(lengths[rows])
        dst = np.repeat(rel[rows], lengths[rows]) + ragged_arange(lengths[rows])
        out[dst] = secs[src]
        return out

    def _label_column(self, table, t: TaskSpec, present, names, err, user, item, ts):
        n = table.num_rows
        col = t.source
        no_window = pa.array(np.full(n, -1, dtype=np.int64))
        if col not in names:
            if present.any():
                raise err(f"missing label column of task {t.name!r}", col, first_true(present))
            return pa.nulls(n, type=pa.float32()), no_window
        arr = decode(column(table, col))
        ty = arr.type
        if t.kind == "binary" and not t.windows and is_int(ty) and not arr.null_count and n and present.all():
            v = primitive_view(arr)  # integers: finite; 0/1 checked by range
            if int(v.min()) >= 0 and int(v.max()) <= 1:
                return pa.array(v.astype(np.float32), type=pa.float32()), no_window
        if pa.types.is_floating(ty) or is_int(ty):
            vals = primitive_view(arr).astype(np.float64)
        elif pa.types.is_boolean(ty):
            vals = np.asarray(arr.fill_null(False).to_numpy(zero_copy_only=False), dtype=np.float64)
        elif pa.types.is_null(ty):
            vals = np.zeros(n)
        else:
            raise err(f"label of task {t.name!r} must be numeric or boolean, got {ty}", col, None)
        keep = present & valid_mask(arr)
        bad = keep & ~np.isfinite(vals)
        if bad.any():
            i = first_true(bad)
            raise err(f"label of task {t.name!r} is {vals[i]!r} (not finite)", col, i)
        if t.kind == "binary":
            bad = keep & (vals != 0) & (vals != 1)
            if bad.any():
                i = first_true(bad)
                raise err(f"label {vals[i]!r} of binary task {t.name!r} is not 0 or 1", col, i)
        window = no_window
        if t.windows:
            delay = self._delays(table, t, keep & (vals == 1), names, err)
            if self.zipper == "assign":
                w = _zipper.assign_windows(user, item, ts, [x.probability for x in t.windows], seed=self.zipper_seed)
            else:
                w = np.full(n, len(t.windows) - 1, dtype=np.int64)
            vals = _zipper.window_labels(vals, delay, np.array([x.seconds for x in t.windows], np.float64), w)
            window = pa.array(w, type=pa.int64())
        v32 = np.where(keep, vals, 0).astype(np.float32)
        return pa.array(v32, type=pa.float32(), mask=~keep), window

    def _delays(self, table, t: TaskSpec, positive, names, err) -> np.ndarray:
        col = t.delay_column
        n = table.num_rows
        if col not in names:
            if positive.any():
                raise err(f"missing delay column of windowed task {t.name!r}", col, first_true(positive))
            return np.full(n, np.inf)
        arr = decode(column(table, col))
        if not (pa.types.is_floating(arr.type) or is_int(arr.type) or pa.types.is_duration(arr.type)):
            raise err(f"delay column of task {t.name!r} must be numeric seconds, got {arr.type}", col, None)
        if pa.types.is_duration(arr.type):
            arr = arr.cast(pa.duration("s"), safe=False).cast(pa.int64())
        d = primitive_view(arr).astype(np.float64)
        valid = valid_mask(arr)
        bad = positive & ~valid
        if bad.any():
            raise err(f"positive label of windowed task {t.name!r} without a delay", col, first_true(bad))
        bad = positive & ~(np.isfinite(d) & (d >= 0))
        if bad.any():
            i = first_true(bad)
            raise err(f"delay {d[i]!r} of task {t.name!r} must be finite and >= 0", col, i)
        return np.where(positive, d, np.inf)

    def _truth_column(self, table, t: TaskSpec, names, err) -> pa.Array:
        col = TRUTH_PREFIX + t.name
        n = table.num_rows
        if col not in names:
            return pa.nulls(n, type=pa.float32())
        arr = decode(column(table, col))
        if not (pa.types.is_floating(arr.type) or is_int(arr.type)):
            raise err(f"true-probability column must be numeric, got {arr.type}", col, None)
        if arr.type == pa.float32() and not arr.null_count and len(arr):
            v = primitive_view(arr)
            if v.min() >= 0 and v.max() <= 1:  # NaN fails both: the general path names it
                return arr
        v = primitive_view(arr).astype(np.float64)
        valid = valid_mask(arr)
        bad = valid & ~((v >= 0) & (v <= 1))
        if bad.any():
            i = first_true(bad)
            raise err(f"true probability {v[i]!r} is outside [0, 1]", col, i)
        return pa.array(np.where(valid, v, 0).astype(np.float32), type=pa.float32(), mask=~valid)

    # ---- step 2: prepared table -> Batch ---------------------------------------------------------
    @property
    def block_spec(self) -> BlockSpec:
        if self._block_spec is None:
            s = self.schema
            self._block_spec = BlockSpec(
                dense=["f:" + f.name for f in self._dense], sparse=["f:" + f.name for f in self._sparse],
                seq=["f:" + f.name for f in self._seq],
                seq_ts=["ts:" + f.name for f in self._seq] if self._seq_ts else [],
                tasks=[t.name for t in s.tasks], truth=self.truth,
                sparse_keys=[f.name for f in self._sparse], seq_keys=[f.name for f in self._seq],
                sparse_presence=np.ascontiguousarray(self._presence["sparse"]),
                timestamp=s.timestamp_column is not None,
            )
        return self._block_spec

    def block(self, table: pa.Table) -> Block:
        """A prepared table (or any slice/concatenation of prepared tables) as a :class:`Block`, the
        numpy layout batches are cut from (convert a chunk once, then cut many batches from it)."""
        return Block.from_table(table, self.block_spec)

    def assemble(self, segments: Sequence[Tuple[Block, Rows]], shared: Optional[bool] = None) -> Batch:
        """The :class:`Batch` of the concatenated rows of ``segments``: ``(block, (a, b))`` for rows
        ``a..b-1`` of a block, or ``(block, rows)`` with int64 row indices in range (see :func:`assemble`).
        ``shared``: put the batch in shared memory (default: inside a DataLoader worker)."""
        if shared is None:
            shared = get_worker_info() is not None
        return assemble(segments, self.block_spec, shared)

    def build(self, table: pa.Table, rows: Optional[np.ndarray] = None, shared: Optional[bool] = None) -> Batch:
        """A :class:`Batch` from a prepared table (or any slice/concatenation of prepared tables).

        Args:
            table: prepared rows.
            rows: optional ``[B]`` int64 row indices into ``table`` (a shuffled batch).
            shared: put every tensor of the batch in one shared-memory block, so a DataLoader worker hands
                it to the main process without copying each tensor (default: inside a DataLoader worker).

        The per-row tensors are views of one buffer and the jagged parts views of another (two
        allocations per batch); ``.clone()`` a tensor kept long after the step to let its batch go.
        """
        block = self.block(table)
        if rows is None:
            return self.assemble([(block, (0, block.n))], shared)
        sel = np.asarray(rows, dtype=np.int64)
        if len(sel) and (int(sel.min()) < 0 or int(sel.max()) >= block.n):
            bad = int(sel[(sel < 0) | (sel >= block.n)][0])
            raise IndexError(f"row {bad} is out of range for a table of {block.n} rows")
        return self.assemble([(block, sel)], shared)
