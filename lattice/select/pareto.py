"""Pareto-front feature selection (Lattice Filter) and the weighted-sum baseline.

Importances are a matrix ``scores [F, T]`` (features × tasks, larger = more important). Feature ``k``
*dominates* feature ``i`` when it is at least as important on every task and strictly more important on
at least one. The *fronts* are the successive non-dominated sets: front 0 is every feature no other
feature dominates, front 1 those dominated only by front 0, and so on.

:func:`non_dominated_sort` computes all fronts at once from a dominance matrix built with vectorized
comparisons (in row blocks, so memory stays at ``block × F × T`` booleans) and then peels fronts by
counting dominators, as in Deb et al.'s fast non-dominated sort (NSGA-II): one vectorized update per
front, never a quadratic Python loop. :func:`pareto_select` takes fronts in order until a feature budget
is reached and fills a front that overfills what is left by seeded uniform sampling from that front.
:func:`weighted_sum_select` ranks by a (normalized) weighted sum of the task columns under the same
budget, for comparison.

NaN importances (e.g. an AUC on a task with a single class) count as the least important value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

__all__ = [
    "Selection",
    "dominance_matrix",
    "non_dominated_sort",
    "front_ranks",
    "pareto_select",
    "weighted_sum_select",
]


def _as_scores(scores) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"scores must be [F, T] (features × tasks), got shape {a.shape}")
    return np.where(np.isnan(a), -np.inf, a)


def dominance_matrix(scores, block: Optional[int] = None) -> np.ndarray:
    """``dom [F, F]`` bool, ``dom[k, i]`` = feature k dominates feature i.  scores: ``[F, T]``.

    Built in blocks of ``block`` rows so the ``[block, F, T]`` comparison stays bounded (default: about
    64 M booleans per block).
    """
    a = _as_scores(scores)
    n = a.shape[0]
    if block is None:
        block = max(1, min(n, (1 << 26) // max(1, n * a.shape[1])))
    dom = np.zeros((n, n), dtype=bool)
    for s in range(0, n, block):  # over row blocks, not rows
        blk = a[s : s + block, None, :]
        ge = (blk >= a[None, :, :]).all(axis=2)
        gt = (blk > a[None, :, :]).any(axis=2)
        dom[s : s + block] = ge & gt
    return dom


def non_dominated_sort(scores, block: Optional[int] = None) -> List[np.ndarray]:
    """Fronts of ``scores [F, T]``: a list of int64 index arrays (ascending), front 0 first.

    Every feature is in exactly one front. Cost: one ``O(F² T)`` vectorized dominance build, then one
    ``O(|front| · F)`` vectorized update per front.
    """
    a = _as_scores(scores)
    n = a.shape[0]
    if n == 0:
        return []
    dom = dominance_matrix(a, block=block)
    remaining_dominators = dom.sum(axis=0).astype(np.int64)  # how many features dominate i
    assigned = np.zeros(n, dtype=bool)
    fronts: List[np.ndarray] = []
    while not assigned.all():
        front = np.flatnonzero((remaining_dominators == 0) & ~assigned)
        if front.size == 0:  # impossible for a strict partial order; guard against a hang
            raise RuntimeError("non_dominated_sort: dominance relation has a cycle (non-finite scores?)")
        assigned[front] = True
        remaining_dominators -= dom[front].sum(axis=0)
        fronts.append(front.astype(np.int64))
    return fronts


def front_ranks(fronts: Sequence[np.ndarray], num_features: int) -> np.ndarray:
    """``rank [F]`` int64: the front index of each feature."""
    rank = np.full(num_features, -1, dtype=np.int64)
    for j, f in enumerate(fronts):  # over fronts
        rank[f] = j
    return rank


@dataclass
class Selection:
    """A feature subset chosen under a budget.

    Attributes:
        kept: indices of the kept features (front order, then index order; sampled ones ascending).
        names: their names (when names were given), same order as ``kept``.
        method: ``pareto`` or ``weighted_sum``.
        budget: the requested number of features (``len(kept) == min(budget, F)``).
        fronts: the Pareto fronts (index arrays) — for ``weighted_sum`` too, for plotting.
        rank: ``[F]`` front index of each feature.
        filled_front: the front that was sampled from because it overfilled the budget (``None``: none).
        score: ``[F]`` the weighted-sum score (``weighted_sum`` only).
    """

    kept: np.ndarray
    names: Optional[List[str]]
    method: str
    budget: int
    fronts: List[np.ndarray]
    rank: np.ndarray
    filled_front: Optional[int] = None
    score: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def kept_mask(self) -> np.ndarray:
        mask = np.zeros(self.rank.shape[0], dtype=bool)
        mask[self.kept] = True
        return mask


def _check_budget(budget: int, n: int) -> int:
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return min(budget, n)


def _names_of(names: Optional[Sequence[str]], idx: np.ndarray, n: int) -> Optional[List[str]]:
    if names is None:
        return None
    names = list(names)
    if len(names) != n:
        raise ValueError(f"got {len(names)} names for {n} features")
    return [names[i] for i in idx.tolist()]


def pareto_select(
    scores,
    budget: int,
    seed: int = 0,
    names: Optional[Sequence[str]] = None,
    fronts: Optional[List[np.ndarray]] = None,
) -> Selection:
    """Keep whole Pareto fronts of ``scores [F, T]`` in order until ``budget`` features are kept.

    When a front has more features than the budget has left, that many are drawn from it uniformly
    at random without replacement with ``numpy.random.default_rng(seed)`` (deterministic per seed).
    ``fronts`` may be passed to reuse a previous :func:`non_dominated_sort`.
    """
    a = _as_scores(scores)
    n = a.shape[0]
    budget_eff = _check_budget(budget, n)
    if fronts is None:
        fronts = non_dominated_sort(a)
    rng = np.random.default_rng(seed)
    kept: List[np.ndarray] = []
    left = budget_eff
    filled = None
    for j, front in enumerate(fronts):  # over fronts
        if left == 0:
            break
        if front.size <= left:
            kept.append(front)
            left -= front.size
        else:
            kept.append(np.sort(rng.choice(front, size=left, replace=False)))
            filled = j
            left = 0
    kept_idx = np.concatenate(kept).astype(np.int64) if kept else np.zeros(0, dtype=np.int64)
    return Selection(
        kept=kept_idx,
        names=_names_of(names, kept_idx, n),
        method="pareto",
        budget=int(budget),
        fronts=fronts,
        rank=front_ranks(fronts, n),
        filled_front=filled,
    )


def weighted_sum_select(
    scores,
    budget: int,
    weights: Optional[Sequence[float]] = None,
    normalize: bool = True,
    names: Optional[Sequence[str]] = None,
    fronts: Optional[List[np.ndarray]] = None,
) -> Selection:
    """Keep the ``budget`` features with the largest ``Σ_t w_t · scores[:, t]``.

    With ``normalize`` each task column is first divided by its largest absolute finite value, so a
    task with a large loss scale doesn't decide alone. ``weights`` default to 1 per task. Ties are
    broken by feature index (deterministic). The Pareto fronts are attached for plotting.
    """
    a = _as_scores(scores)
    n, t = a.shape
    budget_eff = _check_budget(budget, n)
    w = np.ones(t) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (t,):
        raise ValueError(f"weights must have one entry per task ({t}), got shape {w.shape}")
    finite = np.where(np.isfinite(a), a, 0.0)
    if normalize:
        scale = np.abs(finite).max(axis=0) if n else np.ones(t)
        finite = finite / np.where(scale > 0, scale, 1.0)
    finite = np.where(np.isneginf(a), -1e300, finite)  # NaN/-inf: least important
    score = finite @ w
    order = np.lexsort((np.arange(n), -score))  # by score desc, then index
    kept_idx = order[:budget_eff].astype(np.int64)
    if fronts is None:
        fronts = non_dominated_sort(a)
    return Selection(
        kept=kept_idx,
        names=_names_of(names, kept_idx, n),
        method="weighted_sum",
        budget=int(budget),
        fronts=fronts,
        rank=front_ranks(fronts, n),
        score=score,
    )
