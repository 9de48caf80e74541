"""Conditional tasks (ESMM, Ma et al. SIGIR 2018): a child task that can only be positive after its parent
(a conversion after a click) is predicted over every impression as ``p(child) = p(parent) * p(child |
parent)``.

The heads then give the child's *conditional* logit, and :class:`ConditionalTasks` turns it into the logit
of the product, so the loss, the metrics and the served probability all see ``p(parent and child)``
against the child's label over all impressions. The child learns from every impression, not only from
the parent's positives (no sample-selection bias), and its prediction never exceeds its parent's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["compose_logits", "ConditionalTasks"]

_LOG_HALF = -0.6931471805599453


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def compose_logits(parent: Tensor, child: Tensor, max_log_prob: float = -1e-6) -> Tensor:
    """The logit of ``sigmoid(parent) * sigmoid(child)``, computed in log space (no overflow for logits of
    any size). ``log p`` is capped at ``max_log_prob`` (p <= 1 - 1e-6), so two very confident logits give a
    large finite logit, never ``inf``. Broadcasts like ``parent + child``."""
    log_p = (F.logsigmoid(parent) + F.logsigmoid(child)).clamp(max=max_log_prob)
    return log_p - _log1mexp(log_p)


class ConditionalTasks(nn.Module):
    """Composes every child task's logits with its parent's (ESMM). No parameters.

    Args:
        tasks: the schema's task specs (``name``, ``kind``, optional ``windows``).
        parents: child task name -> parent task name. Both binary; chains (click -> conversion ->
            repurchase) compose in order, so a grandchild gets ``p(a) p(b | a) p(c | b)``; no cycles. A
            windowed child composes each window's logit; a windowed parent lends its serving (longest
            window) logit.

    The child's label must be over all impressions (negative where the parent is negative), as a
    consolidated log has it; a child labelled only on the parent's positives (missing elsewhere) would be
    trained on those rows alone. :class:`~lattice.train.module.LatticeModule` refuses such labels in
    training (:class:`~lattice.train.label_checks.ConditionalLabelCheck`).

    Shape: ``logits [B, T]``, ``train_logits [B, T]``, ``window_logits`` name -> ``[B, W]``, all in the
    schema's task order; returns the same three with every child composed.
    """

    def __init__(self, tasks: Sequence[Any], parents: Mapping[str, str]) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        kinds = {t.name: getattr(t, "kind", "binary") for t in tasks}
        for child, parent in parents.items():
            for role, name in (("child", child), ("parent", parent)):
                if name not in kinds:
                    raise ValueError(f"task_parents: {role} {name!r} is not a task of the schema ({names})")
                if kinds[name] != "binary":
                    raise ValueError(f"task_parents: {role} {name!r} is a {kinds[name]} task; only binary tasks "
                                     f"can be conditional")
            if child == parent:
                raise ValueError(f"task_parents: task {child!r} is its own parent")
        self.order: list[tuple[str, str]] = []  # (child, parent), every parent composed before its children
        done: set[str] = set()
        for child in parents:
            path, node = [], child
            while node in parents and node not in done:
                if node in path:
                    cycle = " -> ".join(path[path.index(node):] + [node])
                    raise ValueError(f"task_parents has a cycle: {cycle}")
                path.append(node)
                node = parents[node]
            for node in reversed(path):
                self.order.append((node, parents[node]))
                done.add(node)
        self.index = {name: i for i, name in enumerate(names)}

    def forward(
        self, logits: Tensor, train_logits: Tensor, window_logits: Mapping[str, Tensor]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        if not self.order:
            return logits, train_logits, dict(window_logits)
        served, trained = list(logits.unbind(1)), list(train_logits.unbind(1))
        windows = dict(window_logits)
        for child, parent in self.order:
            c, p = self.index[child], self.index[parent]
            served[c] = compose_logits(served[p], served[c])
            trained[c] = compose_logits(served[p], trained[c])
            if child in windows:
                windows[child] = compose_logits(served[p].unsqueeze(1), windows[child])
        return torch.stack(served, 1), torch.stack(trained, 1), windows
