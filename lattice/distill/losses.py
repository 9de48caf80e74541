"""Distillation losses: soft-label BCE against a teacher, masked by teacher coverage and task presence.

Conventions (shapes): ``B`` rows, ``T`` tasks in schema order. Teacher outputs are logits ``[B, T]``
(for a regression task, the teacher's raw prediction); ``teacher_mask`` says which rows the teacher
scored (``[B]``, or ``[B, T]`` for per-task coverage). A row the teacher never scored, a task the
row's domain does not have, and a non-finite teacher logit all contribute nothing, never a negative.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["teacher_targets", "distillation_mask", "distillation_loss"]


def _binary_tasks(task_kinds: Sequence[str], device) -> Tensor:
    bad = [k for k in task_kinds if k not in ("binary", "regression")]
    if bad:
        raise ValueError(f"task kinds must be 'binary' or 'regression', got {bad}")
    return torch.tensor([k == "binary" for k in task_kinds], dtype=torch.bool, device=device)


def teacher_targets(
    teacher_logits: Tensor,
    task_kinds: Sequence[str],
    temperature: float = 1.0,
    label_scale: float = 1.0,
) -> Tensor:
    """The soft labels a student learns from the teacher.

    Binary task: ``clamp(label_scale * sigmoid(teacher_logit / temperature), 0, 1)`` — temperature > 1
    softens the teacher, ``label_scale`` rescales its probabilities (e.g. to correct a teacher whose base
    rate differs from the student's traffic). Regression task: ``label_scale * teacher_prediction``
    (temperature does not apply). ``[B, T] -> [B, T]`` float32; non-finite inputs stay non-finite (the
    caller masks them).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if label_scale < 0:
        raise ValueError(f"label_scale must be >= 0, got {label_scale}")
    if teacher_logits.dim() != 2 or teacher_logits.shape[1] != len(task_kinds):
        raise ValueError(f"teacher_logits must be [B, T={len(task_kinds)}], got {tuple(teacher_logits.shape)}")
    logits = teacher_logits.float()
    binary = _binary_tasks(task_kinds, logits.device)
    probs = (torch.sigmoid(logits / temperature) * label_scale).clamp(0.0, 1.0)
    return torch.where(binary.unsqueeze(0), probs, logits * label_scale)


def distillation_mask(
    teacher_logits: Tensor,
    teacher_mask: Tensor | None,
    task_present: Tensor | None = None,
) -> Tensor:
    """``[B, T]`` bool: where a distillation target exists — the teacher scored the row (``teacher_mask``
    ``[B]`` or ``[B, T]``; ``None`` = every row), the task exists in the row's domain (``task_present``
    ``[B, T]``; ``None`` = everywhere) and the teacher's logit is finite."""
    B, T = teacher_logits.shape
    mask = torch.isfinite(teacher_logits)
    if teacher_mask is not None:
        tm = teacher_mask.to(device=mask.device, dtype=torch.bool)
        if tm.shape == (B,):
            tm = tm.unsqueeze(1)
        elif tm.shape != (B, T):
            raise ValueError(f"teacher_mask must be [B={B}] or [B, T]=[{B}, {T}], got {tuple(tm.shape)}")
        mask = mask & tm
    if task_present is not None:
        if task_present.shape != (B, T):
            raise ValueError(f"task_present must be [B, T]=[{B}, {T}], got {tuple(task_present.shape)}")
        mask = mask & task_present.to(device=mask.device, dtype=torch.bool)
    return mask


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    task_kinds: Sequence[str],
    teacher_mask: Tensor | None = None,
    task_present: Tensor | None = None,
    task_weights: Sequence[float] | Tensor | None = None,
    temperature: float = 1.0,
    label_scale: float = 1.0,
    targets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft-label distillation: a weighted sum over tasks of each task's mean loss over its covered rows.

    Binary task: ``T² · BCE(sigmoid(student / T), target)`` with the teacher's soft label as target
    (``T`` = temperature; the ``T²`` factor keeps gradient magnitudes independent of it, as in Hinton et
    al.). Regression task: squared error to the (scaled) teacher prediction.

    Args:
        student_logits: ``[B, T]`` the distillation head's logits.
        teacher_logits: ``[B, T]`` teacher logits (always used for the mask).
        task_kinds: ``"binary"``/``"regression"`` per task.
        teacher_mask: ``[B]`` or ``[B, T]`` bool, rows the teacher scored (``None``: all).
        task_present: ``[B, T]`` bool, the task exists in the row's domain (``None``: everywhere).
        task_weights: ``[T]`` per-task weights (``None``: 1).
        temperature, label_scale: see :func:`teacher_targets`.
        targets: ``[B, T]`` precomputed soft targets (e.g. a student adapter's output, already detached);
            ``None`` = :func:`teacher_targets` of ``teacher_logits``.

    Returns ``(total [], per_task [T])``; a task with no covered row has loss 0 and no gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same [B, T] shape"
        )
    mask = distillation_mask(teacher_logits, teacher_mask, task_present)
    if targets is None:
        targets = teacher_targets(teacher_logits, task_kinds, temperature, label_scale)
    elif targets.shape != student_logits.shape:
        raise ValueError(f"targets must be {tuple(student_logits.shape)}, got {tuple(targets.shape)}")
    student = student_logits.float()
    binary = _binary_tasks(task_kinds, student.device).unsqueeze(0)
    # Uncovered entries get a harmless target so no NaN/inf leaks through 0 * loss.
    safe = torch.where(mask, targets.float(), torch.zeros_like(student))
    bce = F.binary_cross_entropy_with_logits(student / temperature, safe.clamp(0.0, 1.0), reduction="none")
    bce = bce * (temperature * temperature)
    mse = (student - safe) ** 2
    elementwise = torch.where(binary, bce, mse)
    maskf = mask.to(student.dtype)
    per_task = (elementwise * maskf).sum(0) / maskf.sum(0).clamp_min(1.0)
    if task_weights is None:
        weights = torch.ones_like(per_task)
    else:
        weights = torch.as_tensor(task_weights, dtype=per_task.dtype, device=per_task.device)
        if weights.shape != per_task.shape:
            raise ValueError(f"task_weights must have {per_task.numel()} entries, got {tuple(weights.shape)}")
    return (per_task * weights).sum(), per_task
