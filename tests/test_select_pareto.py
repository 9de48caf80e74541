"""Pareto fronts, peeling to a budget with seeded random fill, and the weighted-sum baseline."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lattice.select.pareto import (
    dominance_matrix,
    non_dominated_sort,
    pareto_select,
    weighted_sum_select,
)


def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


def _brute_force_fronts(scores: np.ndarray):
    """Reference: peel the set of features no remaining feature dominates, pairwise, one at a time."""
    left = list(range(len(scores)))
    fronts = []
    while left:
        front = [i for i in left if not any(_dominates(scores[k], scores[i]) for k in left if k != i)]
        fronts.append(front)
        left = [i for i in left if i not in front]
    return fronts


# Small integer grids make ties (and so weak dominance) common.
scores_strategy = st.integers(1, 4).flatmap(
    lambda t: st.lists(
        st.lists(st.integers(0, 5).map(float), min_size=t, max_size=t), min_size=0, max_size=40
    )
).map(lambda rows: np.array(rows, dtype=np.float64).reshape(len(rows), -1) if rows else np.zeros((0, 2)))


@settings(max_examples=60, deadline=None)
@given(scores_strategy)
def test_fast_sort_matches_brute_force(scores):
    fronts = non_dominated_sort(scores)
    assert [f.tolist() for f in fronts] == _brute_force_fronts(scores)


@settings(max_examples=60, deadline=None)
@given(scores_strategy, st.integers(0, 45), st.integers(0, 2**31 - 1))
def test_pareto_select_properties(scores, budget, seed):
    n = len(scores)
    sel = pareto_select(scores, budget, seed=seed)
    # budget exact (or every feature when there are fewer)
    assert sel.kept.size == min(budget, n)
    assert np.unique(sel.kept).size == sel.kept.size
    # every kept feature of front j is non-dominated among the features of fronts >= j
    for i in sel.kept.tolist():
        j = sel.rank[i]
        rest = np.flatnonzero(sel.rank >= j)
        assert not any(_dominates(scores[k], scores[i]) for k in rest)
    # whole fronts are kept before any later one; only the last touched front may be partial
    kept_ranks = sel.rank[sel.kept]
    if sel.kept.size:
        last = kept_ranks.max()
        for j in range(last):
            assert np.all(np.isin(sel.fronts[j], sel.kept))
        if sel.filled_front is not None:
            assert sel.filled_front == last
            assert 0 < np.isin(sel.fronts[last], sel.kept).sum() < sel.fronts[last].size
    # seed-deterministic
    again = pareto_select(scores, budget, seed=seed)
    assert np.array_equal(again.kept, sel.kept)


def test_random_fill_is_uniform_and_seeded():
    scores = np.zeros((6, 2))  # one front of 6 ties
    counts = np.zeros(6)
    picks = set()
    for seed in range(600):
        sel = pareto_select(scores, 2, seed=seed)
        assert sel.filled_front == 0
        counts[sel.kept] += 1
        picks.add(tuple(sel.kept.tolist()))
    assert len(picks) == 15  # every pair shows up
    assert np.all(np.abs(counts / 600 - 2 / 6) < 0.07)
    assert pareto_select(scores, 2, seed=3).kept.tolist() == pareto_select(scores, 2, seed=3).kept.tolist()


def test_known_fronts_and_names():
    scores = np.array([
        [3.0, 0.0],   # a: front 0
        [0.0, 3.0],   # b: front 0
        [2.0, 2.0],   # c: front 0
        [1.0, 1.0],   # d: front 1 (dominated by c)
        [1.0, 1.0],   # e: front 1 (a tie with d is not domination)
        [0.0, 0.0],   # f: front 2
    ])
    names = list("abcdef")
    fronts = non_dominated_sort(scores)
    assert [f.tolist() for f in fronts] == [[0, 1, 2], [3, 4], [5]]
    sel = pareto_select(scores, 5, names=names)
    assert sel.names == list("abcde") and sel.filled_front is None
    sel = pareto_select(scores, 4, names=names, seed=1)
    assert sel.names[:3] == list("abc") and sel.names[3] in "de" and sel.filled_front == 1
    assert pareto_select(scores, 0).kept.size == 0
    assert pareto_select(scores, 100).kept.size == 6
    with pytest.raises(ValueError):
        pareto_select(scores, -1)


def test_nan_counts_as_least_important():
    scores = np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, np.nan]])
    fronts = non_dominated_sort(scores)
    assert [f.tolist() for f in fronts] == [[1, 2], [0]]
    dom = dominance_matrix(scores)
    assert dom[1, 0]  # (0, 1) beats (nan, 1)
    assert not dom[0, 1] and not dom[1, 2] and not dom[2, 1]


def test_dominance_matrix_blocks_agree():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(57, 3)).astype(float)
    full = dominance_matrix(scores, block=57)
    for block in (1, 5, 16):
        assert np.array_equal(dominance_matrix(scores, block=block), full)
    brute = np.array([[_dominates(scores[k], scores[i]) for i in range(57)] for k in range(57)])
    assert np.array_equal(full, brute)


def test_fast_sort_scales():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(1500, 4))
    fronts = non_dominated_sort(scores)
    assert sum(f.size for f in fronts) == 1500
    assert np.unique(np.concatenate(fronts)).size == 1500


def test_weighted_sum_select():
    scores = np.array([[10.0, 0.0], [0.0, 0.1], [6.0, 0.06], [1.0, 0.01]])
    # normalized: a=(1,0)=1, b=(0,1)=1, c=(.6,.6)=1.2, d=.2
    sel = weighted_sum_select(scores, 2, names=list("abcd"))
    assert sel.names == ["c", "a"]  # tie a/b broken by index
    raw = weighted_sum_select(scores, 2, normalize=False, names=list("abcd"))
    assert raw.names == ["a", "c"]
    w = weighted_sum_select(scores, 1, weights=[0.0, 1.0], names=list("abcd"))
    assert w.names == ["b"]
    assert len(sel.fronts) >= 1 and sel.score is not None
    with pytest.raises(ValueError):
        weighted_sum_select(scores, 1, weights=[1.0])


def test_pareto_keeps_a_specialist_weighted_sum_drops():
    # a feature that matters for one task only is on the first front; the weighted sum may drop it
    scores = np.array([[0.0, 0.9], [0.6, 0.5], [0.55, 0.45], [0.5, 0.4]])
    assert 0 in pareto_select(scores, 2).kept.tolist()
    assert 0 not in weighted_sum_select(scores, 2, normalize=False).kept.tolist()


@pytest.mark.parametrize("n,t", [(1, 1), (2, 1), (5, 3)])
def test_single_task_fronts_are_sorted_levels(n, t):
    scores = np.arange(n * t, dtype=float).reshape(n, t)
    fronts = non_dominated_sort(scores)
    assert [f.tolist() for f in fronts] == [[i] for i in reversed(range(n))]
