"""The streaming reader: exactly-once sharding, shuffling, epochs, resume, CSV."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import torch

from lattice.data import DataSource, LatticeDataLoader, ParquetBatchDataset
from lattice.data.dataset import round_robin_take
from lattice.data.reference import reference_batch
from lattice.data.splits import hash_split

from _data_utils import assert_batch_equal, collect_ids, simple_schema, simple_table, write_parquet

N = 1000


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ds")
    # two files with different row group sizes (and a tiny last row group)
    write_parquet(simple_table(600, seed=1, start=0), str(d / "part-0.parquet"), row_group_size=128)
    write_parquet(simple_table(400, seed=2, start=600), str(d / "part-1.parquet"), row_group_size=70)
    return str(d)


def _epoch_ids(ds, epoch, world, workers):
    out = {}
    for r in range(world):
        for w in range(workers):
            out[(r, w)] = collect_ids(ds.iter_shard(epoch, r, world, w, workers))
    return out


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [32, 100])
def test_exactly_once_across_2_workers_x_2_ranks(dataset_dir, shuffle, batch_size):
    ds = ParquetBatchDataset(dataset_dir, simple_schema(), batch_size=batch_size, shuffle=shuffle,
                             shuffle_buffer=200, seed=7)
    assert ds.num_rows == N
    for epoch in (0, 1):
        parts = _epoch_ids(ds, epoch, world=2, workers=2)
        ids = np.concatenate(list(parts.values()))
        assert len(ids) == N
        assert np.array_equal(np.sort(ids), np.arange(N))
        # shards differ by at most one row, ranks yield their declared batch counts
        sizes = [len(v) for v in parts.values()]
        assert max(sizes) - min(sizes) <= 1
        for r in range(2):
            n = sum(len(list(ds.iter_shard(epoch, r, 2, w, 2))) for w in range(2))
            assert n == ds.num_batches(num_workers=2, rank=r, world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_read_ahead_threads_do_not_change_batches(dataset_dir, shuffle):
    """Units decoded by several read-ahead threads (or none) give the very same batches."""
    schema = simple_schema()
    def batches(**kw):
        ds = ParquetBatchDataset(dataset_dir, schema, batch_size=90, shuffle=shuffle, shuffle_buffer=200, seed=3, **kw)
        return [b for r in range(2) for b in ds.iter_shard(1, r, 2, 0, 1)]
    want = batches(readahead=0)
    for kw in (dict(readahead=2, read_threads=1), dict(readahead=3, read_threads=2)):
        got = batches(**kw)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            assert_batch_equal(x, y)


def test_shuffle_is_seeded_and_reshuffles_every_epoch(dataset_dir):
    schema = simple_schema()
    a = ParquetBatchDataset(dataset_dir, schema, batch_size=50, shuffle=True, shuffle_buffer=300, seed=1)
    b = ParquetBatchDataset(dataset_dir, schema, batch_size=50, shuffle=True, shuffle_buffer=300, seed=1)
    c = ParquetBatchDataset(dataset_dir, schema, batch_size=50, shuffle=True, shuffle_buffer=300, seed=2)
    e0 = collect_ids(a.iter_shard(0, 0, 1, 0, 1))
    assert np.array_equal(e0, collect_ids(b.iter_shard(0, 0, 1, 0, 1)))  # deterministic
    assert not np.array_equal(e0, collect_ids(a.iter_shard(1, 0, 1, 0, 1)))  # new epoch, new order
    assert not np.array_equal(e0, collect_ids(c.iter_shard(0, 0, 1, 0, 1)))  # new seed, new order
    assert not np.array_equal(e0, np.arange(N))
    plain = ParquetBatchDataset(dataset_dir, schema, batch_size=50)
    assert np.array_equal(collect_ids(plain.iter_shard(0, 0, 1, 0, 1)), np.arange(N))


def test_batches_equal_reference_of_their_rows(dataset_dir):
    schema = simple_schema()
    table = pa.concat_tables([simple_table(600, seed=1, start=0), simple_table(400, seed=2, start=600)])
    ds = ParquetBatchDataset(dataset_dir, schema, batch_size=64, shuffle=True, shuffle_buffer=256, seed=3)
    for batch in ds.iter_shard(0, 0, 1, 0, 1):
        rows = batch.example_id.numpy()
        want = reference_batch(table.take(pa.array(rows)), schema)
        assert_batch_equal(batch, want)


def test_round_robin_take():
    assert round_robin_take([3, 3], 3) == [2, 1]
    assert round_robin_take([1, 4], 4) == [1, 3]
    assert round_robin_take([2, 0, 5], 7) == [2, 0, 5]
    assert round_robin_take([5, 5], 0) == [0, 0]
    # against a simulation
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 6, rng.integers(1, 5)).tolist()
        n = int(rng.integers(0, sum(counts) + 1))
        taken, left, k = [0] * len(counts), n, 0
        while left:
            for w, c in enumerate(counts):
                if left and taken[w] < c:
                    taken[w] += 1
                    left -= 1
        assert round_robin_take(counts, n) == taken


def test_dataloader_with_workers_reads_everything_once(dataset_dir):
    ds = ParquetBatchDataset(dataset_dir, simple_schema(), batch_size=64, shuffle=True, shuffle_buffer=128)
    loader = LatticeDataLoader(ds, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader)
    ids = collect_ids(batches)
    assert np.array_equal(np.sort(ids), np.arange(N))
    # the second pass is the next epoch: same rows, new order
    ids2 = collect_ids(loader)
    assert np.array_equal(np.sort(ids2), np.arange(N)) and not np.array_equal(ids, ids2)
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("ring_slots", [None, 1, 0])
def test_worker_batches_equal_in_process_batches(dataset_dir, ring_slots):
    """Workers hand batches over through reused shared-memory slots (or fresh blocks when none is free,
    or always with ring_slots=0): every batch arrives intact and stays intact after the slot is reused."""
    schema = simple_schema()
    ds = ParquetBatchDataset(dataset_dir, schema, batch_size=40, shuffle=True, shuffle_buffer=120, seed=2)
    loader = LatticeDataLoader(ds, num_workers=2, ring_slots=ring_slots)
    got = list(loader)  # epoch 0, compared only after every slot has been reused several times
    want = {int(b.example_id[0]): b for w in range(2) for b in ds.iter_shard(0, 0, 1, w, 2)}
    assert len(got) == len(want)
    for b in got:
        assert_batch_equal(b, want[int(b.example_id[0])])
    copied = [not b.sparse.values().is_shared() for b in got]  # copied out of a slot into this process
    if ring_slots is None:
        assert all(copied)
    elif ring_slots == 1:  # a busy slot: that batch came in a fresh block
        assert any(copied)
    else:
        assert not any(copied)


def test_ring_carries_every_field_of_a_joined_batch(dataset_dir):
    """A worker's ring copies whatever memory a batch lies in (the builder's blocks, a teacher join's
    arrays, a weighted KeyedJaggedTensor) and the main process gets an equal batch in its own memory."""
    import dataclasses

    from lattice.data.transfer import RingBatch, WorkerRing, close_rings, open_rings
    from lattice.sparse import KeyedJaggedTensor

    ds = ParquetBatchDataset(dataset_dir, simple_schema(), batch_size=33)
    batch = next(iter(ds.iter_shard(0, 0, 1, 0, 1)))
    s = batch.sparse
    weighted = KeyedJaggedTensor(s.keys(), s.values(), weights=torch.rand(s.values().numel()), lengths=s.lengths(),
                                 stride=s.stride())
    batch = dataclasses.replace(batch, sparse=weighted, teacher_logits=torch.randn(33, 2)[:, 1:],
                                teacher_mask=torch.ones(33, 1, dtype=torch.bool))
    token, conns = open_rings(1)
    try:
        ring = WorkerRing(token, 0, conns[0], slots=1)
        sent = ring.send(batch)
        assert isinstance(sent, RingBatch) and ring.send(batch) is batch  # the only slot is busy
        got = sent.materialize()
        assert_batch_equal(got, batch)
        assert torch.equal(got.sparse.weights(), weighted.weights())
        assert torch.equal(got.teacher_logits, batch.teacher_logits) and got.teacher_logits.stride() == (2, 1)
        assert torch.equal(got.teacher_mask, batch.teacher_mask)
        assert got.dense.untyped_storage().data_ptr() != sent.storage.data_ptr()  # copied out of the slot
        assert isinstance(ring.send(batch), RingBatch)  # the slot came back
    finally:
        close_rings(token)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch(dataset_dir, workers):
    schema = simple_schema()

    def loader():
        ds = ParquetBatchDataset(dataset_dir, schema, batch_size=50, shuffle=True, shuffle_buffer=150, seed=5)
        return LatticeDataLoader(ds, num_workers=workers)

    full = loader()
    list(full)  # epoch 0
    epoch1 = [b.example_id.clone() for b in full]
    first = loader()
    list(first)
    it = iter(first)
    seen = [next(it).example_id.clone() for _ in range(7)]
    state = first.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 7
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.example_id.clone() for b in resumed]
    got = torch.cat(seen + rest).numpy()
    assert len(got) == N and np.array_equal(np.sort(got), np.arange(N))
    assert len(seen) + len(rest) == len(full)
    if workers == 0:  # one stream: the resumed run continues the exact order
        assert all(torch.equal(a, b) for a, b in zip(seen + rest, epoch1))
    else:  # each worker's own stream continues exactly
        assert sorted(map(tuple, (x.tolist() for x in seen + rest))) == sorted(map(tuple, (x.tolist() for x in epoch1)))
    # after the resumed epoch the next one starts fresh
    assert resumed.state_dict() == {**resumed.state_dict(), "epoch": 2, "batches": 0}


def test_resume_refuses_a_changed_layout(dataset_dir):
    schema = simple_schema()
    a = LatticeDataLoader(ParquetBatchDataset(dataset_dir, schema, batch_size=50), num_workers=0)
    it = iter(a)
    next(it)
    state = a.state_dict()
    b = LatticeDataLoader(ParquetBatchDataset(dataset_dir, schema, batch_size=40), num_workers=0)
    with pytest.raises(ValueError, match="batch_size"):
        b.load_state_dict(state)


def test_even_batches_equalizes_ranks(tmp_path):
    write_parquet(simple_table(1003, seed=3), str(tmp_path / "a.parquet"), row_group_size=100)
    ds = ParquetBatchDataset(str(tmp_path), simple_schema(), batch_size=100, even_batches=True)
    counts = [ds.num_batches(num_workers=2, rank=r, world_size=3) for r in range(3)]
    assert len(set(counts)) == 1
    total = sum(len(collect_ids(ds.iter_shard(0, r, 3, w, 2))) for r in range(3) for w in range(2))
    assert total + ds.left_out_rows(3, 2) == 1003


def test_row_filter_splits_are_disjoint_and_complete(dataset_dir):
    schema = simple_schema()
    splits = hash_split(0.2, 0.1, seed=4)
    got = {}
    for name, flt in splits.items():
        ds = ParquetBatchDataset(dataset_dir, schema, batch_size=64, row_filter=flt, shuffle=True)
        got[name] = np.concatenate([collect_ids(ds.iter_shard(0, r, 2, 0, 1)) for r in range(2)])
    allids = np.concatenate(list(got.values()))
    assert np.array_equal(np.sort(allids), np.arange(N))
    assert 0.1 < len(got["val"]) / N < 0.3 and 0.03 < len(got["test"]) / N < 0.2


def test_csv_input(tmp_path):
    table = simple_table(120, seed=9).drop_columns(["tags", "hist", "hist_ts", "u"])
    schema = simple_schema(features=[dict(name="x", kind="dense"), dict(name="y", kind="dense"),
                                     dict(name="user", column="user_id", num_embeddings=1000)],
                           domains=[dict(name="a"), dict(name="b", features=["x", "user"], tasks=["click"])])
    path = tmp_path / "rows.csv"
    pacsv.write_csv(table, str(path))
    ds = ParquetBatchDataset(str(path), schema, batch_size=25)
    batches = list(ds.iter_shard(0, 0, 1, 0, 1))
    assert_batch_equal(
        __import__("lattice.data.builder", fromlist=["x"]).BatchBuilder(schema).build(
            pa.concat_tables([ds.load_unit(ds.plan, i) for i in range(len(ds.plan.units))])),
        reference_batch(pacsv.read_csv(str(path)), schema))
    assert sum(b.batch_size for b in batches) == 120
    # CSV blocks are units: a small block size still reads every row exactly once across shards
    small = ParquetBatchDataset(DataSource(str(path), csv={"block_size": 2048}), schema, batch_size=10)
    assert len(small.plan.units) > 1
    ids = np.concatenate([collect_ids(small.iter_shard(0, r, 2, w, 2)) for r in range(2) for w in range(2)])
    assert np.array_equal(np.sort(ids), np.arange(120))


def test_lazy_consolidation_of_per_domain_sources(tmp_path):
    """Per-domain datasets with different columns: absent features are masked, absent labels masked."""
    schema = simple_schema()
    full = simple_table(300, seed=4)
    a_rows = full.filter(pa.compute.equal(full["domain"], "a")).drop_columns(["domain"])
    b_rows = full.filter(pa.compute.equal(full["domain"], "b")).drop_columns(["domain", "tags", "y", "dwell"])
    write_parquet(a_rows, str(tmp_path / "a" / "x.parquet"), 64)
    write_parquet(b_rows, str(tmp_path / "b" / "x.parquet"), 64)
    ds = ParquetBatchDataset([DataSource(str(tmp_path / "a"), domain="a"), DataSource(str(tmp_path / "b"), domain="b")],
                             schema, batch_size=1000)
    (batch,) = list(ds.iter_shard(0, 0, 1, 0, 1))
    order = np.argsort(batch.example_id.numpy())
    want = reference_batch(full, schema)
    for name in ("dense", "dense_mask", "sparse_mask", "labels", "label_mask", "domain", "example_id"):
        assert torch.equal(getattr(batch, name)[order], getattr(want, name)), name
