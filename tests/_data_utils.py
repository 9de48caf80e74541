"""Shared helpers of the data tests (not a test module)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lattice.data import Batch, Schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


def kjt_parts(kjt):
    return list(kjt.keys()), kjt.stride(), kjt.lengths().tolist(), kjt.values().tolist()


def assert_batch_equal(a: Batch, b: Batch, *, check_truth: bool = True) -> None:
    """Every field of two batches equal (KeyedJaggedTensors by keys, lengths and values)."""
    for name in ("dense", "dense_mask", "sparse_mask", "domain", "labels", "label_mask", "label_window",
                 "example_id", "user_id", "item_id"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
        assert x.shape == y.shape, (name, x.shape, y.shape)
        assert torch.equal(x, y), (name, x, y)
    for name in ("sparse", "sequences"):
        assert kjt_parts(getattr(a, name)) == kjt_parts(getattr(b, name)), name
    assert (a.sequence_timestamps is None) == (b.sequence_timestamps is None)
    assert (a.timestamp is None) == (b.timestamp is None)
    if a.timestamp is not None:
        assert a.timestamp.dtype == b.timestamp.dtype == torch.int64
        assert torch.equal(a.timestamp, b.timestamp), ("timestamp", a.timestamp, b.timestamp)
    if a.sequence_timestamps is not None:
        assert kjt_parts(a.sequence_timestamps) == kjt_parts(b.sequence_timestamps)
    if check_truth:
        assert (a.true_probs is None) == (b.true_probs is None)
        if a.true_probs is not None:
            assert torch.equal(a.true_probs, b.true_probs)


def simple_schema(**overrides) -> Schema:
    d = dict(
        features=[
            dict(name="u", kind="sparse", num_embeddings=1000),
            dict(name="tags", kind="sparse", num_embeddings=50),
            dict(name="x", kind="dense"),
            dict(name="y", kind="dense"),
            dict(name="hist", kind="sequence", num_embeddings=100, timestamps_column="hist_ts"),
        ],
        tasks=[dict(name="click"), dict(name="dwell", kind="regression")],
        domains=[dict(name="a"), dict(name="b", features=["u", "x", "hist"], tasks=["click"])],
    )
    d.update(overrides)
    return Schema.from_dict(d)


def simple_table(n: int, seed: int = 0, start: int = 0) -> pa.Table:
    """Rows for :func:`simple_schema` (example ids ``start .. start+n-1``)."""
    rng = np.random.default_rng(seed)
    dom = np.where(rng.random(n) < 0.7, "a", "b")
    lens = rng.integers(0, 4, n)
    tags = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)),
                                    pa.array(rng.integers(0, 50, int(lens.sum()))))
    slen = rng.integers(0, 6, n)
    offs = pa.array(np.concatenate([[0], np.cumsum(slen)]).astype(np.int32))
    hist = pa.ListArray.from_arrays(offs, pa.array(rng.integers(0, 100, int(slen.sum()))))
    hist_ts = pa.ListArray.from_arrays(offs, pa.array(np.sort(rng.integers(0, 10**6, int(slen.sum())))))
    x = rng.normal(size=n)
    return pa.table({
        "example_id": np.arange(start, start + n, dtype=np.int64),
        "domain": dom,
        "user_id": rng.integers(0, 1000, n),
        "item_id": rng.integers(0, 500, n),
        "timestamp": rng.integers(0, 10**6, n),
        "u": pa.array([[int(v)] for v in rng.integers(0, 1000, n)]),
        "tags": tags,
        "x": pa.array(x, mask=rng.random(n) < 0.1),
        "y": rng.normal(size=n),
        "hist": hist,
        "hist_ts": hist_ts,
        "click": pa.array(rng.integers(0, 2, n).astype(np.float64), mask=rng.random(n) < 0.1),
        "dwell": rng.exponential(size=n),
    })


def write_parquet(table: pa.Table, path: str, row_group_size: int) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def collect_ids(batches) -> np.ndarray:
    ids = [b.example_id.numpy() for b in batches]
    return np.concatenate(ids) if ids else np.zeros(0, np.int64)
