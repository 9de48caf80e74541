"""A row-by-row reference of batch building: ``to_pylist`` + a Python loop per row + Python collate.

Slow on purpose, and written independently of :mod:`lattice.data.builder`: the tests compare the
vectorized builder against it, and ``benchmarks/bench_data.py`` uses it as the naive baseline.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import pyarrow as pa
import torch

from lattice.batch import Batch
from lattice.data.builder import EXAMPLE_ID_FILE_SHIFT, TRUTH_PREFIX
from lattice.data.errors import DataError
from lattice.data.hashing import hash_strings, hash_to_range, mix, to_unit_interval
from lattice.data.schema import Schema
from lattice.sparse import KeyedJaggedTensor

__all__ = ["reference_batch"]


def _sid(value, n: Optional[int]) -> int:
    h = int(hash_strings(pa.array([value], type=pa.string()))[0])
    return h % n if n is not None else h & 0x7FFFFFFFFFFFFFFF


def _window(user: int, item: int, ts: int, probs, seed: int) -> int:
    u = float(to_unit_interval(mix(np.array([user]), np.array([item]), np.array([ts]), seed=seed + 0x5A1B))[0])
    acc = 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return len(probs) - 1


def reference_batch(table: pa.Table, schema: Schema, *, domain: Optional[str] = None, file_index: int = 0,
                    row_offset: int = 0, zipper: str = "assign", zipper_seed: int = 0, truth: bool = False,
                    file: str = "<table>") -> Batch:
    """A :class:`Batch` from a raw table, one row at a time (same semantics as the builder)."""
    rows = table.to_pylist()
    B = len(rows)
    dense_f, sparse_f, seq_f = schema.dense_features, schema.sparse_features, schema.sequence_features

    def fail(msg, col, i):
        raise DataError(msg, file=file, column=col, row=row_offset + i)

    def uid(v, col, i):
        if v is None:
            fail("null id", col, i)
        return _sid(v, None) if isinstance(v, (str, bytes)) else int(v)

    dense, dmask, smask = [], [], []
    bags = {f.name: [] for f in sparse_f}
    seqs = {f.name: [] for f in seq_f}
    stamps = {f.name: [] for f in seq_f}
    labels, lmask, lwin, probs = [], [], [], []
    doms, eids, users, items, stamps_row = [], [], [], [], []
    for i, r in enumerate(rows):
        if domain is not None:
            d = schema.domain_index(domain)
        elif schema.domain_column in r and schema.domain_column is not None:
            d = schema.domain_index(str(r[schema.domain_column]))
        else:
            d = 0
        dspec = schema.domains[d]
        doms.append(d)
        eids.append(int(r[schema.example_id_column]) if schema.example_id_column
                    else (file_index << EXAMPLE_ID_FILE_SHIFT) | (row_offset + i))
        user = uid(r[schema.user_id_column], schema.user_id_column, i) if schema.user_id_column else 0
        item = uid(r[schema.item_id_column], schema.item_id_column, i) if schema.item_id_column else 0
        ts = r[schema.timestamp_column] if schema.timestamp_column else 0
        ts = int(ts.timestamp()) if hasattr(ts, "timestamp") else int(ts)
        stamps_row.append(ts)
        users.append(user)
        items.append(item)
        has = (lambda name: dspec.features is None or name in dspec.features)
        drow, mrow = [], []
        for f in dense_f:
            v = r.get(f.source)
            ok = has(f.name) and v is not None
            if ok and math.isnan(float(v)) and schema.nan_policy(f) == "missing":
                ok = False
            if ok and not math.isfinite(float(v)):
                fail("non-finite dense value", f.source, i)
            drow.append(float(np.float32(v)) if ok else 0.0)
            mrow.append(ok)
        dense.append(drow)
        dmask.append(mrow)
        srow = []
        for f in sparse_f + seq_f:
            v = r.get(f.source)
            present = has(f.name)
            ids: List[int] = []
            ts_list: List[int] = []
            if present:
                if isinstance(v, list):
                    ids = list(v)
                    if f.timestamps_column:
                        ts_list = [int(t) for t in r[f.timestamps_column]]
                elif v is None:
                    ftype = table.schema.field(f.source).type
                    if f.kind == "sequence" or pa.types.is_list(ftype) or pa.types.is_large_list(ftype):
                        fail("null list", f.source, i)
                else:
                    ids = [v]
            out = []
            for x in ids:
                if x is None:
                    fail("null id in list", f.source, i)
                if isinstance(x, (str, bytes)):
                    out.append(_sid(x, f.num_embeddings))
                    continue
                x = int(x)
                if x < 0 or x >= f.num_embeddings:
                    if f.oov == "error":
                        fail("id out of range", f.source, i)
                    x = int(hash_to_range(np.array([x]), f.num_embeddings)[0])
                out.append(x)
            if f.max_length is not None and len(out) > f.max_length:
                if f.kind == "sequence":
                    out, ts_list = out[-f.max_length:], ts_list[-f.max_length:]
                else:
                    out = out[: f.max_length]
            if f.kind == "sparse":
                bags[f.name].append(out)
                srow.append(present)
            else:
                seqs[f.name].append(out)
                stamps[f.name].append(ts_list if f.timestamps_column else [0] * len(out))
        smask.append(srow)
        lrow, mrow, wrow, prow = [], [], [], []
        for t in schema.tasks:
            v = r.get(t.source)
            ok = (dspec.tasks is None or t.name in dspec.tasks) and v is not None
            y = float(v) if ok else 0.0
            if ok and not math.isfinite(y):
                fail("non-finite label", t.source, i)
            if ok and t.kind == "binary" and y not in (0.0, 1.0):
                fail("label not 0/1", t.source, i)
            w = -1
            if t.windows:
                w = (_window(user, item, ts, [x.probability for x in t.windows], zipper_seed) if zipper == "assign"
                     else len(t.windows) - 1)
                if ok and y == 1.0:
                    delay = r.get(t.delay_column)
                    y = 1.0 if delay is not None and float(delay) <= t.windows[w].seconds else 0.0
            lrow.append(y if ok else 0.0)
            mrow.append(ok)
            wrow.append(w)
            p = r.get(TRUTH_PREFIX + t.name)
            prow.append(float(np.float32(p)) if p is not None else 0.0)
        labels.append(lrow)
        lmask.append(mrow)
        lwin.append(wrow)
        probs.append(prow)

    def kjt(names, source) -> KeyedJaggedTensor:
        values, lengths = [], []
        for n in names:
            for bag in source[n]:
                values.extend(bag)
                lengths.append(len(bag))
        return KeyedJaggedTensor(list(names), torch.tensor(values, dtype=torch.int64),
                                 lengths=torch.tensor(lengths, dtype=torch.int64), stride=B)

    T = len(schema.tasks)
    has_ts = any(f.timestamps_column for f in seq_f)
    return Batch(
        dense=torch.tensor(dense, dtype=torch.float32).reshape(B, len(dense_f)),
        dense_mask=torch.tensor(dmask, dtype=torch.bool).reshape(B, len(dense_f)),
        sparse=kjt([f.name for f in sparse_f], bags),
        sparse_mask=torch.tensor(smask, dtype=torch.bool).reshape(B, len(sparse_f)),
        sequences=kjt([f.name for f in seq_f], seqs),
        sequence_timestamps=kjt([f.name for f in seq_f], stamps) if has_ts else None,
        domain=torch.tensor(doms, dtype=torch.int64),
        labels=torch.tensor(labels, dtype=torch.float32).reshape(B, T),
        label_mask=torch.tensor(lmask, dtype=torch.bool).reshape(B, T),
        label_window=torch.tensor(lwin, dtype=torch.int64).reshape(B, T),
        example_id=torch.tensor(eids, dtype=torch.int64),
        user_id=torch.tensor(users, dtype=torch.int64),
        item_id=torch.tensor(items, dtype=torch.int64),
        true_probs=torch.tensor(probs, dtype=torch.float32).reshape(B, T) if truth else None,
        timestamp=torch.tensor(stamps_row, dtype=torch.int64) if schema.timestamp_column else None,
    )
