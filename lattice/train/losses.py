"""Masked multi-task losses: a missing label contributes nothing, never a negative."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_task_sums(
    logits: Tensor,
    labels: Tensor,
    label_mask: Tensor,
    task_kinds: Sequence[str],
    row_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-task sums of the loss over labeled rows and the labeled-row counts: ``(sums [T], counts [T])``.

    logits, labels: [B, T]; label_mask: [B, T] bool (True = labeled). Binary tasks use BCE with logits,
    regression tasks squared error. ``row_weights [B]`` (>= 0, e.g. a recency weight) multiplies every
    row's loss in the sums; the counts stay unweighted, so a batch of down-weighted rows weighs less.
    """
    if logits.shape != labels.shape or logits.shape != label_mask.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and label_mask "
            f"{tuple(label_mask.shape)} must have the same [B, T] shape"
        )
    if len(task_kinds) != logits.shape[1]:
        raise ValueError(f"{len(task_kinds)} task kinds for {logits.shape[1]} tasks")
    logits = logits.float()
    mask = label_mask.to(logits.dtype)
    # Masked rows get a harmless target so no NaN/inf can leak through 0 * loss.
    safe_labels = torch.where(label_mask, labels.float(), torch.zeros_like(logits))
    is_binary = torch.tensor([k == "binary" for k in task_kinds], device=logits.device)
    bce = F.binary_cross_entropy_with_logits(logits, safe_labels.clamp(0.0, 1.0), reduction="none")
    mse = (logits - safe_labels) ** 2
    elementwise = torch.where(is_binary.unsqueeze(0), bce, mse)
    weighted = mask
    if row_weights is not None:
        if row_weights.shape != logits.shape[:1]:
            raise ValueError(f"row_weights must be [B={logits.shape[0]}], got {tuple(row_weights.shape)}")
        weighted = mask * row_weights.to(logits.dtype).unsqueeze(1)
    return (elementwise * weighted).sum(0), mask.sum(0)


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
