"""Writes predictions (and teacher outputs for distillation) to Parquet, one row per example_id."""
from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lattice.data.teacher import teacher_arrow_table


class ParquetPredictionWriter(BasePredictionWriter):
    """Streams ``predict`` outputs to ``<output_dir>/predictions-rank<R>.parquet`` in row groups.

    Columns: ``example_id`` (int64), ``<task>`` (probability for binary tasks, the prediction for
    regression), then the teacher-output layout that :class:`lattice.data.teacher.TeacherTable` reads:
    ``logit_<task>`` (float32, :data:`~lattice.data.teacher.TEACHER_LOGIT_PREFIX`) and, with
    ``write_embedding``, ``embedding`` (fixed-size list<float32>) — the teacher representation used by
    KTAP-style distillation.
    """

    def __init__(self, output_dir: str = "predictions", write_embedding: bool = False, row_group_size: int = 65536) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.write_embedding = write_embedding
        self.row_group_size = row_group_size
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.path: str | None = None

    def _table(self, prediction: dict[str, Any], task_names: Sequence[str]) -> pa.Table:
        embedding = None
        if self.write_embedding:
            if "embedding" not in prediction:
                raise ValueError("write_embedding=True but the network returns no representation to write")
            embedding = prediction["embedding"]
        return _columns(prediction["example_id"], prediction["probs"], prediction["logits"], task_names, embedding)

    def _flush(self) -> None:
        if not self._pending:
            return
        table = pa.concat_tables(self._pending)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self._pending, self._pending_rows = [], 0

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        self.path = os.path.join(self.output_dir, f"predictions-rank{trainer.global_rank}.parquet")
        self._writer, self._pending, self._pending_rows = None, [], 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        table = self._table(prediction, pl_module.task_names)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.row_group_size:
            self._flush()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        elif self.path is not None:  # an empty prediction set still gets a valid, empty file
            pq.write_table(self._table_schema(pl_module).empty_table(), self.path)

    def _table_schema(self, pl_module) -> pa.Schema:
        empty = torch.zeros(0, len(pl_module.task_names))
        return _columns(torch.zeros(0, dtype=torch.int64), empty, empty, pl_module.task_names).schema


def _columns(example_id: Tensor, probs: Tensor, logits: Tensor, task_names: Sequence[str],
             embedding: Tensor | None = None) -> pa.Table:
    """The teacher-output table (:func:`lattice.data.teacher.teacher_arrow_table`) with each task's
    probability column after ``example_id``.  example_id [N], probs and logits [N, T], embedding [N, E]."""
    table = teacher_arrow_table(example_id, logits, task_names, embedding)
    probs = probs.detach().cpu().numpy().astype(np.float32)
    for t, name in enumerate(task_names):
        table = table.add_column(1 + t, name, pa.array(probs[:, t]))
    return table
