"""Per-(domain, task) evaluation as a torchmetrics ``Metric``; the arithmetic is :mod:`lattice.metrics`.

:class:`MultiTaskMetrics` keeps every evaluated row (its states are concatenated across ranks when
synced, so an AUC is computed over all ranks' rows, never averaged from per-rank AUCs) and reports, per
(domain, task) and per task over all domains: AUC, LogLoss, normalized entropy (NE), calibration, group AUC by user and, where the
data carries true label probabilities, the oracle AUC.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lattice import metrics


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
            "auc": metrics.binary_auc(out, y),
            "logloss": metrics.log_loss(p, y),
            "ne": metrics.normalized_entropy(p, y),
            "calibration": metrics.calibration(p, y),
            "count": float(y.numel()),
        }
        if self.compute_group_auc:
            values["gauc"] = metrics.group_auc(out, y, users)
        if truth is not None:
            values["oracle_auc"] = metrics.binary_auc(truth, y)
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
