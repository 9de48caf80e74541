"""Vectorized Arrow -> Batch building against the row-by-row reference (property tests)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lattice.data import BatchBuilder, ChunkContext, Schema
from lattice.data.hashing import hash_strings, hash_to_range, string_ids
from lattice.data.reference import reference_batch

from _data_utils import assert_batch_equal, simple_schema, simple_table

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def worlds(draw):
    """A random schema and a raw table that satisfies it (nulls, absent features, lists, strings, ...)."""
    n = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n_dom = draw(st.integers(1, 3))
    dense = [f"d{i}" for i in range(draw(st.integers(0, 3)))]
    lists = [f"s{i}" for i in range(draw(st.integers(0, 3)))]
    scalars = [f"c{i}" for i in range(draw(st.integers(0, 2)))]
    strings = [f"t{i}" for i in range(draw(st.integers(0, 1)))]
    seqs = [f"q{i}" for i in range(draw(st.integers(0, 2)))]
    with_ts = draw(st.booleans())
    features = []
    for name in dense:
        features.append(dict(name=name, kind="dense"))
    for name in lists:
        oov = draw(st.sampled_from(["error", "hash"]))
        ml = draw(st.sampled_from([None, 1, 2]))
        features.append(dict(name=name, kind="sparse", num_embeddings=20, oov=oov, max_length=ml))
    for name in scalars:
        features.append(dict(name=name, kind="sparse", num_embeddings=30, oov="hash"))
    for name in strings:
        features.append(dict(name=name, kind="sparse", num_embeddings=17))
    for name in seqs:
        ml = draw(st.sampled_from([None, 3]))
        features.append(dict(name=name, kind="sequence", num_embeddings=40, max_length=ml,
                             timestamps_column=f"{name}_ts" if with_ts else None))
    windowed = draw(st.booleans())
    tasks = [dict(name="y0"), dict(name="r", kind="regression")]
    if windowed:
        tasks.append(dict(name="conv", delay_column="delay", windows=[
            dict(name="short", seconds=100, probability=0.3), dict(name="long", seconds=1000, probability=0.7)]))
    fnames = [f["name"] for f in features]
    domains = []
    for d in range(n_dom):
        subset = None
        if d > 0 and fnames:
            keep = rng.random(len(fnames)) < 0.6
            subset = [f for f, k in zip(fnames, keep) if k]
        tsub = None if d == 0 else [t["name"] for t in tasks if rng.random() < 0.7]
        domains.append(dict(name=f"dom{d}", features=subset, tasks=tsub))
    schema = Schema.from_dict(dict(features=features, tasks=tasks, domains=domains,
                                   user_id_column="user", item_id_column="item"))
    dom_idx = rng.integers(0, n_dom, n)
    presence = {}
    for f in schema.features:
        presence[f.name] = np.array([schema.domain_has_feature(f"dom{d}", f.name) for d in dom_idx])
    cols = {
        "example_id": rng.permutation(10_000)[:n].astype(np.int64),
        "domain": pa.array([f"dom{d}" for d in dom_idx]),
        "user": pa.array([f"user{v}" for v in rng.integers(0, 50, n)]) if draw(st.booleans())
        else pa.array(rng.integers(0, 50, n)),
        "item": pa.array(rng.integers(0, 50, n)),
        "timestamp": pa.array(rng.integers(0, 10**6, n)),
    }
    for name in dense:
        v = rng.normal(size=n)
        cols[name] = pa.array(v, mask=rng.random(n) < 0.2)
    for spec in schema.sparse_features:
        name = spec.name
        if name in lists:
            lens = rng.integers(0, 4, n)
            hi = 20 if spec.oov == "error" else 60
            vals = rng.integers(-5 if spec.oov == "hash" else 0, hi, int(lens.sum()))
            arr = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)),
                                           pa.array(vals))
            # a list may be null only where the row's domain lacks the feature
            null = (~presence[name]) & (rng.random(n) < 0.5)
            cols[name] = pa.array([None if null[i] else arr[i].as_py() for i in range(n)],
                                  type=pa.list_(pa.int64()))
        elif name in scalars:
            cols[name] = pa.array(rng.integers(-10, 100, n), mask=rng.random(n) < 0.2)
        else:
            cols[name] = pa.array([f"v{v}" for v in rng.integers(0, 100, n)], mask=rng.random(n) < 0.2)
    for spec in schema.sequence_features:
        lens = rng.integers(0, 6, n)
        vals = rng.integers(0, 40, int(lens.sum()))
        offs = np.concatenate([[0], np.cumsum(lens)])
        rows = [vals[offs[i]:offs[i + 1]].tolist() for i in range(n)]
        cols[spec.name] = pa.array(rows, type=pa.large_list(pa.int64()))
        if with_ts:
            ts = np.sort(rng.integers(0, 10**6, int(lens.sum())))
            cols[spec.name + "_ts"] = pa.array([ts[offs[i]:offs[i + 1]].tolist() for i in range(n)],
                                               type=pa.list_(pa.int64()))
    cols["y0"] = pa.array(rng.integers(0, 2, n).astype(np.int8), mask=rng.random(n) < 0.2)
    cols["r"] = pa.array(rng.normal(size=n).astype(np.float32))
    if windowed:
        conv = rng.integers(0, 2, n)
        cols["conv"] = pa.array(conv.astype(np.float64), mask=rng.random(n) < 0.1)
        cols["delay"] = pa.array(rng.integers(0, 2000, n).astype(np.float64), mask=conv == 0)
    for t in ("y0", "conv"):
        if t in cols:
            cols["p_" + t] = pa.array(rng.random(n))
    table = pa.table(cols)
    if draw(st.booleans()):  # chunked + sliced input: arrays with non-zero offsets
        pad = simple_pad(table, rng)
        table = pa.concat_tables([pad, table]).slice(pad.num_rows)
    return schema, table


def simple_pad(table: pa.Table, rng) -> pa.Table:
    k = int(rng.integers(1, 4))
    return table.slice(0, min(k, table.num_rows))


@SETTINGS
@given(worlds(), st.sampled_from(["assign", "oracle"]), st.booleans())
def test_build_matches_row_by_row_reference(world, zipper, truth):
    schema, table = world
    builder = BatchBuilder(schema, truth=truth, zipper=zipper, zipper_seed=3)
    prepared = builder.prepare(table, ChunkContext("mem.parquet", row_group=0))
    got = builder.build(prepared)
    want = reference_batch(table, schema, zipper=zipper, zipper_seed=3, truth=truth)
    assert_batch_equal(got, want)


@SETTINGS
@given(worlds(), st.integers(0, 2**31 - 1))
def test_gathered_rows_match_reference(world, seed):
    schema, table = world
    rng = np.random.default_rng(seed)
    builder = BatchBuilder(schema)
    prepared = builder.prepare(table, ChunkContext("mem.parquet"))
    rows = rng.integers(0, table.num_rows, int(rng.integers(1, table.num_rows + 1)))
    got = builder.build(prepared, rows)
    want = reference_batch(table.take(pa.array(rows)), schema)
    assert_batch_equal(got, want)
    # the shared-memory layout DataLoader workers use: same content, two shared blocks (rows, jagged)
    shared = builder.build(prepared, rows, shared=True)
    assert_batch_equal(shared, want)
    assert shared.dense.is_shared() and shared.sparse.values().is_shared()
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(shared.dense) == ptr(shared.labels) == ptr(shared.example_id)
    assert ptr(shared.sparse.values()) == ptr(shared.sequences.offsets()) == ptr(shared.sparse.lengths())
    # a slice of the prepared table (offsets into shared buffers) builds the same as the raw slice
    a = int(rng.integers(0, table.num_rows))
    b = int(rng.integers(a, table.num_rows + 1))
    if b > a:
        assert_batch_equal(builder.build(prepared.slice(a, b - a)), reference_batch(table.slice(a, b - a), schema))


@SETTINGS
@given(worlds(), st.integers(0, 2**31 - 1))
def test_segments_across_chunks_match_reference(world, seed):
    """Batches cut from several prepared chunks (the reader's straddling batches and shuffle windows):
    chunks may lay a feature out differently (one id per row in one, lists or nulls in another)."""
    schema, table = world
    rng = np.random.default_rng(seed)
    n = table.num_rows
    cuts = sorted(rng.choice(np.arange(1, n), size=min(2, n - 1), replace=False).tolist()) if n > 1 else []
    bounds = list(zip([0, *cuts], [*cuts, n]))
    builder = BatchBuilder(schema)
    blocks = [builder.block(builder.prepare(table.slice(a, b - a), ChunkContext("mem.parquet", row_offset=a)))
              for a, b in bounds]
    lo = int(rng.integers(0, n))
    hi = int(rng.integers(lo + 1, n + 1))
    segments = [(blk, (max(a, lo) - a, min(b, hi) - a)) for blk, (a, b) in zip(blocks, bounds) if min(b, hi) > max(a, lo)]
    assert_batch_equal(builder.assemble(segments), reference_batch(table.slice(lo, hi - lo), schema))
    rows = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)).astype(np.int64)
    segments = [(blk, rows[(rows >= a) & (rows < b)] - a) for blk, (a, b) in zip(blocks, bounds)]
    segments = [(blk, r) for blk, r in segments if len(r)]
    want = reference_batch(table.take(pa.array(rows)), schema)
    assert_batch_equal(builder.assemble(segments), want)
    assert_batch_equal(builder.assemble(segments, shared=True), want)


def test_batch_layout_and_dtypes():
    schema = simple_schema()
    table = simple_table(50)
    builder = BatchBuilder(schema)
    batch = builder.build(builder.prepare(table, ChunkContext("t")))
    B = 50
    assert batch.batch_size == B
    assert batch.dense.shape == (B, 2) and batch.dense.dtype == torch.float32
    assert batch.sparse.keys() == ["u", "tags"] and batch.sparse.stride() == B
    assert batch.sequences.keys() == ["hist"]
    assert batch.sparse.offsets().dtype == torch.int64 and batch.sparse.values().dtype == torch.int64
    assert batch.sparse.offsets().shape == (2 * B + 1,)
    assert batch.labels.shape == (B, 2) and batch.label_window.eq(-1).all()
    # domain b lacks tags, y and the regression task: absent, never zero-filled as present
    in_b = batch.domain == 1
    assert not batch.sparse_mask[in_b, 1].any() and batch.sparse_mask[~in_b].all()
    assert not batch.dense_mask[in_b, 1].any()
    assert not batch.label_mask[in_b, 1].any()
    tags = batch.sparse["tags"].lengths()
    assert tags[in_b].eq(0).all()
    # each row's event time, as read from the timestamp column (never a feature)
    assert batch.timestamp.dtype == torch.int64
    assert batch.timestamp.tolist() == table.column("timestamp").to_pylist()
    assert torch.equal(batch.select_rows(torch.tensor([3, 0])).timestamp, batch.timestamp[[3, 0]])
    # pin/to keep everything
    moved = batch.to("cpu")
    assert torch.equal(moved.dense, batch.dense)


def test_sequence_truncation_keeps_most_recent():
    schema = Schema.from_dict(dict(
        features=[dict(name="h", kind="sequence", num_embeddings=10, max_length=2, timestamps_column="ts"),
                  dict(name="s", kind="sparse", num_embeddings=10, max_length=2)],
        tasks=[dict(name="y")], example_id_column=None, domain_column=None, user_id_column=None,
        item_id_column=None, timestamp_column=None))
    table = pa.table({"h": [[1, 2, 3], [4], []], "ts": [[10, 20, 30], [40], []], "s": [[1, 2, 3], [4], []],
                      "y": [1, 0, 1]})
    b = BatchBuilder(schema)
    batch = b.build(b.prepare(table, ChunkContext("t")))
    assert [x.tolist() for x in batch.sequences["h"].to_dense()] == [[2, 3], [4], []]
    assert [x.tolist() for x in batch.sequence_timestamps["h"].to_dense()] == [[20, 30], [40], []]
    assert [x.tolist() for x in batch.sparse["s"].to_dense()] == [[1, 2], [4], []]
    # derived example ids: (file index << 40) | row
    assert batch.example_id.tolist() == [0, 1, 2]


def test_hash_strings_is_stable_and_layout_independent():
    values = ["", "a", "ab", "U479610", "北京", None, "a" * 300]
    arr = pa.array(values)
    h = hash_strings(arr)
    # the same strings in other layouts: large_string, dictionary, sliced, chunk-combined
    assert np.array_equal(hash_strings(arr.cast(pa.large_string())), h)
    assert np.array_equal(hash_strings(arr.dictionary_encode()), h)
    assert np.array_equal(hash_strings(pa.array(["x", "y"] + values).slice(2)), h)
    assert h[0] == h[5]  # null hashes like the empty string
    assert len(set(h[:5].tolist())) == 5
    one = [int(hash_strings(pa.array([v], type=pa.string()))[0]) for v in values]
    assert one == h.tolist()
    assert hash_strings(pa.nulls(2)).tolist() == [h[0], h[0]]
    # pinned: a change would silently remap every hashed id a saved model was trained with
    assert int(hash_strings(pa.array(["U479610"]))[0]) == 1836854426834743711
    ids = string_ids(arr, 17)
    assert ids.min() >= 0 and ids.max() < 17


def test_hash_to_range_maps_into_range():
    v = np.array([-5, -1, 0, 7, 10**12, -(2**62)])
    h = hash_to_range(v, 13)
    assert h.min() >= 0 and h.max() < 13
    assert np.array_equal(h, hash_to_range(v, 13))


def test_empty_sequences_and_no_sequence_features():
    schema = Schema.from_dict(dict(features=[dict(name="x", kind="dense")], tasks=[dict(name="y")],
                                   example_id_column=None, domain_column=None, user_id_column=None,
                                   item_id_column=None, timestamp_column=None))
    table = pa.table({"x": [1.0, 2.0], "y": [0, 1]})
    b = BatchBuilder(schema)
    batch = b.build(b.prepare(table, ChunkContext("t")))
    assert batch.sparse.keys() == [] and batch.sequences.keys() == []
    assert batch.sparse.stride() == 2 and batch.sequence_timestamps is None
    assert batch.timestamp is None  # no timestamp column in the schema
    assert batch.sparse_mask.shape == (2, 0)


def test_build_rejects_out_of_range_rows():
    import pytest

    schema = simple_schema()
    b = BatchBuilder(schema)
    prepared = b.prepare(simple_table(5), ChunkContext("t"))
    for rows in ([0, 5], [-1, 2]):
        with pytest.raises(IndexError, match="out of range"):
            b.build(prepared, np.array(rows))
    assert b.build(prepared, np.array([4, 4, 0])).example_id.tolist() == [4, 4, 0]
