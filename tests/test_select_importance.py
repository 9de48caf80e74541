"""Permutation importance on a toy model whose answer is known."""
import math

import numpy as np
import pytest
import torch

from lattice.select.importance import gather_eval_set, permutation_importance, permutation_indices

from _select_batches import ToyModel, toy_world


@pytest.fixture(scope="module")
def world():
    return toy_world(n=3000, batch_size=500, seed=0)


def test_known_answer(world):
    batches, w = world
    model = ToyModel(w)
    res = permutation_importance(model, batches, task_names=["t0", "t1"], dense_names=["d0", "d1"],
                                 repeats=3, seed=0)
    assert res.features == ["d0", "d1", "s0", "s1", "q0"]
    assert res.kinds == ["dense", "dense", "sparse", "sparse", "sequence"]
    ll, auc = res.delta_logloss_mean, res.delta_auc_mean
    f, t = res.feature_index, res.task_index
    # d0 matters for t0 only, s0 for t1 only; features the model ignores move nothing at all
    assert ll[f("d0"), t("t0")] > 0.2 and auc[f("d0"), t("t0")] > 0.2
    assert ll[f("s0"), t("t1")] > 0.1 and auc[f("s0"), t("t1")] > 0.1
    for name in ("d1", "s1", "q0"):
        assert np.all(ll[f(name)] == 0) and np.all(auc[f(name)] == 0)
    assert ll[f("d0"), t("t1")] == 0 and ll[f("s0"), t("t0")] == 0
    assert res.delta_logloss.shape == (3, 5, 2) and res.delta_logloss_std.shape == (5, 2)
    assert res.delta_logloss_std[f("d0"), t("t0")] > 0  # different permutations per repeat
    # one pass for the baseline and one per (feature, repeat), each over the 6 chunks, never per row
    assert model.calls == 6 * (1 + 5 * 3)
    assert res.num_rows == 3000 and not res.truncated
    assert res.labelled_rows.tolist() == [3000, 3000 - len(range(0, 500, 7)) * 6]
    # metric matrix view
    assert np.array_equal(res.matrix("auc"), auc)
    with pytest.raises(ValueError):
        res.matrix("ne")


def test_seeded_and_subset(world):
    batches, w = world
    a = permutation_importance(ToyModel(w), batches, repeats=2, seed=5, features=["d0", "s0"],
                               dense_names=["d0", "d1"])
    b = permutation_importance(ToyModel(w), batches, repeats=2, seed=5, dense_names=["d0", "d1"])
    assert a.features == ["d0", "s0"]
    # a feature's permutations don't depend on which other features are evaluated
    np.testing.assert_array_equal(a.delta_logloss[:, 0], b.delta_logloss[:, 0])
    np.testing.assert_array_equal(a.delta_logloss[:, 1], b.delta_logloss[:, 2])
    c = permutation_importance(ToyModel(w), batches, repeats=2, seed=6, features=["d0"], dense_names=["d0", "d1"])
    assert not np.array_equal(c.delta_logloss[:, 0], a.delta_logloss[:, 0])
    with pytest.raises(KeyError):
        permutation_importance(ToyModel(w), batches, features=["nope"], dense_names=["d0", "d1"])


def _lists(jt):
    return [tuple(x.tolist()) for x in jt.to_dense()]


@pytest.mark.parametrize("within_domain", [True, False])
def test_lists_move_whole_with_masks(world, within_domain):
    batches, w = world
    model = ToyModel(w)
    ev = gather_eval_set(batches)
    orig_s1 = [l for b in batches for l in _lists(b.sparse["s1"])]
    orig_q0 = [l for b in batches for l in _lists(b.sequences["q0"])]
    orig_s1_mask = torch.cat([b.sparse_mask[:, 1] for b in batches])
    orig_d1_mask = torch.cat([b.dense_mask[:, 1] for b in batches])
    domain = torch.cat([b.domain for b in batches])
    model.record = True
    permutation_importance(model, None, eval_set=ev, repeats=1, features=["s1"], dense_names=["d0", "d1"],
                           within_domain=within_domain)
    perm_batches = model.seen[len(batches):]
    assert len(perm_batches) == len(batches)
    new_s1 = [l for b in perm_batches for l in _lists(b.sparse["s1"])]
    new_mask = torch.cat([b.sparse_mask[:, 1] for b in perm_batches])
    # the same multiset of whole lists, really moved, each with its own presence bit
    assert sorted(new_s1) == sorted(orig_s1) and new_s1 != orig_s1
    assert torch.equal(new_mask, torch.tensor([len(l) > 0 for l in new_s1]))
    assert torch.equal(orig_s1_mask, torch.tensor([len(l) > 0 for l in orig_s1]))
    src = [l[0] // 10 if l else None for l in new_s1]  # the row each list came from
    if within_domain:
        assert all(s is None or int(domain[s]) == int(domain[r]) for r, s in enumerate(src))
    # nothing else changed
    for b0, b1 in zip(batches, perm_batches):
        assert torch.equal(b0.sparse["s0"].values(), b1.sparse["s0"].values())
        assert torch.equal(b0.sparse["s0"].lengths(), b1.sparse["s0"].lengths())
        assert torch.equal(b0.dense, b1.dense) and torch.equal(b0.sequences.values(), b1.sequences.values())
        assert torch.equal(b0.sparse_mask[:, 0], b1.sparse_mask[:, 0])

    # a sequence moves with its timestamps
    model.seen.clear()
    permutation_importance(model, None, eval_set=ev, repeats=1, features=["q0"], dense_names=["d0", "d1"],
                           within_domain=within_domain)
    perm_batches = model.seen[len(batches):]
    new_q0 = [l for b in perm_batches for l in _lists(b.sequences["q0"])]
    assert sorted(new_q0) == sorted(orig_q0) and new_q0 != orig_q0
    for b in perm_batches:
        assert torch.equal(b.sequence_timestamps.values(), b.sequences.values() + 7)
        assert torch.equal(b.sequence_timestamps.lengths(), b.sequences.lengths())

    # a dense column moves with its mask (d1 holds the row index where present)
    model.seen.clear()
    permutation_importance(model, None, eval_set=ev, repeats=1, features=["d1"], dense_names=["d0", "d1"],
                           within_domain=within_domain)
    perm_batches = model.seen[len(batches):]
    d1 = torch.cat([b.dense[:, 1] for b in perm_batches])
    m1 = torch.cat([b.dense_mask[:, 1] for b in perm_batches])
    assert int(m1.sum()) == int(orig_d1_mask.sum())
    present_src = d1[m1].long()
    assert torch.all(orig_d1_mask[present_src])  # a present value arrives with its present bit
    assert sorted(present_src.tolist()) == torch.nonzero(orig_d1_mask).flatten().tolist()


def test_max_rows_cap(world):
    batches, w = world
    ev = gather_eval_set(iter(batches), max_rows=1200)
    assert ev.num_rows == 1200 and ev.truncated and len(ev.chunks) == 3
    assert ev.chunks[-1].batch_size == 200 and ev.chunks[-1].sparse.stride() == 200
    res = permutation_importance(ToyModel(w), batches, max_rows=1000, repeats=1, dense_names=["d0", "d1"])
    assert res.num_rows == 1000 and res.truncated
    ev = gather_eval_set(batches, max_rows=None)
    assert ev.num_rows == 3000 and not ev.truncated
    with pytest.raises(ValueError):
        gather_eval_set([])


def test_permutation_indices():
    rng = np.random.default_rng(0)
    domain = rng.integers(0, 3, size=100)
    p = permutation_indices(domain, np.random.default_rng(1), within_domain=True)
    assert sorted(p.tolist()) == list(range(100))
    assert np.all(domain[p] == domain)
    q = permutation_indices(domain, np.random.default_rng(1), within_domain=False)
    assert sorted(q.tolist()) == list(range(100)) and np.any(domain[q] != domain)


def test_significant_zeroes_jitter():
    from lattice.select.importance import ImportanceResult

    ll = np.zeros((4, 3, 2))
    ll[:, 0, 0] = [1.0, 1.1, 0.9, 1.0]        # clearly important
    ll[:, 1, 0] = [0.01, -0.02, 0.015, -0.01]  # jitter around zero
    ll[:, 2, 1] = [-0.5, -0.6, -0.55, -0.5]    # clearly harmful: kept negative
    res = ImportanceResult(features=list("abc"), kinds=["dense"] * 3, tasks=["x", "y"],
                           baseline_logloss=np.zeros(2), baseline_auc=np.zeros(2), delta_logloss=ll,
                           delta_auc=ll.copy(), num_rows=10)
    s = res.significant("logloss", 2.0)
    assert s[0, 0] == pytest.approx(1.0) and s[1, 0] == 0.0 and s[2, 1] == pytest.approx(-0.5375)
    assert np.array_equal(res.significant("logloss", 0), res.delta_logloss_mean)
    one = ImportanceResult(features=list("abc"), kinds=["dense"] * 3, tasks=["x", "y"],
                           baseline_logloss=np.zeros(2), baseline_auc=np.zeros(2), delta_logloss=ll[:1],
                           delta_auc=ll[:1], num_rows=10)
    assert np.array_equal(one.significant(), one.delta_logloss_mean)


def test_predict_output_forms(world):
    from types import SimpleNamespace

    batches, w = world
    base = ToyModel(w)
    ref = permutation_importance(base, batches[:2], repeats=1, features=["d0"], dense_names=["d0", "d1"])
    for wrap in (lambda b: SimpleNamespace(logits=base(b)), lambda b: {"logits": base(b)}, lambda b: (base(b), None)):
        got = permutation_importance(wrap, batches[:2], repeats=1, features=["d0"], dense_names=["d0", "d1"])
        np.testing.assert_array_equal(got.delta_logloss, ref.delta_logloss)
    with pytest.raises(TypeError, match="logits"):
        permutation_importance(lambda b: 3, batches[:1], repeats=1, dense_names=["d0", "d1"])
    with pytest.raises(ValueError, match="shape"):
        permutation_importance(lambda b: base(b)[:, :1], batches[:1], repeats=1, dense_names=["d0", "d1"])


def _parallel_world(n=1200, batch_size=400, seed=3):
    """Two sequence keys that are attributes of the same events (equal lengths per row, shared times):
    q0 holds ``10 r + j`` (row r, event j), q1 the same ids + 1; timestamps = 1000 r + j."""
    import dataclasses

    from _select_batches import kjt_from_lists

    batches, _ = toy_world(n=n, batch_size=batch_size, seed=seed)
    g = np.random.default_rng(seed)
    out = []
    for b in batches:
        rows = b.example_id.tolist()
        lens = g.integers(0, 4, size=len(rows))
        q0 = [[10 * r + j for j in range(int(k))] for r, k in zip(rows, lens)]
        q1 = [[x + 1 for x in lst] for lst in q0]
        ts = [[1000 * r + j for j in range(int(k))] for r, k in zip(rows, lens)]
        seq = kjt_from_lists(["q0", "q1"], [q0, q1])
        tkjt = kjt_from_lists(["q0", "q1"], [ts, ts])
        out.append(dataclasses.replace(b, sequences=seq, sequence_timestamps=tkjt))
    return out


class _MaskNetLike:
    """Refuses parallel sequences of unequal lengths (as the networks' masknet merge does); logit_0 from
    the parity of the rows the q0 ids came from, so permuting q0 changes it."""

    def __init__(self):
        self.seen = []

    def __call__(self, batch):
        lengths = batch.sequences.lengths().view(2, -1)
        if not torch.equal(lengths[0], lengths[1]):
            raise ValueError("parallel sequences of unequal lengths")
        self.seen.append(batch)
        jt = batch.sequences["q0"]
        seg = torch.repeat_interleave(torch.arange(jt.lengths().numel()), jt.lengths())
        odd = torch.zeros(jt.lengths().numel(), dtype=torch.float64).index_add_(0, seg, ((jt.values() // 10) % 3).double())
        return torch.stack([odd - 0.5, torch.zeros_like(odd)], 1)


def test_parallel_sequences_move_among_equal_lengths():
    from types import SimpleNamespace

    from lattice.select.importance import parallel_sequence_groups

    batches = _parallel_world()
    ev = gather_eval_set(batches)
    assert parallel_sequence_groups(ev) == [["q0", "q1"]]  # detected from the data
    schema = SimpleNamespace(sequence_features=[SimpleNamespace(name="q0", timestamps_column="ts"),
                                                SimpleNamespace(name="q1", timestamps_column="ts")])
    assert parallel_sequence_groups(ev, schema) == [["q0", "q1"]]
    schema.sequence_features[1].timestamps_column = "other"
    assert parallel_sequence_groups(ev, schema) == []
    model = _MaskNetLike()
    res = permutation_importance(model, None, eval_set=ev, repeats=2, features=["q0"], dense_names=["d0", "d1"])
    assert res.parallel_groups == [["q0", "q1"]]
    domain = torch.cat([b.domain for b in batches])
    orig = [tuple(x.tolist()) for b in batches for x in b.sequences["q0"].to_dense()]
    for rep in range(2):
        perm = model.seen[len(batches) * (1 + rep): len(batches) * (2 + rep)]
        new = [tuple(x.tolist()) for b in perm for x in b.sequences["q0"].to_dense()]
        assert sorted(new) == sorted(orig) and new != orig
        for r, lst in enumerate(new):
            assert len(lst) == len(orig[r])  # same number of events
            if lst:
                assert int(domain[lst[0] // 10]) == int(domain[r])  # within the domain
        for b0, b1 in zip(batches, perm):
            assert torch.equal(b0.sequences["q1"].values(), b1.sequences["q1"].values())  # q1 stays
            assert torch.equal(b0.sequence_timestamps.values(), b1.sequence_timestamps.values())  # times stay
    assert res.delta_logloss_mean[0, 0] != 0 and res.delta_logloss_mean[0, 1] == 0


def test_row_standard_error_catches_a_memorized_noise_feature(world):
    """A model leaning hard on a feature that carries no signal: every reshuffle of one evaluation set
    gives nearly the same rise (the spread over repeats is tiny), but its sign is the luck of the set;
    the standard error over rows says so, and ``significant`` zeroes it while keeping the real signal."""
    import dataclasses

    batches, w = world
    g = np.random.default_rng(11)
    noisy = []
    for b in batches:
        dense = b.dense.clone()
        dense[:, 1] = torch.from_numpy(g.normal(size=b.batch_size)).float()
        noisy.append(dataclasses.replace(b, dense=dense, dense_mask=torch.ones_like(b.dense_mask)))
    base = ToyModel(w)

    def model(batch):
        out = base(batch)
        return out + torch.stack([2.0 * batch.dense[:, 1].double(), torch.zeros(batch.batch_size, dtype=torch.float64)], 1)

    res = permutation_importance(model, noisy, repeats=8, seed=0, dense_names=["d0", "d1"], task_names=["t0", "t1"])
    f, t = res.feature_index, res.task_index
    se = res.delta_logloss_se
    assert se.shape == (5, 2) and np.all(se[f("s1")] == 0) and se[f("d0"), t("t0")] > 0
    d1 = res.delta_logloss_mean[f("d1"), t("t0")]
    sem_repeats = res.delta_logloss_std[f("d1"), t("t0")] / math.sqrt(8)
    assert se[f("d1"), t("t0")] > 2 * sem_repeats  # the repeats understate the uncertainty
    assert abs(d1) > 2 * sem_repeats  # judged by the repeats alone, this set's luck looks significant
    assert abs(d1) < 2 * se[f("d1"), t("t0")]
    s = res.significant("logloss", 2.0)
    assert s[f("d1"), t("t0")] == 0.0 and s[f("d0"), t("t0")] > 0.2
