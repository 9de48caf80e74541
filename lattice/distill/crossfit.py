"""Out-of-fold teacher logging, as ExFM's data augmentation service logs it: the teacher's prediction for a row
is made before the teacher has trained on that row.

The student's rows are hashed into k folds by ``example_id``; fold k's teacher trains on its slice without the
student rows of fold k and scores exactly those rows (:func:`cross_fit_slices`). A teacher scoring rows it
trained on would hand the student soft labels that partly repeat the student's own labels.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Dict, List, Sequence

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from lattice.data.datamodule import LatticeDataModule
from lattice.data.hashing import hash_to_range
from lattice.data.teacher import TEACHER_LOGIT_PREFIX
from lattice.train.writer import ParquetPredictionWriter

__all__ = ["fold_of", "cross_fit_slices", "log_teacher_outputs", "read_teacher_logits"]


def fold_of(example_id: np.ndarray, folds: int) -> np.ndarray:
    """``[N]`` fold of each ``example_id`` in ``[0, folds)``: a fixed hash (splitmix64), so ids that are
    consecutive row numbers land in every fold evenly."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return hash_to_range(example_id, folds)


def cross_fit_slices(slices_dir: str, teacher_slice: str, student_domain: str, folds: int,
                     student_slice: str = "student", row_group_size: int = 4096) -> List[Dict[str, str]]:
    """Writes each fold's teacher training set and the rows it scores; returns per fold ``{"train": dir,
    "score": dir}``.

    ``slices_dir/<teacher_slice>/`` holds the teacher's rows (one Parquet file per domain) and
    ``slices_dir/<student_slice>/<student_domain>.parquet`` the student's. Fold k's teacher trains on
    ``<teacher_slice>_fold<k>/`` (the teacher slice without the student rows of fold k; every other row and
    domain kept) and scores ``<student_slice>_fold<k>/``. ``folds == 1``: the teacher trains on its whole slice
    and scores the student's rows in-sample.
    """
    student = pq.read_table(os.path.join(slices_dir, student_slice, f"{student_domain}.parquet"))
    if folds == 1:
        return [{"train": os.path.join(slices_dir, teacher_slice), "score": os.path.join(slices_dir, student_slice)}]
    ids = student["example_id"].to_numpy()
    student_fold = fold_of(ids, folds)
    out = []
    for k in range(folds):
        held = pa.array(ids[student_fold == k])
        train_dir = os.path.join(slices_dir, f"{teacher_slice}_fold{k}")
        score_dir = os.path.join(slices_dir, f"{student_slice}_fold{k}")
        os.makedirs(train_dir, exist_ok=True)
        os.makedirs(score_dir, exist_ok=True)
        for name in sorted(os.listdir(os.path.join(slices_dir, teacher_slice))):
            table = pq.read_table(os.path.join(slices_dir, teacher_slice, name))
            if name == f"{student_domain}.parquet":
                table = table.filter(pc.invert(pc.is_in(table["example_id"], value_set=held)))
            pq.write_table(table, os.path.join(train_dir, name), row_group_size=row_group_size)
        pq.write_table(student.filter(pa.array(student_fold == k)),
                       os.path.join(score_dir, f"{student_domain}.parquet"), row_group_size=row_group_size)
        out.append({"train": train_dir, "score": score_dir})
    return out


def log_teacher_outputs(module: pl.LightningModule, schema, paths: str, out_dir: str, batch_size: int = 4096,
                        embedding: bool = True) -> str:
    """Writes the teacher's logits (and representation) per ``example_id`` of ``paths``' rows to ``out_dir`` with
    :class:`ParquetPredictionWriter`, as ``lattice predict`` does; returns ``out_dir`` (replaced if it exists)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    dm = LatticeDataModule(paths=paths, schema=schema, split="none", val_fraction=0.0, test_fraction=0.0,
                           batch_size=batch_size, eval_batch_size=4096, seed=0, shuffle=True)
    dm.setup("predict")
    loader = torch.utils.data.DataLoader(dm.dataset("predict"), batch_size=None)  # the reader yields whole Batches
    writer = ParquetPredictionWriter(output_dir=out_dir, write_embedding=embedding)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    trainer.predict(module, loader, return_predictions=False)
    return out_dir


def _read_dir(directory: str) -> pa.Table:
    files = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {directory!r}")
    return pa.concat_tables([pq.read_table(f) for f in files])


def read_teacher_logits(output_dirs: Sequence[str], rows_dir: str, tasks: Sequence[str],
                        average: bool = True) -> Dict[str, np.ndarray]:
    """Teacher logits joined to ``rows_dir``'s rows by ``example_id``, in that folder's row order:
    ``{"logits": [N, T] float64, "labels": [N, T] float64 (nan: unlabeled or no such column)}``.

    ``average``: every folder of ``output_dirs`` scored every row (say, each fold's teacher on the test rows)
    and their logits are averaged; otherwise the folders together score each row once (the out-of-fold logs).
    """
    rows = _read_dir(rows_dir)
    ids = rows["example_id"].to_numpy()
    groups = [[_read_dir(d)] for d in output_dirs] if average else [[_read_dir(d) for d in output_dirs]]
    logits = np.zeros((len(ids), len(tasks)))
    for tables in groups:
        out = pa.concat_tables(tables)
        pos = {int(e): i for i, e in enumerate(out["example_id"].to_numpy())}
        missing = [int(e) for e in ids if int(e) not in pos]
        if missing:
            raise ValueError(f"teacher outputs in {output_dirs} lack {len(missing)} example_ids of {rows_dir!r} "
                             f"(first {missing[:5]})")
        take = np.array([pos[int(e)] for e in ids])
        logits += np.stack([out[TEACHER_LOGIT_PREFIX + t].to_numpy()[take].astype(np.float64) for t in tasks],
                           1) / len(groups)
    labels = np.stack([rows[t].to_numpy(zero_copy_only=False).astype(np.float64) if t in rows.column_names
                       else np.full(len(ids), np.nan) for t in tasks], 1)
    return {"logits": logits, "labels": labels}
