"""Definitions to check lattice.metrics against (not a test module itself): slow, obviously right."""
from __future__ import annotations

import numpy as np


def pairwise_auc(scores, labels) -> float:
    """O(n^2) definition: P(score_pos > score_neg) + 0.5 P(tie); a label > 0.5 is positive."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64) > 0.5
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(wins / (len(pos) * len(neg)))
