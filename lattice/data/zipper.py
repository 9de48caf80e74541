"""Lattice Zipper: one attribution window per impression, chosen by a deterministic hash.

A delayed-feedback task (a conversion that may arrive minutes or days after the impression) is
trained with several attribution windows at once: each impression is routed to exactly one window
``w`` by a hash of ``(user_id, item_id, timestamp)`` under the windows' probabilities, and its label is
"converted within ``seconds[w]``" (a conversion later than the window is a negative under it). The
model keeps one head per window and routes each row's loss to its window's head; serving and
evaluation use the longest ("oracle") window.

The hash is a pure function of the row, so the assignment is the same in every worker, rank and rerun.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from lattice.data.hashing import mix, to_unit_interval

__all__ = ["assign_windows", "window_labels"]


def assign_windows(
    user_id: np.ndarray, item_id: np.ndarray, timestamp: np.ndarray, probabilities: Sequence[float], seed: int = 0
) -> np.ndarray:
    """``[n]`` int64 window index per row, drawn with ``probabilities`` from a hash of the row.

    Args:
        user_id, item_id, timestamp: ``[n]`` int64.
        probabilities: per-window shares (sum to 1).
        seed: salts the hash (a different seed gives an independent assignment).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 1 or len(p) == 0 or (p < 0).any() or abs(p.sum() - 1.0) > 1e-6:
        raise ValueError(f"window probabilities must be >= 0 and sum to 1, got {list(p)}")
    u = to_unit_interval(mix(user_id, item_id, timestamp, seed=seed + 0x5A1B))
    cdf = np.cumsum(p)
    cdf[-1] = 1.0 + 1e-12  # every u < 1 lands in a window
    # searchsorted(cdf, u, side="right") for a handful of windows: count the bounds <= u (cheaper)
    w = np.zeros(len(u), dtype=np.int64)
    for bound in cdf[:-1]:
        w += u >= bound
    return w


def window_labels(label: np.ndarray, delay: np.ndarray, window_seconds: np.ndarray, window: np.ndarray) -> np.ndarray:
    """The label of each row under its window: ``label == 1 and delay <= window_seconds[window]``.

    Args:
        label: ``[n]`` eventual label (1 = the event happened).
        delay: ``[n]`` seconds from impression to the event (anything where label is 0).
        window_seconds: ``[W]`` window lengths.
        window: ``[n]`` window index per row.
    Returns ``[n]`` float64 labels (0/1).
    """
    limit = np.asarray(window_seconds, dtype=np.float64)[window]
    with np.errstate(invalid="ignore"):
        return ((label == 1) & (delay <= limit)).astype(np.float64)
