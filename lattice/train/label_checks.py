"""Checks that the labels fit what the network was told about them, in training and in evaluation.

:class:`ConditionalLabelCheck` guards ``task_parents`` (ESMM): a conditional child is trained on
``p(parent) * p(child | parent)`` against its label over all impressions, which is only right when the
child's label is also present (as 0) where the parent is negative. A log that labels the child only on its
parent's positives (missing elsewhere) would silently train the product on those rows alone.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

__all__ = ["ConditionalLabelCheck", "ConditionalLabelError", "EvalConditionalLabelCheck"]


class ConditionalLabelError(ValueError):
    """A conditional (``task_parents``) child is labelled only where its parent is positive."""


def _conditional_error(child: str, parent: str, rows: str) -> ConditionalLabelError:
    return ConditionalLabelError(
        f"task_parents declares {child!r} conditional on {parent!r}, but in {rows} with both labels present "
        f"{parent!r} is always positive: {child!r} looks labelled only where {parent!r} is positive (missing "
        f"elsewhere). ESMM needs {child!r} over all impressions (0 where {parent!r} is 0): fill those labels "
        f"with 0, or drop {child!r} from task_parents"
    )


class _PairLabels:
    """The (child, parent) pairs of ``task_parents`` and their label columns, shared by both checks.

    Args:
        pairs: ``(child name, parent name, child index, parent index)`` in the labels' task order.
        reduce: sums a tensor over the data-parallel ranks (identity outside data parallelism).
        min_rows: rows with both labels present needed before concluding that the child is conditional.
    """

    def __init__(self, pairs: Sequence[tuple[str, str, int, int]], reduce: Callable[[Tensor], Tensor],
                 min_rows: int = 256) -> None:
        self.pairs = list(pairs)
        self.reduce = reduce
        self.min_rows = int(min_rows)
        self._child = torch.tensor([c for _, _, c, _ in self.pairs], dtype=torch.long)
        self._parent = torch.tensor([p for _, _, _, p in self.pairs], dtype=torch.long)

    def _masks(self, labels: Tensor, label_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(both labels present [B, P], and the parent negative [B, P])`` of one batch."""
        if self._child.device != labels.device:  # once: no host-to-device copy per step
            self._child, self._parent = self._child.to(labels.device), self._parent.to(labels.device)
        both = label_mask[:, self._child] & label_mask[:, self._parent]
        return both, both & (labels[:, self._parent] < 0.5)


class ConditionalLabelCheck(_PairLabels):
    """Watches the training labels of every (child, parent) pair of ``task_parents``.

    - Until a pair has shown one row with the child labelled and the parent labelled negative (the proof that
      the child is labelled over all impressions), every training batch adds to its counts; once
      ``min_rows`` rows with both labels present have all had a positive parent, it raises
      :class:`ConditionalLabelError` naming both tasks. A pair that has shown such a row is never checked
      again, so on correct data the check costs one small host read for the first batch or so.
    - Rows where the child is positive and the parent negative (a view-through conversion, say) contradict
      ``p(child) <= p(parent)``; they are counted on the device (no host read) and reported by
      :meth:`warn_contradictions` as a warning, since real logs can have a few.

    The arguments are :class:`_PairLabels`'s; ``reduce`` makes every rank take the same decision at the same step.
    """

    def __init__(self, pairs: Sequence[tuple[str, str, int, int]], reduce: Callable[[Tensor], Tensor],
                 min_rows: int = 256) -> None:
        super().__init__(pairs, reduce, min_rows)
        self.open = [True] * len(self.pairs)
        self._seen = torch.zeros(len(self.pairs), 2, dtype=torch.float64)  # both present, parent negative
        self._contradictions: Tensor | None = None
        self._child_positive: Tensor | None = None

    def update(self, labels: Tensor, label_mask: Tensor) -> None:
        """Adds one training batch (``labels [B, T]``, ``label_mask [B, T]``)."""
        if not self.pairs:
            return
        both, parent_negative = self._masks(labels, label_mask)
        child_labels = labels[:, self._child] > 0.5
        child_positive = both & child_labels
        contradictions = (parent_negative & child_labels).sum(0)
        if self._contradictions is None:
            self._contradictions = torch.zeros_like(contradictions)
            self._child_positive = torch.zeros_like(contradictions)
        self._contradictions += contradictions
        self._child_positive += child_positive.sum(0)
        if not any(self.open):
            return
        counts = torch.stack([both.sum(0), parent_negative.sum(0)], 1).to(torch.float64)
        self._seen += self.reduce(counts).cpu()
        for i, (child_name, parent_name, _, _) in enumerate(self.pairs):
            if not self.open[i]:
                continue
            rows, negatives = self._seen[i].tolist()
            if negatives > 0:
                self.open[i] = False
            elif rows >= self.min_rows:
                raise _conditional_error(child_name, parent_name, f"the first {int(rows)} training rows")

    def warn_contradictions(self, warn: Callable[..., None] = warnings.warn) -> None:
        """Warns through ``warn`` (and resets the counts) for every pair with rows whose child is positive and
        parent negative. Under data parallelism every rank must call it (the counts are summed over ranks)."""
        if self._contradictions is None:
            return
        both = self.reduce(torch.stack([self._contradictions, self._child_positive]).to(torch.float64)).tolist()
        self._contradictions.zero_()
        self._child_positive.zero_()
        for (child_name, parent_name, _, _), bad, positives in zip(self.pairs, *both):
            if bad > 0:
                warn(
                    f"task_parents: {int(bad)} of {int(positives)} positive {child_name!r} training labels this "
                    f"epoch have a negative {parent_name!r}; the conditional model predicts "
                    f"p({child_name}) <= p({parent_name}), so these rows cannot be fitted"
                )


class EvalConditionalLabelCheck(_PairLabels):
    """The same refusal as :class:`ConditionalLabelCheck`, for ``lattice validate`` / ``test`` (and the
    validation loop of ``fit``): scoring the composed ``p(parent) * p(child | parent)`` against labels that exist
    only on the parent's positives would report a meaningless AUC without a word.

    Evaluation loaders need not give every rank the same number of batches, so nothing is reduced per step:
    :meth:`update` only adds on the device, and :meth:`finish`, called once per evaluation epoch on every rank,
    sums over ranks and raises on all of them at once when a pair has ``min_rows`` rows with both labels present
    and not one with a negative parent. A pair with fewer rows is left undecided. The arguments are
    :class:`_PairLabels`'s.
    """

    def __init__(self, pairs: Sequence[tuple[str, str, int, int]], reduce: Callable[[Tensor], Tensor],
                 min_rows: int = 256) -> None:
        super().__init__(pairs, reduce, min_rows)
        self._counts: Tensor | None = None  # [P, 2]: both present, parent negative

    def update(self, labels: Tensor, label_mask: Tensor) -> None:
        """Adds one evaluation batch (``labels [B, T]``, ``label_mask [B, T]``); no host read."""
        if not self.pairs:
            return
        both, parent_negative = self._masks(labels, label_mask)
        counts = torch.stack([both.sum(0), parent_negative.sum(0)], 1)
        self._counts = counts if self._counts is None else self._counts + counts

    def finish(self, stage: str, device: torch.device | str = "cpu") -> None:
        """Decides on the epoch's rows (``stage`` names them in the error) and resets. Every rank must call it
        (one reduction, of a tensor on ``device``: the module's, which the process group's backend expects)."""
        if not self.pairs:
            return
        local = self._counts if self._counts is not None else torch.zeros(len(self.pairs), 2, dtype=torch.long)
        self._counts = None
        totals = self.reduce(local.to(device=device, dtype=torch.float64)).tolist()
        for (child_name, parent_name, _, _), (rows, negatives) in zip(self.pairs, totals):
            if negatives == 0 and rows >= self.min_rows:
                raise _conditional_error(child_name, parent_name, f"all {int(rows)} {stage} rows")
