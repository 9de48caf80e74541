"""Training: the LightningModule, its metrics and callbacks, strategies, checkpoints, and loading from configs.

* :class:`LatticeModule`: masked multi-task loss over a lattice network, per-(domain, task) metrics
  (:class:`MultiTaskMetrics`, arithmetic in :mod:`lattice.metrics`), the fused sparse optimizer.
* Callbacks: :class:`MetricsTable` (the per-domain x per-task table), :class:`ParquetPredictionWriter`
  (``lattice predict``'s outputs, the teacher-output layout).
* Distributed and durable: :class:`FSDP2Strategy` (``fully_shard`` of the dense layers),
  :class:`AtomicCheckpointIO` (a checkpoint is complete or absent).
* :func:`load_from_config`: ``(module, datamodule)`` from YAML configs and a checkpoint.
"""
from lattice.train.callbacks import MetricsTable
from lattice.train.checkpoint import AtomicCheckpointIO
from lattice.train.loading import load_from_config
from lattice.train.metrics import MultiTaskMetrics
from lattice.train.module import LatticeModule, NonFiniteLossError
from lattice.train.strategies import FSDP2Strategy
from lattice.train.writer import ParquetPredictionWriter

__all__ = [
    "LatticeModule",
    "NonFiniteLossError",
    "MultiTaskMetrics",
    "MetricsTable",
    "ParquetPredictionWriter",
    "FSDP2Strategy",
    "AtomicCheckpointIO",
    "load_from_config",
]
