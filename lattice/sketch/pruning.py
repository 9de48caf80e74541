"""Multi-fidelity pruning from inside training: a Lightning callback that reports each validation result to the
Optuna trial at the number of training samples seen, and stops the trial when the pruner says so."""
from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
import optuna

from lattice.sketch.objective import Objective

__all__ = ["PruningCallback"]


class PruningCallback(pl.Callback):
    """Reports ``objective`` after every validation (also mid-epoch, with ``val_check_interval``) at step =
    training samples seen, so one long epoch can still be pruned; the best value reported is kept in
    :attr:`best` (with its step in :attr:`best_step`), which the trial returns.

    Under data parallelism rank 0 holds the trial, decides, and broadcasts the decision; the other ranks take
    ``trial=None``.
    """

    def __init__(self, trial: Optional[optuna.Trial], objective: Objective, batch_size: int) -> None:
        self.trial, self.objective, self.batch_size = trial, objective, batch_size
        self.best: float = math.nan
        self.best_step: int = 0
        self.reports = 0

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.best):
            return True
        return value < self.best if self.objective.direction == "minimize" else value > self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        results = pl_module.eval_results.get("val", {})
        value = self.objective.value(results, list(pl_module.domain_names), list(pl_module.task_names))
        step = int(trainer.global_step) * self.batch_size * trainer.world_size
        self.reports += 1
        if self._better(value):
            self.best, self.best_step = value, step
        prune = False
        if trainer.is_global_zero and self.trial is not None and math.isfinite(value):
            self.trial.report(value, step)
            prune = self.trial.should_prune()
        if trainer.world_size > 1:
            prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            raise optuna.TrialPruned(f"pruned at {step} samples seen with {self.objective.label} {value:.4f}")
