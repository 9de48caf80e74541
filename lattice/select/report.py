"""Lattice Filter outputs: the kept-features YAML, the importance CSV/JSON, the terminal table, the plot.

The kept-features YAML
----------------------
::

    # Lattice Filter: kept 12 of 30 features (pareto, budget 12, importance = LogLoss rise)
    features: [user, item, price, ...]        # the kept feature names, schema order
    selection: {method: pareto, budget: 12, metric: logloss, seed: 0, fronts: {user: 0, ...}}
    schema:                                   # the input schema restricted to the kept features
      features: [...]
      tasks: [...]
      domains: [...]                          # per-domain feature lists intersected with the kept ones

The ``schema:`` part (written when the schema is known) is a complete ``lattice.data.Schema``:
``Schema.from_yaml("kept_features.yaml")`` finds it under the ``schema:`` key, so a data config can point
at the file directly (``data: {init_args: {schema: kept_features.yaml}}``), and the reader then reads
only the kept columns. The top-level ``features:`` list is the plain names, for configs that take a
feature subset by name.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from lattice.data.schema import Schema
from lattice.select.importance import ImportanceResult
from lattice.select.pareto import Selection

__all__ = [
    "kept_features_document",
    "write_kept_yaml",
    "write_importance_csv",
    "write_summary_json",
    "format_importance_table",
    "plot_importance",
]

PathLike = Union[str, os.PathLike]

_METRIC_LABEL = {"logloss": "LogLoss rise", "auc": "AUC drop"}


# --------------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------------
def kept_features_document(
    selection: Selection,
    result: Optional[ImportanceResult] = None,
    schema: Optional[Schema] = None,
    metric: str = "logloss",
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The mapping written by :func:`write_kept_yaml` (see the module docstring); ``extra`` entries are
    added to its ``selection:`` block."""
    if selection.names is None:
        raise ValueError("the selection has no feature names; pass names= to the selector")
    kept = list(selection.names)
    if schema is not None:  # schema order reads better and matches the batch column order
        pos = {n: i for i, n in enumerate(schema.feature_names)}
        kept = sorted(kept, key=lambda n: pos.get(n, len(pos)))
    names_all = result.features if result is not None else None
    sel: Dict[str, Any] = {"method": selection.method, "budget": int(selection.budget), "metric": metric}
    if result is not None:
        sel.update(seed=int(result.seed), repeats=int(result.repeats), rows=int(result.num_rows))
    if names_all is not None:
        rank = {names_all[i]: int(selection.rank[i]) for i in selection.kept.tolist()}
        sel["fronts"] = {n: rank[n] for n in kept}
    if selection.filled_front is not None:
        sel["sampled_front"] = int(selection.filled_front)
    sel.update(extra or {})
    doc: Dict[str, Any] = {"features": kept, "selection": sel}
    if schema is not None:
        doc["schema"] = schema.restrict(kept).to_dict()
    return doc


def write_kept_yaml(
    path: PathLike,
    selection: Selection,
    result: Optional[ImportanceResult] = None,
    schema: Optional[Schema] = None,
    metric: str = "logloss",
    extra: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Write the kept features as YAML (see the module docstring); returns the written mapping."""
    import yaml

    doc = kept_features_document(selection, result=result, schema=schema, metric=metric, extra=extra)
    total = len(result.features) if result is not None else len(selection.rank)
    header = [
        f"# Lattice Filter: kept {len(doc['features'])} of {total} features "
        f"({selection.method}, budget {selection.budget}, importance = {_METRIC_LABEL.get(metric, metric)})",
    ]
    if "schema" in doc:
        header.append("# The schema: part is a complete lattice.data.Schema restricted to the kept features;")
        header.append(f"# use it from a data config with  schema: {os.fspath(path)}")
    else:
        header.append("# features: the kept feature names (no schema was given, so none is written here)")
    text = "\n".join(header) + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110)
    _makedirs_for(path)
    with open(path, "w") as fh:
        fh.write(text)
    return doc


def _makedirs_for(path: PathLike) -> None:
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# CSV / JSON
# --------------------------------------------------------------------------------------------------
def write_importance_csv(
    path: PathLike,
    result: ImportanceResult,
    selections: Sequence[Selection] = (),
) -> None:
    """One row per feature: ``feature, kind, front, kept_<method>..., <task>/dlogloss_mean,
    <task>/dlogloss_std, <task>/dlogloss_se, <task>/dauc_mean, <task>/dauc_std ...``. ``front`` is from
    the first selection; ``dlogloss_se`` is the standard error over the evaluation rows
    (:attr:`ImportanceResult.delta_logloss_se`; empty when unknown)."""
    ll_m, ll_s = result.delta_logloss_mean, result.delta_logloss_std
    ll_se = result.delta_logloss_se
    auc_m, auc_s = result.delta_auc_mean, result.delta_auc_std
    header = ["feature", "kind"]
    if selections:
        header.append("front")
        header += [f"kept_{s.method}" for s in selections]
    for t in result.tasks:
        header += [f"{t}/dlogloss_mean", f"{t}/dlogloss_std", f"{t}/dlogloss_se", f"{t}/dauc_mean",
                   f"{t}/dauc_std"]
    masks = [s.kept_mask for s in selections]
    _makedirs_for(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for f, name in enumerate(result.features):  # over features
            row: List[Any] = [name, result.kinds[f]]
            if selections:
                row.append(int(selections[0].rank[f]))
                row += [int(m[f]) for m in masks]
            for t in range(len(result.tasks)):
                se = "" if ll_se is None else _fmt_num(ll_se[f, t])
                row += [_fmt_num(ll_m[f, t]), _fmt_num(ll_s[f, t]), se, _fmt_num(auc_m[f, t]), _fmt_num(auc_s[f, t])]
            w.writerow(row)


def _fmt_num(x: float) -> str:
    return "nan" if not math.isfinite(float(x)) else repr(float(x))


def write_summary_json(
    path: PathLike,
    result: ImportanceResult,
    selections: Sequence[Selection] = (),
    metric: str = "logloss",
    scores: Optional[np.ndarray] = None,
) -> Dict[str, Any]:
    """Everything in one JSON: baselines, mean/std (and row standard error) matrices, the ``[F, T]``
    ``scores`` the selection ranked by (when given), fronts and each selection."""

    def clean(a) -> Any:
        return [[None if not math.isfinite(v) else v for v in row] for row in np.asarray(a, float).tolist()]

    doc = {
        "features": result.features,
        "kinds": result.kinds,
        "tasks": result.tasks,
        "metric": metric,
        "rows": result.num_rows,
        "truncated": result.truncated,
        "repeats": result.repeats,
        "seed": result.seed,
        "within_domain": result.within_domain,
        "seconds": result.seconds,
        "baseline_logloss": clean([result.baseline_logloss])[0],
        "baseline_auc": clean([result.baseline_auc])[0],
        "delta_logloss_mean": clean(result.delta_logloss_mean),
        "delta_logloss_std": clean(result.delta_logloss_std),
        "delta_auc_mean": clean(result.delta_auc_mean),
        "delta_auc_std": clean(result.delta_auc_std),
        "delta_logloss_se": None if result.delta_logloss_se is None else clean(result.delta_logloss_se),
        "parallel_groups": [list(g) for g in result.parallel_groups],
        "selections": [
            {
                "method": s.method,
                "budget": s.budget,
                "kept": [result.features[i] for i in s.kept.tolist()],
                "sampled_front": s.filled_front,
            }
            for s in selections
        ],
    }
    if scores is not None:
        doc["selection_scores"] = clean(scores)
    if selections:
        doc["fronts"] = [[result.features[i] for i in f.tolist()] for f in selections[0].fronts]
    _makedirs_for(path)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)
    return doc


# --------------------------------------------------------------------------------------------------
# terminal table
# --------------------------------------------------------------------------------------------------
def format_importance_table(
    result: ImportanceResult,
    selection: Optional[Selection] = None,
    metric: str = "logloss",
    compare: Optional[Selection] = None,
    max_rows: Optional[int] = None,
) -> str:
    """A fixed-width table: one row per feature (by front, then mean importance), one column per task
    with ``mean ± std`` of ``metric`` (and ``[se]``, the standard error over the evaluation rows, for
    LogLoss when known); the front and whether each selection keeps it."""
    mean, std = (
        (result.delta_logloss_mean, result.delta_logloss_std)
        if metric == "logloss"
        else (result.delta_auc_mean, result.delta_auc_std)
    )
    se = result.delta_logloss_se if metric == "logloss" else None
    n_f = len(result.features)
    avg = np.where(np.isfinite(mean), mean, 0.0).mean(axis=1) if n_f else np.zeros(0)
    rank = selection.rank if selection is not None else np.zeros(n_f, dtype=np.int64)
    order = np.lexsort((-avg, rank)) if n_f else np.zeros(0, dtype=np.int64)
    cols = ["feature", "kind"]
    if selection is not None:
        cols += ["front", "kept"]
    if compare is not None:
        cols.append(f"kept({compare.method})")
    cols += [f"{t}" for t in result.tasks]
    rows: List[List[str]] = []
    kept = selection.kept_mask if selection is not None else None
    kept2 = compare.kept_mask if compare is not None else None
    for f in order.tolist():  # over features
        row = [result.features[f], result.kinds[f]]
        if selection is not None:
            row += [str(int(rank[f])), "yes" if kept[f] else "-"]
        if compare is not None:
            row.append("yes" if kept2[f] else "-")
        for t in range(len(result.tasks)):
            m, s = float(mean[f, t]), float(std[f, t])
            cell = "nan" if not math.isfinite(m) else f"{m:+.5f} ± {s:.5f}"
            if se is not None and math.isfinite(m) and math.isfinite(float(se[f, t])):
                cell += f" [{float(se[f, t]):.5f}]"
            row.append(cell)
        rows.append(row)
    shown = rows if max_rows is None else rows[:max_rows]
    widths = [max(len(c), *(len(r[i]) for r in shown)) if shown else len(c) for i, c in enumerate(cols)]
    n_left = len(cols) - len(result.tasks)  # text columns left, numbers right

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < n_left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))

    title = (
        f"Permutation importance ({_METRIC_LABEL.get(metric, metric)}, mean ± std over {result.repeats} "
        f"repeat(s){' [standard error over rows]' if se is not None else ''}, {result.num_rows} rows"
        f"{', truncated' if result.truncated else ''}"
        f"{', within domain' if result.within_domain else ''})"
    )
    lines = [title, fmt(cols), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in shown]
    if max_rows is not None and len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more")
    base = "  ".join(
        f"{t}: LogLoss {ll:.5f}, AUC {auc:.4f}"
        for t, ll, auc in zip(result.tasks, result.baseline_logloss, result.baseline_auc)
    )
    lines.append(f"baseline  {base}")
    if selection is not None:
        lines.append(
            f"kept {int(kept.sum())} of {n_f} ({selection.method}, budget {selection.budget}"
            + (f", sampled from front {selection.filled_front}" if selection.filled_front is not None else "")
            + ")"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------------
def _import_matplotlib():
    """matplotlib's object-oriented API (no pyplot: no global backend switch, no open windows)."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "the Lattice Filter plot needs matplotlib, which is not installed; install it with "
            "`pip install lattice-rec[plot]` (or `pip install matplotlib`), or skip the plot"
        ) from err
    return matplotlib, Figure


def plot_importance(
    path: PathLike,
    result: ImportanceResult,
    selection: Selection,
    task_x: Union[str, int],
    task_y: Union[str, int],
    metric: str = "logloss",
    compare: Optional[Selection] = None,
    annotate: Optional[int] = 40,
) -> str:
    """Scatter the importance of every feature on two tasks, coloured by Pareto front (of the full
    task set; drawn as staircases when there are exactly these two tasks), kept features ringed, error
    bars = std over repeats; saved as PNG to ``path``.

    ``annotate``: label the points with feature names when there are at most this many features.
    Needs matplotlib (``pip install lattice-rec[plot]``).
    """
    matplotlib, Figure = _import_matplotlib()
    tx = task_x if isinstance(task_x, int) else result.task_index(task_x)
    ty = task_y if isinstance(task_y, int) else result.task_index(task_y)
    mean = result.matrix(metric)
    std = result.delta_logloss_std if metric == "logloss" else result.delta_auc_std
    x, y = mean[:, tx], mean[:, ty]
    n_fronts = len(selection.fronts)
    exact_2d = len(result.tasks) == 2 and tx != ty  # otherwise fronts are of all tasks, not this projection
    cmap = matplotlib.colormaps["viridis"].resampled(max(n_fronts, 2))
    fig = Figure(figsize=(7.5, 6), dpi=120)
    ax = fig.add_subplot()
    ax.errorbar(x, y, xerr=std[:, tx], yerr=std[:, ty], fmt="none", ecolor="0.75", elinewidth=0.8, zorder=1)
    for j, front in enumerate(selection.fronts):  # over fronts
        ax.scatter(x[front], y[front], s=28, color=cmap(j), zorder=2,
                   label=f"front {j}" if j < 8 or j == n_fronts - 1 else None)
        if exact_2d and j < 8 and front.size > 1:  # with two tasks the front is a true staircase
            o = np.argsort(x[front])
            ax.step(x[front][o], y[front][o], where="pre", color=cmap(j), lw=0.7, alpha=0.6, zorder=1)
    kept = selection.kept
    ax.scatter(x[kept], y[kept], s=110, facecolors="none", edgecolors="crimson", linewidths=1.4, zorder=3,
               label=f"kept ({selection.method}, {kept.size})")
    if compare is not None:
        ax.scatter(x[compare.kept], y[compare.kept], s=40, marker="x", color="black", linewidths=1.0,
                   zorder=4, label=f"kept ({compare.method}, {compare.kept.size})")
    if annotate is not None and len(result.features) <= annotate:
        for f, name in enumerate(result.features):
            ax.annotate(name, (x[f], y[f]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    label = _METRIC_LABEL.get(metric, metric)
    ax.set_xlabel(f"{result.tasks[tx]}: {label}")
    ax.set_ylabel(f"{result.tasks[ty]}: {label}")
    ax.axhline(0, color="0.6", lw=0.6)
    ax.axvline(0, color="0.6", lw=0.6)
    ax.set_title(f"Lattice Filter: permutation importance ({result.repeats} repeats, {result.num_rows} rows)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path, format="png")
    return os.fspath(path)
