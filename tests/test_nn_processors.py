"""Feature processors: sparse/dense/sequence tokens, absent features, empty sequences, merging."""
import pytest
import torch

from _models import make_schema, random_batch
from lattice.nn.processors import FeatureProcessor
from lattice.sparse import KeyedJaggedTensor, jagged_positions

pytestmark = pytest.mark.usefixtures("single_thread")


def test_jagged_positions():
    offsets = torch.tensor([0, 3, 3, 5])
    assert jagged_positions(offsets, 5).tolist() == [0, 1, 2, 0, 1]


def test_feature_processor_shapes_and_grads():
    torch.manual_seed(0)
    schema = make_schema()
    proc = FeatureProcessor(schema, dim=16)
    batch = random_batch(schema, 8)
    out = proc(batch)
    n_sparse, n_dense = len(schema.sparse_features), len(schema.dense_features)
    assert proc.num_tokens == n_sparse + n_dense + 1
    assert out.tokens.shape == (8, proc.num_tokens, 16) and out.tokens.dtype == torch.float32
    seq = out.sequence
    lengths = batch.sequences.lengths().view(2, 8).sum(0)
    assert seq.values.shape == (int(lengths.sum()), 16)
    assert torch.equal(seq.lengths, lengths) and seq.lengths[0] == 0
    assert torch.isfinite(out.tokens).all() and torch.isfinite(seq.values).all()
    (out.tokens.square().sum() + seq.values.square().sum()).backward()
    missing = [n for n, p in proc.named_parameters() if p.grad is None]
    assert not missing, missing


def test_absent_features_use_learned_missing_token():
    schema = make_schema()
    proc = FeatureProcessor(schema, dim=8)
    batch = random_batch(schema, 6)
    out = proc(batch).tokens
    n_sparse = len(schema.sparse_features)
    # row 1 has every feature absent
    torch.testing.assert_close(out[1, :n_sparse], proc.sparse.missing)
    torch.testing.assert_close(out[1, n_sparse:-1], proc.dense.missing)
    # changing an absent value changes nothing; a present one does
    batch.dense[1] = 5.0
    torch.testing.assert_close(proc(batch).tokens[1], out[1])


def test_sequence_merge_concat_order_and_shared_table():
    schema = make_schema(num_dense=1, num_sparse=1, num_sequences=2)
    proc = FeatureProcessor(schema, dim=8, max_positions=0, time_buckets=0)
    seq = KeyedJaggedTensor(["q0", "q1"], torch.tensor([1, 2, 3, 4, 5, 6]), lengths=torch.tensor([2, 1, 1, 2]))
    batch = random_batch(schema, 2)
    batch.sequences = seq
    batch.sequence_timestamps = None
    out = proc(batch).sequence
    assert out.offsets.tolist() == [0, 3, 6]
    assert out.positions.tolist() == [0, 1, 2, 0, 1, 2]
    tables = proc.tables
    ebc = tables.collections["sequence"]
    q0 = ebc.embedding_weight(tables.table_of["q0"])[torch.tensor([1, 2, 3])]
    q1 = ebc.embedding_weight(tables.table_of["q1"])[torch.tensor([4, 5, 6])]
    t = proc.sequence.type_embedding
    expected = torch.stack([q0[0] + t[0], q0[1] + t[0], q1[0] + t[1], q0[2] + t[0], q1[1] + t[1], q1[2] + t[1]])
    torch.testing.assert_close(out.values, expected)
    # q0 shares the "item" table with the sparse feature s0: one set of rows serves both
    assert tables.table_of["q0"] == tables.table_of["s0"] == "item"
    assert "s0" in ebc.feature_names


def test_sequence_merge_masknet_needs_parallel_sequences():
    schema = make_schema()
    proc = FeatureProcessor(schema, dim=8, sequence_merge="masknet")
    batch = random_batch(schema, 4)
    with pytest.raises(ValueError, match="equal lengths"):
        proc(batch)
    lens = torch.tensor([0, 2, 1, 3])
    batch.sequences = KeyedJaggedTensor(["q0", "q1"], torch.arange(12) % 7, lengths=torch.cat([lens, lens]))
    batch.sequence_timestamps = KeyedJaggedTensor(["q0", "q1"], torch.arange(12), lengths=torch.cat([lens, lens]))
    out = proc(batch).sequence
    assert out.values.shape == (6, 8) and out.offsets.tolist() == [0, 0, 2, 3, 6]


def test_timestamps_and_positions_change_tokens():
    schema = make_schema()
    proc = FeatureProcessor(schema, dim=8)
    batch = random_batch(schema, 6)
    a = proc(batch).sequence.values
    batch.sequence_timestamps = KeyedJaggedTensor(
        batch.sequence_timestamps.keys(), batch.sequence_timestamps.values() * 0,
        lengths=batch.sequence_timestamps.lengths(),
    )
    b = proc(batch).sequence.values
    assert not torch.allclose(a, b)


def test_dense_grouped_tokens_and_no_sequence_schema():
    schema = make_schema(num_sequences=0)
    proc = FeatureProcessor(schema, dim=8, dense_tokens=2, domain_token=False)
    batch = random_batch(schema, 5)
    out = proc(batch)
    assert out.sequence is None and not proc.has_sequence
    assert out.tokens.shape == (5, len(schema.sparse_features) + 2, 8)


def test_sequence_lookup_with_crossed_shared_tables_and_narrow_tables():
    from lattice.data.schema import FeatureSpec, Schema, TaskSpec

    feats = [
        FeatureSpec(name="s0", kind="sparse", num_embeddings=11, shared_table="cat", embedding_dim=4),
        FeatureSpec(name="s1", kind="sparse", num_embeddings=13, shared_table="item", embedding_dim=4),
        FeatureSpec(name="q0", kind="sequence", num_embeddings=13, shared_table="item", embedding_dim=4),
        FeatureSpec(name="q1", kind="sequence", num_embeddings=11, shared_table="cat", embedding_dim=4),
    ]
    schema = Schema(features=feats, tasks=[TaskSpec(name="click")])
    proc = FeatureProcessor(schema, dim=8, max_positions=0, time_buckets=0)
    ebc = proc.tables.collections["sequence"]
    seq = KeyedJaggedTensor(["q0", "q1"], torch.tensor([12, 0, 5, 10, 3]), lengths=torch.tensor([1, 2, 0, 2]))
    emb = proc.tables.sequence_lookup(seq)
    item, cat = ebc.embedding_weight("item"), ebc.embedding_weight("cat")
    expected = torch.stack([item[12], item[0], item[5], cat[10], cat[3]])
    torch.testing.assert_close(emb, expected)
    # narrow tables are projected to d
    batch = random_batch(schema, 2)
    batch.sequences, batch.sequence_timestamps = seq, None
    out = proc(batch)
    assert out.tokens.shape == (2, 3, 8) and out.sequence.values.shape == (5, 8)


def test_auto_merge_uses_masknet_for_parallel_sequences():
    from lattice.nn.processors import parallel_sequences

    schema = make_schema()
    assert not parallel_sequences(schema.sequence_features)  # q0_ts vs q1_ts
    assert FeatureProcessor(schema, dim=8).sequence.merge == "concat"
    for f in schema.sequence_features:
        f.timestamps_column = "hist_ts"
    assert parallel_sequences(schema.sequence_features)
    assert FeatureProcessor(schema, dim=8).sequence.merge == "masknet"


def test_one_collection_call_per_step_and_consistent_lookups():
    schema = make_schema()
    proc = FeatureProcessor(schema, dim=8)
    calls = {}
    for name, ebc in proc.tables.collections.items():
        ebc.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    batch = random_batch(schema, 6)
    proc(batch)
    assert calls and all(n == 1 for n in calls.values()), calls
    # the combined call returns what separate pooled / unpooled lookups return
    pooled, events = proc.tables(batch.sparse, batch.sequences)
    alone = proc.tables.pooled(batch.sparse)
    for k, p in zip(batch.sparse.keys(), alone):
        torch.testing.assert_close(pooled[k], p)
    torch.testing.assert_close(events, proc.tables.sequence_lookup(batch.sequences))
    ebc = proc.tables.collections["sequence"]
    ids = batch.sequences.values()
    n0 = int(batch.sequences.lengths()[: batch.batch_size].sum())
    torch.testing.assert_close(events[:n0], ebc.embedding_weight("item")[ids[:n0]])
