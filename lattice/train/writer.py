"""Writes predictions (and teacher outputs for distillation) to Parquet, one row per example_id."""
from __future__ import annotations

import os
from typing import Any, Sequence

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.callbacks import BasePredictionWriter


class ParquetPredictionWriter(BasePredictionWriter):
    """Streams ``predict`` outputs to ``<output_dir>/predictions-rank<R>.parquet`` in row groups.

    Columns: ``example_id`` (int64), ``<task>`` (probability for binary tasks, the prediction for
    regression), ``logit_<task>`` (float32) and, with ``write_embedding``, ``embedding``
    (fixed-size list<float32>) — the teacher representation used by KTAP-style distillation.
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
        columns = {"example_id": pa.array(prediction["example_id"].cpu().numpy().astype(np.int64))}
        probs = prediction["probs"].cpu().numpy().astype(np.float32)
        logits = prediction["logits"].cpu().numpy().astype(np.float32)
        for t, name in enumerate(task_names):
            columns[name] = pa.array(probs[:, t])
        for t, name in enumerate(task_names):
            columns[f"logit_{name}"] = pa.array(logits[:, t])
        if self.write_embedding:
            if "embedding" not in prediction:
                raise ValueError("write_embedding=True but the network returns no representation to write")
            emb = prediction["embedding"].cpu().numpy().astype(np.float32)
            columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
        return pa.table(columns)

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
        fields = [pa.field("example_id", pa.int64())]
        fields += [pa.field(n, pa.float32()) for n in pl_module.task_names]
        fields += [pa.field(f"logit_{n}", pa.float32()) for n in pl_module.task_names]
        return pa.schema(fields)
