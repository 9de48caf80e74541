"""HistoryMatch: exact candidate-in-history matches against a per-sample Python reference, its stats and
tokens, and its wiring through FeatureProcessor and the networks."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from _models import make_schema, random_batch
from lattice.models import InterFormer, LatticeNetwork, SharedBottom
from lattice.nn.match import HistoryMatch, match_pairs
from lattice.nn.processors import FeatureProcessor
from lattice.sparse import KeyedJaggedTensor

pytestmark = pytest.mark.usefixtures("single_thread")


def _kjt(keys, bags):
    """``bags[k][b]``: the id list of key k, sample b."""
    lengths = [len(bag) for per_key in bags for bag in per_key]
    values = [x for per_key in bags for bag in per_key for x in bag]
    return KeyedJaggedTensor(keys, torch.tensor(values, dtype=torch.long), lengths=torch.tensor(lengths, dtype=torch.long))


def _reference(pairs, seq_names, sparse_names, seq_bags, sparse_bags):
    """Per pair: per-event match flags (key-major), and per-sample (any, log1p(count), 1/(1+recency))."""
    flags, stats = [], []
    for s, c, _ in pairs:
        si, ci = seq_names.index(s), sparse_names.index(c)
        f, st_p = [], []
        for k, per_key in enumerate(seq_bags):
            for b, bag in enumerate(per_key):
                for x in bag:
                    f.append(k == si and x in sparse_bags[ci][b])
        for b, hist in enumerate(seq_bags[si]):
            hits = [len(hist) - 1 - i for i, x in enumerate(hist) if x in sparse_bags[ci][b]]
            n = len(hits)
            st_p.append([float(n > 0), math.log1p(n), 1.0 / (1.0 + min(hits)) if hits else 0.0])
        flags.append(f)
        stats.append(st_p)
    return flags, stats


def _bags(draw, n_keys, batch, rows, max_len):
    return [[draw(st.lists(st.integers(0, rows - 1), max_size=max_len)) for _ in range(batch)] for _ in range(n_keys)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), batch=st.integers(1, 6), rows=st.integers(1, 6))
def test_matches_and_stats_equal_a_per_sample_reference(data, batch, rows):
    seq_names, sparse_names = ["hist", "other_hist"], ["user", "item", "tags"]
    seq_bags = _bags(data.draw, 2, batch, rows, 7)  # empty histories included
    sparse_bags = _bags(data.draw, 3, batch, rows, 3)  # empty and multi-id candidate bags included
    pairs = [("hist", "item", rows), ("hist", "tags", rows), ("other_hist", "item", rows)]
    match = HistoryMatch(pairs, seq_names, sparse_names, dim=4).double()
    sequences, sparse = _kjt(seq_names, seq_bags), _kjt(sparse_names, sparse_bags)
    flags, stats = _reference(pairs, seq_names, sparse_names, seq_bags, sparse_bags)
    assert match.matches(sparse, sequences).tolist() == flags
    # with offset_per_key known (as the loader's batches carry it), each pair searches its own keys only
    synced = _kjt(seq_names, seq_bags).sync(), _kjt(sparse_names, sparse_bags).sync()
    assert match.matches(synced[1], synced[0]).tolist() == flags
    # stats recovered from the tokens: tokens = stats @ W_p + b_p with an invertible W_p
    with torch.no_grad():
        match.weight.copy_(torch.eye(3, 4, dtype=torch.float64).expand(3, 3, 4))
        match.bias.zero_()
    tokens, event_bias = match(sparse, sequences)
    assert tokens.shape == (batch, 3, 4)
    got = tokens[..., :3].transpose(0, 1)
    assert torch.allclose(got, torch.tensor(stats, dtype=torch.float64))
    expected_bias = torch.tensor(flags, dtype=torch.float64).T @ match.event_vector
    assert torch.allclose(event_bias, expected_bias)
    tokens_synced, event_bias_synced = match(synced[1], synced[0])
    assert torch.equal(tokens_synced, tokens) and torch.equal(event_bias_synced, event_bias)


def test_empty_batch_of_events_and_candidates():
    match = HistoryMatch([("hist", "item", 10)], ["hist"], ["item"], dim=3)
    sequences, sparse = _kjt(["hist"], [[[], []]]), _kjt(["item"], [[[], []]])
    for seq, cand in ((sequences, sparse), (sequences.sync(), sparse.sync())):
        tokens, event_bias = match(cand, seq)
        assert tokens.shape == (2, 1, 3) and event_bias.shape == (0, 3)
        assert torch.allclose(tokens, match.bias.expand(2, 1, 3))


def test_bad_pairs_and_keys_are_named():
    with pytest.raises(ValueError, match="none"):
        HistoryMatch([], ["hist"], ["item"], dim=3)
    with pytest.raises(ValueError, match="'nope' is not a sparse feature"):
        HistoryMatch([("hist", "nope", 5)], ["hist"], ["item"], dim=3)
    match = HistoryMatch([("hist", "item", 5)], ["hist"], ["item"], dim=3)
    with pytest.raises(ValueError, match="built for sequences"):
        match(_kjt(["item"], [[[1]]]), _kjt(["other"], [[[1]]]))


def test_pairs_come_from_shared_tables():
    schema = make_schema()
    assert match_pairs(schema) == [("q0", "s0", 50)]


def test_feature_processor_appends_match_tokens_and_marks_events():
    torch.manual_seed(0)
    schema = make_schema()
    plain = FeatureProcessor(schema, dim=8)
    proc = FeatureProcessor(schema, dim=8, history_match=True)
    assert proc.num_tokens == plain.num_tokens + 1
    assert proc.token_slices["match"] == slice(plain.num_tokens, plain.num_tokens + 1)
    assert proc.flops(10.0) > plain.flops(10.0)
    batch = random_batch(schema, 16)
    seq, sparse = batch.sequences, batch.sparse
    out = proc(batch)
    assert out.tokens.shape == (16, proc.num_tokens, 8)
    (out.tokens.square().sum() + out.sequence.values.square().sum()).backward()
    assert proc.match.weight.grad is not None and proc.match.bias.grad is not None
    flags = proc.match.matches(sparse, seq)
    if flags.any():
        assert proc.match.event_vector.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no|none"):
        FeatureProcessor(make_schema(num_sequences=0), dim=8, history_match=True)


def test_the_match_token_tells_a_repeat_from_a_non_repeat():
    """Same sample twice, once with the candidate swapped into the history: only the match token and
    the marked event change."""
    schema = make_schema(num_domains=1)
    proc = FeatureProcessor(schema, dim=8, history_match=True).eval()
    keys_sparse = [f.name for f in schema.sparse_features]
    keys_seq = [f.name for f in schema.sequence_features]
    cand = 7

    def batch_with(history):
        b = random_batch(schema, 1, seed=3)
        sparse_bags = [[[cand]] if k == "s0" else [[1]] for k in keys_sparse]
        seq_bags = [[history] if k == "q0" else [[2, 3]] for k in keys_seq]
        b.sparse = _kjt(keys_sparse, sparse_bags)
        b.sparse_mask = torch.ones_like(b.sparse_mask)
        b.sequences = _kjt(keys_seq, seq_bags)
        b.sequence_timestamps = _kjt(keys_seq, [[list(range(len(bags[0])))] for bags in seq_bags])
        return b

    with torch.no_grad():
        hit, miss = proc(batch_with([4, cand, 5])), proc(batch_with([4, 6, 5]))
    m = proc.token_slices["match"]
    assert not torch.allclose(hit.tokens[:, m], miss.tokens[:, m])
    rest = [i for i in range(proc.num_tokens) if not m.start <= i < m.stop]
    assert torch.allclose(hit.tokens[:, rest], miss.tokens[:, rest])


@pytest.mark.parametrize("network", [LatticeNetwork, InterFormer, SharedBottom])
def test_networks_take_history_match(network):
    torch.manual_seed(0)
    schema = make_schema()
    model = network(schema, dim=8, history_match=True)
    assert model.processor.match is not None
    out = model(random_batch(schema, 8))
    assert torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    assert model.processor.match.weight.grad is not None
