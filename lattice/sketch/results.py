"""What a search leaves behind: ``best.yaml`` (a complete config ``lattice fit`` runs as it is), the trials table
(``trials.csv``, ``trials.json``) and PNG plots (optimization history, parameter importances, and the Pareto front
of the objective against FLOPs per sample when FLOPs are constrained)."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Optional

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from lattice.sketch.objective import Objective

__all__ = ["best_trial", "pareto_front", "trial_rows", "write_results"]

_MEASURED = ("flops_per_sample", "num_parameters", "latency_ms")


def _feasible(trial: FrozenTrial) -> bool:
    return all(v <= 0 for k, v in trial.system_attrs.items() if k.startswith("constraints:"))


def best_trial(study: optuna.Study) -> Optional[FrozenTrial]:
    """The best complete trial that meets every constraint (``None`` when there is none)."""
    complete = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if _feasible(t)
                and t.value is not None and math.isfinite(t.value)]
    if not complete:
        return None
    pick = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    return pick(complete, key=lambda t: t.value)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, duration, each parameter, the measured resources, why pruned."""
    names = sorted({p for t in study.trials for p in t.params})
    rows = []
    for t in study.trials:
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        row: dict[str, Any] = {"number": t.number, "state": t.state.name, "value": t.value, "duration_s": duration}
        row.update({name: t.params.get(name) for name in names})
        row.update({name: t.user_attrs.get(name) for name in _MEASURED})
        row["feasible"] = _feasible(t)
        row["pruned_by"] = t.user_attrs.get("pruned_by")
        rows.append(row)
    return rows


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[tuple[float, float]]:
    """The (flops, value) points no other point beats on both (fewer FLOPs and a better value), by FLOPs."""
    front, best = [], None
    for flops, value in sorted(points, key=lambda p: (p[0], -p[1] if maximize else p[1])):
        if best is None or (value > best if maximize else value < best):
            front.append((flops, value))
            best = value
    return front


def write_results(study: optuna.Study, out_dir: str, objective: Objective, flops_constrained: bool) -> dict[str, str]:
    """Writes the results into ``out_dir``; returns ``{what: path}`` of what was written."""
    os.makedirs(out_dir, exist_ok=True)
    written: dict[str, str] = {}
    rows = trial_rows(study)
    if rows:
        path = os.path.join(out_dir, "trials.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        written["trials_csv"] = path
        path = os.path.join(out_dir, "trials.json")
        with open(path, "w") as f:
            json.dump({"study": study.study_name, "direction": objective.direction, "objective": objective.kind,
                       "trials": rows}, f, indent=1, default=str)
        written["trials_json"] = path
    best = best_trial(study)
    if best is not None:
        path = os.path.join(out_dir, "best.yaml")
        header = (f"# lattice sketch: the best of {len(rows)} trials of study {study.study_name!r} "
                  f"(trial {best.number}, {objective.label} {best.value:.5f}).\n"
                  f"# Run it with: lattice fit --config {path}\n")
        with open(path, "w") as f:
            f.write(header)
            yaml.safe_dump(best.user_attrs["config"], f, sort_keys=False)
        written["best_yaml"] = path
    written.update(_plots(study, out_dir, objective, flops_constrained))
    return written


def _plots(study: optuna.Study, out_dir: str, objective: Objective, flops_constrained: bool) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not complete:
        return {}
    maximize = objective.direction == "maximize"
    written = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    xs, ys = [t.number for t in complete], [t.value for t in complete]
    running, best = [], None
    for y in ys:
        best = y if best is None else (max(best, y) if maximize else min(best, y))
        running.append(best)
    ax.scatter(xs, ys, s=18, label="trial")
    ax.step(xs, running, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel=objective.label, title="optimization history")
    ax.legend()
    written["history_png"] = _save(fig, os.path.join(out_dir, "history.png"))

    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # fewer than two complete trials, or no parameter varied
        importances = {}
    if importances:
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(importances)))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set(xlabel="importance (fANOVA)", title="parameter importances")
        written["importances_png"] = _save(fig, os.path.join(out_dir, "importances.png"))

    if flops_constrained:
        points = [(t.user_attrs["flops_per_sample"], t.value) for t in complete if "flops_per_sample" in t.user_attrs]
        if points:
            front = pareto_front(points, maximize)
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=18, label="trial")
            ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", drawstyle="steps-post",
                    label="Pareto front")
            ax.set(xscale="log", xlabel="FLOPs per sample", ylabel=objective.label, title=f"{objective.label} vs FLOPs")
            ax.legend()
            written["pareto_png"] = _save(fig, os.path.join(out_dir, "pareto.png"))
    return written


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
