"""Ranking and calibration metrics for multi-domain, multi-task evaluation.

The functional metrics work on flat tensors; :class:`MultiTaskMetrics` is a torchmetrics ``Metric`` that
keeps every evaluated row (its states are concatenated across ranks when synced, so an AUC is computed
over all ranks' rows, never averaged from per-rank AUCs) and reports, per (domain, task) and per task
over all domains: AUC, LogLoss, normalized entropy (NE), calibration, group AUC by user and, where the
data carries true label probabilities, the oracle AUC.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

_EPS = 1e-7


def _average_ranks(sorted_values: Tensor) -> Tensor:
    """1-based ranks of an ascending-sorted vector, ties given their average rank.  [N] -> [N] float64."""
    n = sorted_values.numel()
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1.0
    return ((starts + ends) / 2.0)[inverse] if n else sorted_values.to(torch.float64)


def binary_auc(scores: Tensor, labels: Tensor) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties counted half).  scores, labels: [N]; labels in {0, 1}.

    Returns NaN when only one class is present.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positive = labels.detach().reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores, stable=True)
    ranks = _average_ranks(scores[order])
    rank_sum = ranks[positive[order]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def group_auc(scores: Tensor, labels: Tensor, groups: Tensor) -> float:
    """Impression-weighted mean of per-group AUCs (groups with both classes only).  All inputs [N].

    Vectorized: one sort by (group, score), ranks within each group with ties averaged.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    labels = labels.detach().reshape(-1) > 0.5
    groups = groups.detach().reshape(-1)
    if scores.numel() == 0:
        return float("nan")
    by_score = torch.argsort(scores, stable=True)
    by_group = torch.argsort(groups[by_score], stable=True)
    order = by_score[by_group]
    g, s, y = groups[order], scores[order], labels[order]
    _, group_idx, group_sizes = torch.unique_consecutive(g, return_inverse=True, return_counts=True)
    n_groups = group_sizes.numel()
    group_start = torch.cumsum(group_sizes, 0) - group_sizes
    position = torch.arange(s.numel(), device=s.device) - group_start[group_idx] + 1  # rank inside group
    # Ties: average the rank over runs of equal (group, score).
    new_run = torch.ones_like(y)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run_idx = torch.cumsum(new_run.to(torch.int64), 0) - 1
    n_runs = int(run_idx[-1]) + 1
    run_rank = torch.zeros(n_runs, dtype=torch.float64, device=s.device).scatter_reduce(
        0, run_idx, position.to(torch.float64), reduce="mean", include_self=False
    )
    ranks = run_rank[run_idx]
    yf = y.to(torch.float64)
    n_pos = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, group_idx, yf)
    pos_rank_sum = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, group_idx, ranks * yf)
    n_neg = group_sizes.to(torch.float64) - n_pos
    valid = (n_pos > 0) & (n_neg > 0)
    if not bool(valid.any()):
        return float("nan")
    auc = (pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg).clamp_min(1.0)
    weights = group_sizes.to(torch.float64) * valid
    return float((auc * weights).sum() / weights.sum())


def log_loss(probs: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of probabilities [N] against labels [N] (probabilities clipped to 1e-7)."""
    if probs.numel() == 0:
        return float("nan")
    p = probs.detach().reshape(-1).to(torch.float64).clamp(_EPS, 1.0 - _EPS)
    y = labels.detach().reshape(-1).to(torch.float64)
    return float(-(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).mean())


def normalized_entropy(probs: Tensor, labels: Tensor) -> float:
    """LogLoss divided by the entropy of the empirical base rate (1.0 = no better than the base rate)."""
    if probs.numel() == 0:
        return float("nan")
    rate = float(labels.detach().to(torch.float64).mean())
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    base_entropy = -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))
    return log_loss(probs, labels) / base_entropy


def calibration(probs: Tensor, labels: Tensor) -> float:
    """Sum of predicted probabilities over sum of labels (1.0 = calibrated on average)."""
    positives = float(labels.detach().to(torch.float64).sum())
    if positives == 0.0:
        return float("nan")
    return float(probs.detach().to(torch.float64).sum()) / positives


class MultiTaskMetrics(Metric):
    """Per-(domain, task) and per-task metrics over every evaluated row, synced across ranks.

    ``update(logits [B, T], labels [B, T], label_mask [B, T], domain [B], user_id [B], true_probs [B, T] | None)``;
    ``compute()`` returns ``{"<domain>/<task>/<metric>": value, "<task>/<metric>": value}``. Binary tasks get
    ``auc, logloss, ne, calibration, gauc`` (+ ``oracle_auc`` when true probabilities are given); regression
    tasks get ``mse`` and ``mae``. A (domain, task) with no labeled rows is left out.
    """

    full_state_update = False

    def __init__(
        self,
        task_names: Sequence[str],
        domain_names: Sequence[str],
        task_kinds: Sequence[str] | None = None,
        group_auc: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.task_names = list(task_names)
        self.domain_names = list(domain_names)
        self.task_kinds = list(task_kinds) if task_kinds is not None else ["binary"] * len(self.task_names)
        if len(self.task_kinds) != len(self.task_names):
            raise ValueError(f"task_kinds has {len(self.task_kinds)} entries for {len(self.task_names)} tasks")
        self.compute_group_auc = group_auc
        for name in ("outputs", "labels", "label_mask", "domain", "user_id", "true_probs", "has_truth"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        logits: Tensor,
        labels: Tensor,
        label_mask: Tensor,
        domain: Tensor,
        user_id: Tensor | None = None,
        true_probs: Tensor | None = None,
    ) -> None:
        batch, tasks = logits.shape
        if tasks != len(self.task_names):
            raise ValueError(f"logits have {tasks} tasks, metrics were built for {len(self.task_names)}")
        self.outputs.append(logits.detach().float())
        self.labels.append(labels.detach().float())
        self.label_mask.append(label_mask.detach().bool())
        self.domain.append(domain.detach().long())
        self.user_id.append(
            user_id.detach().long() if user_id is not None else torch.zeros(batch, dtype=torch.long, device=logits.device)
        )
        has_truth = true_probs is not None
        self.true_probs.append(true_probs.detach().float() if has_truth else torch.zeros_like(logits, dtype=torch.float))
        self.has_truth.append(torch.full((batch,), has_truth, dtype=torch.bool, device=logits.device))

    def _task_metrics(self, kind: str, out: Tensor, y: Tensor, users: Tensor, truth: Tensor | None) -> dict:
        if kind == "regression":
            err = out.double() - y.double()
            return {"mse": float((err**2).mean()), "mae": float(err.abs().mean()), "count": float(y.numel())}
        p = torch.sigmoid(out.double())
        values = {
            "auc": binary_auc(out, y),
            "logloss": log_loss(p, y),
            "ne": normalized_entropy(p, y),
            "calibration": calibration(p, y),
            "count": float(y.numel()),
        }
        if self.compute_group_auc:
            values["gauc"] = group_auc(out, y, users)
        if truth is not None:
            values["oracle_auc"] = binary_auc(truth, y)
        return values

    def compute(self) -> dict[str, float]:
        if isinstance(self.outputs, list) and not self.outputs:
            return {}
        outputs, labels, mask = dim_zero_cat(self.outputs), dim_zero_cat(self.labels), dim_zero_cat(self.label_mask)
        domain, users = dim_zero_cat(self.domain), dim_zero_cat(self.user_id)
        truth_all, has_truth = dim_zero_cat(self.true_probs), dim_zero_cat(self.has_truth)
        results: dict[str, float] = {}
        for t, (task, kind) in enumerate(zip(self.task_names, self.task_kinds)):
            labeled = mask[:, t]
            scopes = [(task, labeled)] + [
                (f"{name}/{task}", labeled & (domain == d)) for d, name in enumerate(self.domain_names)
            ]
            for prefix, rows in scopes:
                if not bool(rows.any()):
                    continue
                truth = truth_all[rows, t] if bool(has_truth[rows].all()) else None
                for metric, value in self._task_metrics(kind, outputs[rows, t], labels[rows, t], users[rows], truth).items():
                    results[f"{prefix}/{metric}"] = value
        return results
