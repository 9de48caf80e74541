"""The one home of lattice's evaluation and loss arithmetic (imports torch only).

Ranking: :func:`binary_auc` (exact ROC AUC, ties count half), :func:`group_auc` (impression-weighted
mean of per-group AUCs), :func:`masked_auc` (per task over labelled rows). Probabilities:
:func:`log_loss`, :func:`normalized_entropy`, :func:`calibration`. Masked multi-task losses, where a
missing label contributes nothing (never a negative): :func:`masked_task_losses` (every labelled
cell), :func:`masked_task_sums`, :func:`masked_task_means`, :func:`masked_multitask_loss`.

The scalar metrics return Python floats and NaN where they are undefined (one class only, no rows).
Inputs may be tensors or anything ``torch.as_tensor`` takes (numpy arrays, lists).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_auc",
    "group_auc",
    "masked_auc",
    "log_loss",
    "normalized_entropy",
    "calibration",
    "regression_flags",
    "masked_task_losses",
    "masked_task_sums",
    "masked_task_means",
    "weighted_task_total",
    "masked_multitask_loss",
]

_EPS = 1e-7


def _flat(values) -> Tensor:
    """A detached 1-D view of a tensor or array-like."""
    return torch.as_tensor(values).detach().reshape(-1)


# --------------------------------------------------------------------------------------------------
# ranking
# --------------------------------------------------------------------------------------------------
def _average_ranks(sorted_values: Tensor) -> Tensor:
    """1-based ranks of an ascending-sorted vector, ties given their average rank.  [N] -> [N] float64."""
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    starts = ends - counts.to(torch.float64) + 1.0
    return ((starts + ends) / 2.0)[inverse]


def binary_auc(scores, labels) -> float:
    """Exact ROC AUC (Mann-Whitney U, ties counted half).  scores, labels: [N]; a label > 0.5 is positive.

    Returns NaN when only one class is present.
    """
    scores = _flat(scores).to(torch.float64)
    positive = _flat(labels) > 0.5
    if positive.numel() != scores.numel():
        raise ValueError(f"binary_auc: {scores.numel()} scores but {positive.numel()} labels")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores, stable=True)
    ranks = _average_ranks(scores[order])
    rank_sum = ranks[positive[order]].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def group_auc(scores, labels, groups) -> float:
    """Impression-weighted mean of per-group AUCs (groups with both classes only).  All inputs [N].

    Vectorized: one sort by (group, score), ranks within each group with ties averaged.
    """
    scores = _flat(scores).to(torch.float64)
    labels = _flat(labels) > 0.5
    groups = _flat(groups)
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


def masked_auc(scores: Tensor, labels: Tensor, mask: Tensor, regression: Optional[Tensor] = None) -> Tensor:
    """Per-task ROC AUC over labelled rows (ties count half).  scores, labels, mask: ``[N, T]`` -> ``[T]``
    float64.

    NaN for a task with one class only, no labelled rows, or flagged in ``regression [T]`` (bool).
    """
    out = torch.full((scores.shape[1],), math.nan, dtype=torch.float64)
    for t in range(scores.shape[1]):  # over tasks
        if regression is not None and bool(regression[t]):
            continue
        m = mask[:, t]
        out[t] = binary_auc(scores[m, t], labels[m, t])
    return out


# --------------------------------------------------------------------------------------------------
# probabilities
# --------------------------------------------------------------------------------------------------
def log_loss(probs, labels) -> float:
    """Mean binary cross-entropy of probabilities [N] against labels [N] (probabilities clipped to 1e-7)."""
    p = _flat(probs).to(torch.float64)
    if p.numel() == 0:
        return float("nan")
    p = p.clamp(_EPS, 1.0 - _EPS)
    y = _flat(labels).to(torch.float64)
    return float(-(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)).mean())


def normalized_entropy(probs, labels) -> float:
    """LogLoss divided by the entropy of the empirical base rate (1.0 = no better than the base rate)."""
    if _flat(probs).numel() == 0:
        return float("nan")
    rate = float(_flat(labels).to(torch.float64).mean())
    if rate <= 0.0 or rate >= 1.0:
        return float("nan")
    base_entropy = -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))
    return log_loss(probs, labels) / base_entropy


def calibration(probs, labels) -> float:
    """Sum of predicted probabilities over sum of labels (1.0 = calibrated on average)."""
    positives = float(_flat(labels).to(torch.float64).sum())
    if positives == 0.0:
        return float("nan")
    return float(_flat(probs).to(torch.float64).sum()) / positives


# --------------------------------------------------------------------------------------------------
# masked multi-task losses
# --------------------------------------------------------------------------------------------------
def regression_flags(task_kinds: Sequence[str], device=None) -> Tensor:
    """``[T]`` bool: which of ``task_kinds`` (``binary`` | ``regression``) are regression tasks."""
    return torch.tensor([k == "regression" for k in task_kinds], dtype=torch.bool, device=device)


def masked_task_losses(logits: Tensor, labels: Tensor, label_mask: Tensor, regression: Optional[Tensor] = None) -> Tensor:
    """The loss of every labelled (row, task) and 0 elsewhere.  logits, labels, label_mask: ``[B, T]`` -> ``[B, T]``.

    Binary tasks: BCE with logits (labels clipped to [0, 1]); tasks flagged in ``regression [T]`` (bool):
    squared error. Computed in float64 for float64 logits, else float32.
    """
    if logits.shape != labels.shape or logits.shape != label_mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and label_mask "
            f"{tuple(label_mask.shape)} must have the same [B, T] shape"
        )
    x = logits if logits.dtype == torch.float64 else logits.float()
    label_mask = label_mask.bool()
    # Unlabelled cells get a harmless target, so no NaN/inf can leak through 0 * loss.
    safe = torch.where(label_mask, labels.to(x.dtype), torch.zeros_like(x))
    per = F.binary_cross_entropy_with_logits(x, safe.clamp(0.0, 1.0), reduction="none")
    if regression is not None and bool(regression.any()):
        per = torch.where(regression.to(per.device).unsqueeze(0), (x - safe) ** 2, per)
    return per * label_mask.to(x.dtype)


def masked_task_sums(
    logits: Tensor,
    labels: Tensor,
    label_mask: Tensor,
    task_kinds: Sequence[str],
    row_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task sums of the loss over labeled rows and the labeled-row counts: ``(sums [T], counts [T])``.

    logits, labels: [B, T]; label_mask: [B, T] bool (True = labeled); losses as in
    :func:`masked_task_losses`. ``row_weights [B]`` (>= 0, e.g. a recency weight) multiplies every row's
    loss in the sums; the counts stay unweighted, so a batch of down-weighted rows weighs less.
    """
    if len(task_kinds) != logits.shape[-1]:
        raise ValueError(f"{len(task_kinds)} task kinds for {logits.shape[-1]} tasks")
    per = masked_task_losses(logits, labels, label_mask, regression_flags(task_kinds, logits.device))
    if row_weights is not None:
        if row_weights.shape != logits.shape[:1]:
            raise ValueError(f"row_weights must be [B={logits.shape[0]}], got {tuple(row_weights.shape)}")
        per = per * row_weights.to(per.dtype).unsqueeze(1)
    return per.sum(0), label_mask.to(per.dtype).sum(0)


def masked_task_means(logits: Tensor, labels: Tensor, label_mask: Tensor, regression: Optional[Tensor] = None) -> Tensor:
    """Per-task mean loss over labelled rows, in float64.  ``[N, T]`` -> ``[T]``; NaN for a task without
    labelled rows (losses as in :func:`masked_task_losses`)."""
    per = masked_task_losses(logits.to(torch.float64), labels, label_mask, regression)
    n = label_mask.to(torch.float64).sum(0)
    return torch.where(n > 0, per.sum(0) / n.clamp_min(1), torch.full_like(n, math.nan))


def weighted_task_total(per_task: Tensor, task_weights: Sequence[float] | Tensor | None) -> Tensor:
    """``sum_t w_t * per_task[t]`` (weights default to 1)."""
    if task_weights is None:
        return per_task.sum()
    weights = torch.as_tensor(task_weights, dtype=per_task.dtype, device=per_task.device)
    return (per_task * weights).sum()


def masked_multitask_loss(
    logits: Tensor,
    labels: Tensor,
    label_mask: Tensor,
    task_kinds: Sequence[str],
    task_weights: Sequence[float] | Tensor | None = None,
    row_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Weighted sum over tasks of each task's mean loss over its labeled rows.

    logits, labels: [B, T]; label_mask: [B, T] bool (True = labeled). Binary tasks use BCE with logits,
    regression tasks squared error. Returns ``(total [], per_task [T])``; a task with no labeled row in
    the batch has loss 0 and no gradient. ``row_weights [B]``: see :func:`masked_task_sums`.
    """
    sums, counts = masked_task_sums(logits, labels, label_mask, task_kinds, row_weights)
    per_task = sums / counts.clamp_min(1.0)
    return weighted_task_total(per_task, task_weights), per_task
