"""What a sketch maximizes or minimizes: a number read from a validation ``results`` dict
(:attr:`lattice.train.LatticeModule.eval_results` ``["val"]``, keys ``<domain>/<task>/<metric>``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Objective"]


@dataclass(frozen=True)
class Objective:
    """``kind``: ``"mean_auc"`` (maximize the mean AUC over (domain, task) pairs, ``val/mean_auc``), ``"ne"``
    (minimize the mean normalized entropy over (domain, task) pairs) or ``"task_mix"`` (maximize
    ``sum_t w_t * AUC_t / sum_t w_t`` over the tasks' all-domain AUCs ``<task>/auc``)."""

    kind: str = "mean_auc"
    weights: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: Any) -> "Objective":
        """``"mean_auc"``, ``"ne"`` or ``{task_mix: {task: weight, ...}}``; a ``ValueError`` names what is wrong."""
        if spec is None or spec == "mean_auc":
            return cls("mean_auc")
        if spec == "ne":
            return cls("ne")
        if isinstance(spec, Mapping) and set(spec) == {"task_mix"} and isinstance(spec["task_mix"], Mapping):
            weights = {str(k): float(v) for k, v in spec["task_mix"].items()}
            if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"objective task_mix: weights must be >= 0 with a positive sum, got {weights}")
            return cls("task_mix", weights)
        raise ValueError(f"objective: expected mean_auc, ne or {{task_mix: {{task: weight}}}}, got {spec!r}")

    @property
    def direction(self) -> str:
        return "minimize" if self.kind == "ne" else "maximize"

    @property
    def label(self) -> str:
        return {"mean_auc": "val mean AUC", "ne": "val mean NE", "task_mix": "val task-mix AUC"}[self.kind]

    def check_tasks(self, task_names: list[str]) -> None:
        unknown = sorted(set(self.weights) - set(task_names))
        if unknown:
            raise ValueError(f"objective task_mix names tasks {unknown} that are not in the data {task_names}")

    def value(self, results: Mapping[str, float], domains: list[str], tasks: list[str]) -> float:
        """The objective on ``results`` (``nan`` when no term is finite)."""
        if self.kind == "mean_auc":
            return float(results.get("mean_auc", math.nan))  # LatticeModule's val/mean_auc: the one home of the mean
        if self.kind == "task_mix":
            terms = [(w, results.get(f"{t}/auc", math.nan)) for t, w in self.weights.items()]
            terms = [(w, v) for w, v in terms if math.isfinite(v)]
            total = sum(w for w, _ in terms)
            return sum(w * v for w, v in terms) / total if total > 0 else math.nan
        values = [results.get(f"{d}/{t}/ne", math.nan) for d in domains for t in tasks]
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan
