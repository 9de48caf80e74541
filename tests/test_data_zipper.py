"""Lattice Zipper: deterministic window assignment and label semantics."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lattice.data import BatchBuilder, ChunkContext, LatticeDataLoader, ParquetBatchDataset, Schema
from lattice.data.zipper import assign_windows, window_labels

from _data_utils import write_parquet

PROBS = [0.2, 0.3, 0.5]
SECONDS = np.array([5400.0, 86400.0, 604800.0])


def test_assignment_is_deterministic_and_follows_probabilities():
    rng = np.random.default_rng(0)
    n = 200_000
    u, i, t = rng.integers(0, 10**6, n), rng.integers(0, 10**5, n), rng.integers(0, 10**9, n)
    w = assign_windows(u, i, t, PROBS)
    assert w.dtype == np.int64 and w.min() >= 0 and w.max() <= 2
    assert np.array_equal(w, assign_windows(u.copy(), i.copy(), t.copy(), PROBS))
    share = np.bincount(w, minlength=3) / n
    assert np.allclose(share, PROBS, atol=0.01)
    # a row's window depends only on the row: any subset / order gives the same windows
    perm = rng.permutation(n)[:1000]
    assert np.array_equal(assign_windows(u[perm], i[perm], t[perm], PROBS), w[perm])
    # another seed, another (independent) assignment
    other = assign_windows(u, i, t, PROBS, seed=1)
    assert (other != w).mean() > 0.4
    with pytest.raises(ValueError):
        assign_windows(u, i, t, [0.5, 0.6])


def test_window_labels():
    label = np.array([1, 1, 1, 1, 0, 0])
    delay = np.array([100.0, 6000.0, 6000.0, 90000.0, np.inf, 50.0])
    window = np.array([0, 0, 1, 1, 0, 2])
    # late conversions are negatives under a short window; a negative stays negative
    assert window_labels(label, delay, SECONDS, window).tolist() == [1, 0, 1, 0, 0, 0]
    # exactly at the window edge counts
    assert window_labels(np.array([1]), np.array([5400.0]), SECONDS, np.array([0])).tolist() == [1]


def _schema():
    return Schema.from_dict(dict(
        features=[dict(name="x", kind="dense")],
        tasks=[dict(name="click"), dict(name="conv", delay_column="delay", windows=[
            dict(name="90min", seconds=5400, probability=0.2), dict(name="1d", seconds=86400, probability=0.3),
            dict(name="7d", seconds=604800, probability=0.5)])],
        domain_column=None))


def _table(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    conv = (rng.random(n) < 0.3).astype(np.int8)
    delay = np.exp(rng.normal(9, 2, n))
    return pa.table({
        "example_id": np.arange(n), "user_id": rng.integers(0, 100, n), "item_id": rng.integers(0, 100, n),
        "timestamp": rng.integers(0, 10**6, n), "x": rng.normal(size=n), "click": rng.integers(0, 2, n),
        "conv": conv, "delay": pa.array(np.minimum(delay, 604800.0), mask=conv == 0),
    })


def test_batch_carries_window_and_label_under_it():
    schema, table = _schema(), _table()
    b = BatchBuilder(schema)
    batch = b.build(b.prepare(table, ChunkContext("t")))
    w = batch.label_window[:, 1].numpy()
    assert batch.label_window[:, 0].eq(-1).all()
    want_w = assign_windows(table["user_id"].to_numpy(), table["item_id"].to_numpy(), table["timestamp"].to_numpy(),
                            [0.2, 0.3, 0.5])
    assert np.array_equal(w, want_w)
    conv = table["conv"].to_numpy()
    delay = table["delay"].to_numpy(zero_copy_only=False)
    want = (conv == 1) & (np.nan_to_num(delay, nan=np.inf) <= SECONDS[w])
    assert np.array_equal(batch.labels[:, 1].numpy(), want.astype(np.float32))
    assert batch.label_mask[:, 1].all()
    # shorter windows see fewer positives
    rate = [batch.labels[w == k, 1].mean().item() for k in range(3)]
    assert rate[0] < rate[1] < rate[2]
    # evaluation ("oracle") mode: every row under the longest window, label = eventual conversion
    ev = BatchBuilder(schema, zipper="oracle")
    eb = ev.build(ev.prepare(table, ChunkContext("t")))
    assert eb.label_window[:, 1].eq(2).all()
    assert np.array_equal(eb.labels[:, 1].numpy(), conv.astype(np.float32))


def test_windows_identical_across_workers_ranks_and_reruns(tmp_path):
    write_parquet(_table(1500, seed=1), str(tmp_path / "z.parquet"), row_group_size=100)

    def windows_by_id(world, workers, shuffle, seed):
        ds = ParquetBatchDataset(str(tmp_path), _schema(), batch_size=64, shuffle=shuffle, seed=seed)
        out = {}
        for r in range(world):
            for w in range(workers):
                for batch in ds.iter_shard(0, r, world, w, workers):
                    out.update(zip(batch.example_id.tolist(), batch.label_window[:, 1].tolist()))
        return out

    a = windows_by_id(1, 1, False, 0)
    assert a == windows_by_id(2, 2, True, 3) == windows_by_id(1, 3, True, 9)
    ds = ParquetBatchDataset(str(tmp_path), _schema(), batch_size=64, shuffle=True)
    got = {}
    for batch in LatticeDataLoader(ds, num_workers=2):
        got.update(zip(batch.example_id.tolist(), batch.label_window[:, 1].tolist()))
    assert got == a
