"""The training loss's finiteness check, deferred so that a step does not wait for the device.

Each step writes its loss and loss parts into a small buffer on their device (no host sync). The host reads the
buffer, one copy and, under data parallelism, one all-reduce, when ``every`` steps have been recorded and whenever
the owner asks: before a validation, at the end of an epoch, before a checkpoint is written. A NaN therefore never
reaches a checkpoint; the steps between the bad one and its check run on, on weights the bad step spoiled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["FiniteLossWatch", "NonFiniteLossError", "StepPlace"]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss becomes NaN or infinite; names the step and the tasks."""


@dataclass(frozen=True)
class StepPlace:
    """Where a training step ran, for the error message."""

    global_step: int
    epoch: int
    batch_idx: int


class FiniteLossWatch:
    """Records each step's loss and parts on their device; :meth:`check` raises :class:`NonFiniteLossError` on every
    rank at once when any rank's loss or part of a recorded step was NaN/inf, naming the first such step.

    Args:
        every: steps recorded between checks (``1``: every step, a host sync each).
        all_reduce_sum: sums a tensor over the data-parallel ranks (``None`` alone); every rank must check at the
            same points, which holds as they record the same steps and are asked at the same hooks.
    """

    def __init__(self, every: int, all_reduce_sum: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"finite_check_every_n_steps must be an integer >= 1, got {every!r}")
        self.every = every
        self.all_reduce_sum = all_reduce_sum
        self._values: Optional[Tensor] = None  # [every, 1 + P]: each recorded step's loss, then its parts
        self._names: list[str] = []
        self._places: list[StepPlace] = []
        self._spoiled: Optional[str] = None  # the error, once a non-finite step's backward ran

    @property
    def pending(self) -> int:
        """Steps recorded since the last check."""
        return len(self._places)

    def record(self, loss: Tensor, parts: dict[str, Tensor], place: StepPlace) -> None:
        """Stores one step's ``loss []`` and ``parts`` (name -> ``[]``); checks once ``every`` steps are stored."""
        names = list(parts)
        if names != self._names and self._places:
            self.check()
        row = torch.stack([loss.detach().float().reshape(())]
                          + [parts[n].detach().float().reshape(()) for n in names])
        values = self._values
        if values is None or names != self._names or values.shape[0] != self.every or values.device != row.device:
            values = self._values = row.new_empty(self.every, len(row))
            self._names = names
        values[len(self._places)] = row
        self._places.append(place)
        if len(self._places) >= self.every:
            self.check(before_backward=True)

    def check(self, before_backward: bool = False) -> None:
        """Reads the recorded steps on the host and forgets them; raises for the first non-finite one.

        ``before_backward``: the last recorded step has not run its backward yet, so when it is the first
        non-finite one the weights are still intact. Otherwise a non-finite step spoiled them, and every later
        check raises again (an on-exception checkpoint is not written either).
        """
        if self._spoiled is not None:
            raise NonFiniteLossError(self._spoiled)
        if not self._places:
            return
        assert self._values is not None
        places, self._places = self._places, []
        values = self._values[: len(places)]
        bad = (~torch.isfinite(values)).float()
        if self.all_reduce_sum is not None:
            bad = self.all_reduce_sum(bad)
        host = torch.cat([values[:, :1], bad], dim=1).tolist()  # the one sync
        first = next((i for i, row in enumerate(host) if any(row[1:])), None)
        if first is None:
            return
        loss, flags = host[first][0], host[first][2:]
        place = places[first]
        names = [n for n, flag in zip(self._names, flags) if flag]
        later = len(places) - 1 - first
        noticed = "" if later == 0 else (
            f" It was checked {later} step(s) later (every {self.every} steps, before validation and before a "
            "checkpoint is written).")
        message = (
            f"training loss became non-finite ({_fmt(loss)} on this rank) at global step {place.global_step} "
            f"(epoch {place.epoch}, batch {place.batch_idx}); non-finite parts: "
            f"{names or 'none (the weighted sum overflowed)'}. Stopping; the last checkpoint written before this "
            f"step is intact.{noticed}"
        )
        if not (before_backward and later == 0):
            self._spoiled = message
        raise NonFiniteLossError(message)


def _fmt(value: float) -> str:
    return str(value) if not math.isfinite(value) else f"{value:.6g}"
