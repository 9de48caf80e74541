"""A Lattice Filter ranking checked against a known answer key (the planted world's informative and noise
features, :mod:`lattice.data.planted`): is every noise feature ranked below every informative feature on the
tasks it informs, where did the noise land, and which (feature, task) pairs could the evaluation set not resolve.

``summary`` is the filter's ``importance.json`` (features, tasks, ``delta_logloss_mean|std|se`` ``[F][T]``,
``selection_scores``, ``fronts``)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["analyse_ranking", "matrix"]


def matrix(rows) -> np.ndarray:
    """``[F][T]`` lists (``None``: nan) as a float64 array."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)


def _order_checks(values: np.ndarray, features: List[str], tasks: List[str], noise: List[str],
                  informative: List[str], informs: Dict[str, List[str]]) -> Dict[str, Any]:
    """Per task: every informative feature above every noise feature? (``violations``: only the tasks
    a feature informs; ``violations_any_task``: every task.)"""
    idx = {f: i for i, f in enumerate(features)}
    violations, violations_all, margin = [], [], {}
    for k, t in enumerate(tasks):
        top_noise = max((values[idx[n], k] for n in noise), default=-np.inf)
        for f in informative:
            v = values[idx[f], k]
            if not (v > top_noise):
                item = {"feature": f, "task": t, "importance": float(v), "top_noise": float(top_noise),
                        "informs": t in informs.get(f, [])}
                violations_all.append(item)
                if item["informs"]:
                    violations.append(item)
        inf_t = [values[idx[f], k] for f in informative if t in informs.get(f, [])]
        margin[t] = float(min(inf_t) - top_noise) if inf_t else float("nan")
    return {"violations": violations, "violations_any_task": violations_all, "margin_by_task": margin}


def analyse_ranking(summary: Dict[str, Any], roles: Dict[str, List[str]], informs: Dict[str, List[str]],
                    informs_own: Optional[Dict[str, List[str]]] = None,
                    oracle: Optional[Dict[str, Dict[str, float]]] = None, resolve_z: float = 2.0) -> Dict[str, Any]:
    """Where the planted noise landed. The filter ranks by ``selection_scores`` (the mean LogLoss rise,
    zeroed where within ``significance`` standard errors of 0); the same checks on the raw means are
    reported beside them. With ``oracle`` (:func:`lattice.data.planted.oracle_rise`), a (feature, task) pair whose oracle rise
    is below ``resolve_z`` times the filter's standard error for it is *unresolvable*: even the
    Bayes-optimal model's importance would not stand out from zero on this evaluation set; violations on
    resolvable pairs are listed apart."""
    features, tasks = summary["features"], summary["tasks"]
    mean = matrix(summary["delta_logloss_mean"])
    scores = matrix(summary["selection_scores"]) if summary.get("selection_scores") is not None else mean
    idx = {f: i for i, f in enumerate(features)}
    noise = [f for f in roles["noise"] if f in idx]
    informative = [f for f in roles["informative"] if f in idx]
    front_of = {f: j for j, front in enumerate(summary.get("fronts", [])) for f in front}
    # per task: rank 1 = most important (by the selection scores, ties broken by the raw mean)
    order = {}
    for k, t in enumerate(tasks):
        key = np.lexsort((-np.nan_to_num(mean[:, k], nan=-np.inf), -np.nan_to_num(scores[:, k], nan=-np.inf)))
        order[t] = [features[i] for i in key]
    rank = {t: {f: r + 1 for r, f in enumerate(order[t])} for t in tasks}
    by_scores = _order_checks(scores, features, tasks, noise, informative, informs)
    by_mean = _order_checks(mean, features, tasks, noise, informative, informs)
    own = _order_checks(scores, features, tasks, noise, informative, informs_own) if informs_own else None
    noise_where = {
        n: {"front": front_of.get(n), "rank_by_task": {t: rank[t][n] for t in tasks},
            "score": {t: float(scores[idx[n], k]) for k, t in enumerate(tasks)},
            "mean": {t: float(mean[idx[n], k]) for k, t in enumerate(tasks)}}
        for n in noise
    }
    avg = np.nanmean(mean, axis=1)
    overall = sorted(features, key=lambda f: (front_of.get(f, 1 << 30), -avg[idx[f]]))
    se = matrix(summary["delta_logloss_se"]) if summary.get("delta_logloss_se") else None
    unresolvable = []
    if oracle is not None and se is not None:
        for f, by_task in oracle.items():
            for k, t in enumerate(tasks):
                if f in idx and t in by_task and t in informs.get(f, []) and by_task[t] < resolve_z * se[idx[f], k]:
                    unresolvable.append({"feature": f, "task": t, "oracle_rise": by_task[t], "se": float(se[idx[f], k])})
    skip = {(u["feature"], u["task"]) for u in unresolvable}
    violations_resolvable = [v for v in by_scores["violations"] if (v["feature"], v["task"]) not in skip]
    inf_fronts = [front_of[f] for f in informative if f in front_of]
    noise_fronts = [front_of[n] for n in noise if n in front_of]
    return {
        "tasks": tasks,
        "overall_order": overall,
        "order_by_task": order,
        "noise": noise_where,
        **by_scores,
        "raw_mean": by_mean,
        "own_logit": own,
        "ranking_pass": not by_scores["violations"],
        "ranking_pass_every_task": not by_scores["violations_any_task"],
        "ranking_pass_raw_mean": not by_mean["violations"],
        "ranking_pass_own_logit": None if own is None else not own["violations"],
        "oracle_rise": oracle,
        "unresolvable": unresolvable,
        "violations_resolvable": violations_resolvable,
        "ranking_pass_resolvable": None if oracle is None else not violations_resolvable,
        "noise_fronts_after_informative": bool(inf_fronts and noise_fronts and min(noise_fronts) > max(inf_fronts)),
    }
