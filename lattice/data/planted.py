"""What the planted synthetic world says a feature-selection method should find: which tasks each feature
informs (:func:`planted_informs`), and how much LogLoss the Bayes-optimal predictor loses without a feature's
planted term (:func:`oracle_rise`). The answer key Lattice Filter is checked against."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from lattice.data.synthetic import SyntheticConfig, SyntheticWorld

__all__ = ["ORACLE_TERMS", "oracle_rise", "planted_informs"]


def planted_informs(config: SyntheticConfig, through_parent: bool = True) -> Dict[str, List[str]]:
    """``feature -> tasks`` whose label probability the feature enters directly in the planted world: a
    term of the task's logit with a non-zero coefficient, or (``through_parent``) of its parent's
    (``p_child = p_parent * sigmoid(z_child)``, so what drives clicks drives likes and conversions
    too). Binary tasks only."""
    feature_terms = SyntheticWorld(config).feature_terms()
    by_name = {t.name: t for t in config.tasks}
    every_term = {term for terms in feature_terms.values() for term in terms}

    def drivers(task) -> set:
        own = {term for term in every_term if getattr(task, term, 0.0) != 0.0}
        return own | (drivers(by_name[task.parent]) if task.parent and through_parent else set())

    task_terms = {t.name: drivers(t) for t in config.tasks if t.kind == "binary"}
    return {f: [t for t, terms in task_terms.items() if set(carried) & terms] for f, carried in feature_terms.items()}


#: Features whose planted term is a simple additive context term of the logit: the oracle's rise when it
#: is removed can be computed from the world's own generator (see :func:`oracle_rise`).
ORACLE_TERMS = {"device": "device", "hour": "hour", "position": "position", "query_cluster": "query",
                 "price": "price", "item_brand": "brand", "hist_items": "repeat", "user_activity": "activity"}


def oracle_rise(config: SyntheticConfig, rows: int = 40000, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """``feature -> task -> LogLoss rise`` of the Bayes-optimal predictor when the feature's planted
    context term (:data:`ORACLE_TERMS`) is replaced by its mean: about the most that any model's
    permutation importance of that feature can show (a permutation destroys the same information; the
    mean-logit stand-in is a slightly worse predictor than the marginal one, so this errs high).
    Expected LogLoss under the true probabilities (no label noise), rows of each domain weighted by its
    size, over the domains that have the feature and label the task (rows from :meth:`SyntheticWorld.sample`)."""
    world = SyntheticWorld(config)
    schema = world.schema()
    tasks = [t for t in config.tasks if t.kind == "binary"]
    sums: Dict[str, Dict[str, float]] = {f: {t.name: 0.0 for t in tasks} for f in ORACLE_TERMS}
    weights: Dict[str, Dict[str, float]] = {f: {t.name: 0.0 for t in tasks} for f in ORACLE_TERMS}

    def ell(pt, q):
        q = np.clip(q, 1e-9, 1 - 1e-9)
        return -(pt * np.log(q) + (1 - pt) * np.log(1 - q))

    for di, dom in enumerate(config.domains):
        dspec = schema.domains[di]
        has_f = set(dspec.features or schema.feature_names)
        has_t = set(dspec.tasks or schema.task_names)
        n = min(rows, max(dom.rows, 1))
        out = world.sample(dom.name, n, seed=seed, stream=0x0AC1E)
        z, raw = out["z"], out["terms"]

        def probs(drop: Optional[str]) -> Dict[str, np.ndarray]:
            out_p: Dict[str, np.ndarray] = {}
            for t in config.tasks:
                if t.kind != "binary":
                    continue
                zt = z[t.name]
                if drop is not None:
                    term = getattr(t, drop) * raw[drop]
                    zt = zt - term + term.mean()
                q = 1.0 / (1.0 + np.exp(-zt))
                out_p[t.name] = q * (out_p[t.parent] if t.parent else 1.0)
            return out_p

        truth = probs(None)
        for f, term in ORACLE_TERMS.items():
            if f not in has_f:
                continue
            alt = probs(term)
            for t in tasks:
                if t.name not in has_t:
                    continue
                rise = float(np.mean(ell(truth[t.name], alt[t.name]) - ell(truth[t.name], truth[t.name])))
                sums[f][t.name] += rise * dom.rows
                weights[f][t.name] += dom.rows
    return {f: {t: (sums[f][t] / weights[f][t] if weights[f][t] else float("nan")) for t in sums[f]} for f in sums}
