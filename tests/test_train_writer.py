"""ParquetPredictionWriter writes the teacher-output layout that TeacherTable reads (one format, one home)."""
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lattice.data.teacher import TEACHER_LOGIT_PREFIX, TeacherTable
from lattice.train.writer import ParquetPredictionWriter

TASKS = ["click", "like"]


def _predict(writer, batches, module):
    trainer = SimpleNamespace(global_rank=0)
    writer.on_predict_start(trainer, module)
    for i, prediction in enumerate(batches):
        writer.write_on_batch_end(trainer, module, prediction, None, None, i, 0)
    writer.on_predict_end(trainer, module)
    return writer.path


def _prediction(ids, emb_dim=None):
    logits = torch.randn(len(ids), len(TASKS))
    out = {"example_id": torch.tensor(ids), "logits": logits, "probs": torch.sigmoid(logits)}
    if emb_dim:
        out["embedding"] = torch.randn(len(ids), emb_dim)
    return out


def test_written_predictions_are_read_back_as_teacher_outputs(tmp_path):
    torch.manual_seed(0)
    module = SimpleNamespace(task_names=TASKS)
    batches = [_prediction([5, 1, 9], emb_dim=4), _prediction([2, 7], emb_dim=4)]
    writer = ParquetPredictionWriter(str(tmp_path), write_embedding=True, row_group_size=2)
    path = _predict(writer, batches, module)
    table = pq.read_table(path)
    assert table.column_names == ["example_id", *TASKS, *(TEACHER_LOGIT_PREFIX + t for t in TASKS), "embedding"]
    teacher = TeacherTable([str(tmp_path)], TASKS)
    logits = torch.cat([b["logits"] for b in batches]).numpy()
    ids = np.array([5, 1, 9, 2, 7])
    order = np.argsort(ids)
    assert teacher.example_id.tolist() == ids[order].tolist()
    np.testing.assert_array_equal(teacher.logits, logits[order])
    np.testing.assert_array_equal(teacher.embedding, torch.cat([b["embedding"] for b in batches]).numpy()[order])
    np.testing.assert_allclose(table.column("like").to_numpy(), torch.sigmoid(torch.from_numpy(logits[:, 1])).numpy())


def test_an_empty_prediction_set_writes_the_same_columns(tmp_path):
    module = SimpleNamespace(task_names=TASKS)
    full = pq.read_table(_predict(ParquetPredictionWriter(str(tmp_path / "full")), [_prediction([3])], module))
    empty = pq.read_table(_predict(ParquetPredictionWriter(str(tmp_path / "empty")), [], module))
    assert empty.num_rows == 0 and empty.schema == full.schema
    # with write_embedding but no rows, the embedding width is unknown: the file has the other columns
    no_rows = ParquetPredictionWriter(str(tmp_path / "no_rows"), write_embedding=True)
    assert pq.read_table(_predict(no_rows, [], module)).schema == full.schema


def test_write_embedding_without_a_representation_is_an_error(tmp_path):
    writer = ParquetPredictionWriter(str(tmp_path), write_embedding=True)
    with pytest.raises(ValueError, match="write_embedding=True"):
        _predict(writer, [_prediction([1])], SimpleNamespace(task_names=TASKS))
