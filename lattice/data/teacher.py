"""Teacher outputs as data (ExFM's data augmentation service): written per ``example_id`` to Parquet,
joined onto training batches by ``example_id`` while streaming.

File layout (what :func:`write_teacher_outputs` writes and :class:`TeacherTable` reads): an int64
``example_id`` column, one float ``logit_<task>`` column per task, and optionally an ``embedding``
column (``list<float32>`` or ``fixed_size_list<float32>[E]``).

The join: the teacher's ids are loaded once (sorted, with their logits and embeddings: ~(8 + 4T + 4E)
bytes per scored row) and every batch looks its ids up with one ``searchsorted`` -- a streaming join,
never a join of whole tables. A training row the teacher never scored gets ``teacher_mask = False``
(no distillation loss). A duplicated ``example_id`` in the teacher outputs is an error naming the id.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lattice.batch import Batch
from lattice.data.arrow import column, list_parts, valid_mask
from lattice.data.errors import DataError
from lattice.data.sources import ChunkReader, DataSource, as_sources, discover

__all__ = ["TEACHER_LOGIT_PREFIX", "TEACHER_EMBEDDING_COLUMN", "teacher_arrow_table", "write_teacher_outputs", "TeacherTable"]

TEACHER_LOGIT_PREFIX = "logit_"
TEACHER_EMBEDDING_COLUMN = "embedding"


def teacher_arrow_table(example_id, logits, task_names: Sequence[str], embedding=None) -> pa.Table:
    """One Arrow table in the teacher-output layout (``example_id [N]``, ``logits [N, T]``,
    ``embedding [N, E]``; tensors or arrays)."""
    eid = np.asarray(torch.as_tensor(example_id).cpu(), dtype=np.int64)
    lg = np.asarray(torch.as_tensor(logits).detach().float().cpu(), dtype=np.float32)
    if lg.ndim != 2 or lg.shape != (len(eid), len(task_names)):
        raise ValueError(f"logits must be [N={len(eid)}, T={len(task_names)}], got {list(lg.shape)}")
    data = {"example_id": pa.array(eid)}
    for j, t in enumerate(task_names):
        data[TEACHER_LOGIT_PREFIX + t] = pa.array(lg[:, j])
    if embedding is not None:
        emb = np.ascontiguousarray(torch.as_tensor(embedding).detach().float().cpu().numpy(), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(eid):
            raise ValueError(f"embedding must be [N={len(eid)}, E], got {list(emb.shape)}")
        data[TEACHER_EMBEDDING_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
    return pa.table(data)


def write_teacher_outputs(path: str, example_id, logits, task_names: Sequence[str], embedding=None,
                          row_group_size: int = 65536) -> str:
    """Write teacher outputs for ``N`` rows to one Parquet file; returns the path."""
    table = teacher_arrow_table(example_id, logits, task_names, embedding)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


class TeacherTable:
    """Teacher outputs, indexed by ``example_id`` for the streaming join.

    Args:
        paths: teacher-output Parquet files/directories/globs.
        task_names: the schema's tasks, in label order (every one needs a ``logit_<task>`` column).
        embedding: load the ``embedding`` column (``None``: when present).
    """

    def __init__(self, paths, task_names: Sequence[str], embedding: Optional[bool] = None) -> None:
        self.task_names = list(task_names)
        files = discover([DataSource(s.path, format="parquet") for s in as_sources(paths)])
        reader = ChunkReader()
        ids: List[np.ndarray] = []
        logits: List[np.ndarray] = []
        embs: List[np.ndarray] = []
        where: List[np.ndarray] = []  # file index of each row, for duplicate messages
        want_emb = embedding
        for fi, info in enumerate(files):
            cols = set(info.columns)
            if "example_id" not in cols:
                raise DataError("teacher outputs need an example_id column", file=info.path, column="example_id")
            missing = [TEACHER_LOGIT_PREFIX + t for t in self.task_names if TEACHER_LOGIT_PREFIX + t not in cols]
            if missing:
                raise DataError(f"teacher outputs lack logit column(s) {missing} for the schema's tasks",
                                file=info.path, column=missing[0])
            has_emb = TEACHER_EMBEDDING_COLUMN in cols
            if want_emb is None:
                want_emb = has_emb
            if want_emb and not has_emb:
                raise DataError("teacher outputs lack the embedding column", file=info.path,
                                column=TEACHER_EMBEDDING_COLUMN)
            read_cols = ["example_id"] + [TEACHER_LOGIT_PREFIX + t for t in self.task_names]
            if want_emb:
                read_cols.append(TEACHER_EMBEDDING_COLUMN)
            for chunk in range(len(info.chunk_rows)):
                table = reader.read(info, chunk, read_cols)
                eid = column(table, "example_id")
                if not pa.types.is_integer(eid.type):
                    raise DataError(f"example_id must be integer, got {eid.type}", file=info.path,
                                    column="example_id", row_group=chunk)
                if eid.null_count:
                    raise DataError("null example_id", file=info.path, column="example_id", row_group=chunk,
                                    row=info.chunk_starts[chunk] + int(np.argmax(~valid_mask(eid))))
                ids.append(np.asarray(eid.to_numpy(zero_copy_only=False), dtype=np.int64))
                lg = np.empty((table.num_rows, len(self.task_names)), dtype=np.float32)
                for j, t in enumerate(self.task_names):
                    arr = column(table, TEACHER_LOGIT_PREFIX + t)
                    v = np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.float32)
                    bad = ~np.isfinite(v) if arr.null_count == 0 else ~(np.isfinite(v) & valid_mask(arr))
                    if bad.any():
                        i = int(np.argmax(bad))
                        raise DataError(f"teacher logit {v[i]!r} is null or not finite", file=info.path,
                                        column=TEACHER_LOGIT_PREFIX + t, row_group=chunk,
                                        row=info.chunk_starts[chunk] + i)
                    lg[:, j] = v
                logits.append(lg)
                if want_emb:
                    embs.append(self._embedding(column(table, TEACHER_EMBEDDING_COLUMN), info.path, chunk))
                where.append(np.full(table.num_rows, fi, dtype=np.int32))
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(all_ids, kind="stable")
        self.example_id = all_ids[order]
        dup = np.nonzero(self.example_id[1:] == self.example_id[:-1])[0]
        if len(dup):
            i = int(dup[0])
            src = np.concatenate(where)[order]
            f1, f2 = files[int(src[i])].path, files[int(src[i + 1])].path
            raise DataError(f"duplicate example_id {int(self.example_id[i])} in the teacher outputs "
                            f"({f1}{'' if f1 == f2 else ' and ' + f2}); every example may be scored once")
        self.logits = (np.concatenate(logits) if logits else np.zeros((0, len(self.task_names)), np.float32))[order]
        self.embedding = np.concatenate(embs)[order] if want_emb and embs else None
        self.files = [f.path for f in files]

    @staticmethod
    def _embedding(arr: pa.Array, path: str, chunk: int) -> np.ndarray:
        if arr.null_count:
            raise DataError("null teacher embedding", file=path, column=TEACHER_EMBEDDING_COLUMN, row_group=chunk)
        offsets, child = list_parts(arr)
        lengths = np.diff(offsets)
        if len(lengths) and (lengths != lengths[0]).any():
            raise DataError(f"teacher embeddings have different lengths ({int(lengths.min())}..{int(lengths.max())})",
                            file=path, column=TEACHER_EMBEDDING_COLUMN, row_group=chunk)
        dim = int(lengths[0]) if len(lengths) else 0
        vals = np.asarray(child.slice(int(offsets[0]), int(offsets[-1] - offsets[0])).to_numpy(zero_copy_only=False),
                          dtype=np.float32)
        return vals.reshape(len(lengths), dim)

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def embedding_dim(self) -> Optional[int]:
        return None if self.embedding is None else int(self.embedding.shape[1])

    def lookup(self, example_id: np.ndarray):
        """``(logits [B, T], found [B] bool, embedding [B, E] or None)`` for the given ids (0 where missing)."""
        eid = np.asarray(example_id, dtype=np.int64)
        pos = np.searchsorted(self.example_id, eid)
        pos_c = np.minimum(pos, max(len(self.example_id) - 1, 0))
        found = (pos < len(self.example_id)) & (self.example_id[pos_c] == eid) if len(self.example_id) else \
            np.zeros(len(eid), bool)
        logits = np.where(found[:, None], self.logits[pos_c], np.float32(0)) if len(self.example_id) else \
            np.zeros((len(eid), len(self.task_names)), np.float32)
        emb = None
        if self.embedding is not None:
            emb = np.where(found[:, None], self.embedding[pos_c], np.float32(0)) if len(self.example_id) else \
                np.zeros((len(eid), self.embedding_dim), np.float32)
        return logits.astype(np.float32, copy=False), found, emb

    def join(self, batch: Batch) -> Batch:
        """``batch`` with ``teacher_logits``, ``teacher_mask`` (and ``teacher_embedding``) filled in."""
        logits, found, emb = self.lookup(batch.example_id.numpy())
        return dataclasses.replace(
            batch,
            teacher_logits=torch.from_numpy(np.ascontiguousarray(logits)),
            teacher_mask=torch.from_numpy(found),
            teacher_embedding=None if emb is None else torch.from_numpy(np.ascontiguousarray(emb)),
        )
