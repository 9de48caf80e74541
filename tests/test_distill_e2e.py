"""End to end with the data layer: a teacher logs its outputs with ``ParquetPredictionWriter`` (what
``lattice predict`` does), the student's ``LatticeDataModule`` joins them by ``example_id`` while
streaming, and the student trains on them. Missing teacher rows contribute no distillation loss;
duplicated ones are an error naming the id. (The join's own tests live with the data layer.)"""
import glob
import warnings

import lightning.pytorch as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("lattice.data.datamodule")

from _distill import TinyNetwork  # noqa: E402
from lattice.data import LatticeDataModule  # noqa: E402
from lattice.data.errors import DataError  # noqa: E402
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain  # noqa: E402
from lattice.distill import DistillationModule, TeacherEmbeddingCache  # noqa: E402
from lattice.train.module import LatticeModule  # noqa: E402
from lattice.train.writer import ParquetPredictionWriter  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _world():
    return SyntheticConfig(
        seed=3, num_users=150, num_items=120, num_clusters=4, domains=[SyntheticDomain("a", 700), SyntheticDomain("b", 300)],
        max_sequence_length=6, mean_sequence_length=3.0, row_group_size=256,
    )


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


class _Capture(pl.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append((batch.example_id.clone(), batch.teacher_logits.clone(), batch.teacher_mask.clone(),
                             batch.teacher_embedding.clone()))


def test_logged_teacher_outputs_reach_the_student_through_the_data_module(tmp_path):
    torch.manual_seed(0)
    cache_dir = str(tmp_path / "cache")
    data = LatticeDataModule(synthetic=_world(), cache_dir=cache_dir, batch_size=128, predict_split="train")
    schema = data.schema
    teacher = LatticeModule(TinyNetwork(schema, dim=8, hidden=16))
    _trainer(max_epochs=1).fit(teacher, datamodule=data)

    # DAS: log the teacher's logits and representation per example_id
    writer = ParquetPredictionWriter(output_dir=str(tmp_path / "teacher"), write_embedding=True, row_group_size=200)
    # Lightning re-instantiates every predict loader with sampler=None/batch_sampler=None, which
    # LatticeDataLoader currently rejects; a plain DataLoader over the same dataset sidesteps that.
    data.setup("predict")
    loader = torch.utils.data.DataLoader(data.dataset("predict"), batch_size=None)
    _trainer(callbacks=[writer]).predict(teacher, loader, return_predictions=False)
    files = glob.glob(str(tmp_path / "teacher" / "*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert {"example_id", "logit_click", "embedding"} <= set(table.column_names)
    # the teacher never scored every third example
    kept = table.filter(pc.not_equal(pc.bit_wise_and(table["example_id"], 3), 0))
    logged = tmp_path / "logged"
    logged.mkdir()
    pq.write_table(kept, logged / "part-0.parquet", row_group_size=100)
    by_id = {int(e): i for i, e in enumerate(kept["example_id"].to_pylist())}
    kept_logits = torch.tensor([kept[f"logit_{t}"].to_pylist() for t in schema.task_names]).T

    student_data = LatticeDataModule(synthetic=_world(), cache_dir=cache_dir, batch_size=128,
                                     teacher_paths=str(logged))
    dim = int(kept["embedding"].type.list_size)
    student = DistillationModule(
        TinyNetwork(schema, dim=4, hidden=8, extra_tokens=1), distillation="aux_head", adapter=True,
        teacher_embedding_dim=dim, cache=TeacherEmbeddingCache(dim, ttl=100),
    )
    capture = _Capture()
    trainer = _trainer(max_epochs=1, callbacks=[capture])
    trainer.fit(student, datamodule=student_data)
    assert capture.batches
    total = covered = 0
    for eid, logits, mask, emb in capture.batches:
        want_mask = (eid & 3) != 0
        assert torch.equal(mask, want_mask)  # a row the teacher never scored is marked missing
        rows = [by_id[int(e)] for e in eid[mask]]
        assert torch.allclose(logits[mask], kept_logits[rows])
        assert (logits[~mask] == 0).all() and (emb[~mask] == 0).all()
        total += len(eid)
        covered += int(mask.sum())
    assert 0.6 < covered / total < 0.9
    logged_metrics = trainer.callback_metrics
    assert torch.isfinite(logged_metrics["train/distill/loss"])
    assert 0.0 < float(logged_metrics["train/distill/coverage"]) < 1.0
    assert student.cache.lookups > 0

    # a duplicated example_id in the teacher outputs is an error naming it
    dup = pa.concat_tables([kept, kept.slice(5, 1)])
    bad = tmp_path / "dup"
    bad.mkdir()
    pq.write_table(dup, bad / "part-0.parquet")
    duplicate_id = int(kept["example_id"][5].as_py())
    with pytest.raises(DataError, match=f"duplicate example_id {duplicate_id}"):
        LatticeDataModule(synthetic=_world(), cache_dir=cache_dir, teacher_paths=str(bad)).setup("fit")
