"""LatticeDataModule: the synthetic default, splits, teacher joins, CLI parsing, Lightning resume."""
from __future__ import annotations

import os
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from lattice.data import (DataError, LatticeDataModule, SyntheticConfig, SyntheticDomain, TeacherTable,
                          write_teacher_outputs)

from _data_utils import collect_ids


def tiny_config(**kw) -> SyntheticConfig:
    base = dict(num_users=300, num_items=200,
                domains=[SyntheticDomain("feed", 1500, absent_features=["query_cluster"]),
                         SyntheticDomain("shop", 300, absent_features=["item_tags"])],
                row_group_size=256)
    base.update(kw)
    return SyntheticConfig(**base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_synthetic_default_is_generated_once_into_the_cache(cache):
    dm = LatticeDataModule(synthetic=tiny_config(), cache_dir=cache, batch_size=256)
    # the schema is known before any data exists (the CLI links it into the model at instantiation)
    assert dm.domains == ["feed", "shop"] and dm.tasks == ["click", "like", "conversion"]
    assert dm.num_domains == 2 and dm.num_tasks == 3
    assert dm.schema.task("conversion").num_windows == 3
    assert not os.path.exists(dm.data_dir)
    dm.prepare_data()
    marker = os.path.join(dm.data_dir, "world.json")
    mtime = os.path.getmtime(marker)
    dm.setup("fit")
    ids = collect_ids(dm.train_dataloader())
    val = collect_ids(dm.val_dataloader())
    test = collect_ids(dm.test_dataloader())
    both = np.concatenate([ids, val, test])
    assert len(both) == 1800 and len(np.unique(both)) == 1800
    again = LatticeDataModule(synthetic=tiny_config(), cache_dir=cache)
    again.prepare_data()
    assert again.data_dir == dm.data_dir and os.path.getmtime(marker) == mtime
    assert dm.feature_roles()["noise"] and set(dm.oracle()) == {"feed", "shop"}
    assert dm.collate(b := next(iter(dm.val_dataloader()))) is b


def test_time_split_orders_the_splits(cache):
    dm = LatticeDataModule(synthetic=tiny_config(), cache_dir=cache, split="time", val_fraction=0.2,
                           test_fraction=0.1, batch_size=512)
    dm.setup("fit")
    ts = {}
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        ts[split] = np.concatenate([b.example_id.numpy() for b in ds.iter_shard(0, 0, 1, 0, 1)])
    counts = {k: len(v) for k, v in ts.items()}
    assert sum(counts.values()) == 1800
    assert abs(counts["val"] / 1800 - 0.2) < 0.03 and abs(counts["test"] / 1800 - 0.1) < 0.03
    # evaluation batches use the longest ("oracle") Zipper window
    vb = next(iter(dm.val_dataloader()))
    assert vb.label_window[:, 2].eq(2).all()


def test_teacher_outputs_join_by_example_id(cache, tmp_path):
    dm = LatticeDataModule(synthetic=tiny_config(), cache_dir=cache, split="none", batch_size=300, shuffle=True)
    dm.setup("fit")
    all_ids = collect_ids(dm.train_dataloader())
    rng = np.random.default_rng(0)
    scored = rng.choice(all_ids, size=1200, replace=False)
    logits = rng.normal(size=(1200, 3)).astype(np.float32)
    emb = rng.normal(size=(1200, 4)).astype(np.float32)
    write_teacher_outputs(str(tmp_path / "t" / "a.parquet"), scored[:700], logits[:700], dm.tasks, emb[:700])
    write_teacher_outputs(str(tmp_path / "t" / "b.parquet"), scored[700:], logits[700:], dm.tasks, emb[700:])
    want = dict(zip(scored.tolist(), range(1200)))
    dm2 = LatticeDataModule(synthetic=tiny_config(), cache_dir=cache, split="none", batch_size=300,
                            teacher_paths=str(tmp_path / "t"))
    dm2.setup("fit")
    found = 0
    for batch in dm2.train_dataloader():
        for i, eid in enumerate(batch.example_id.tolist()):
            if eid in want:
                found += 1
                assert batch.teacher_mask[i]
                assert torch.equal(batch.teacher_logits[i], torch.from_numpy(logits[want[eid]]))
                assert torch.equal(batch.teacher_embedding[i], torch.from_numpy(emb[want[eid]]))
            else:  # never scored: masked, zeros
                assert not batch.teacher_mask[i] and batch.teacher_logits[i].eq(0).all()
    assert found == 1200
    # a duplicated id is an error naming it
    write_teacher_outputs(str(tmp_path / "dup" / "a.parquet"), scored[:10], logits[:10], dm.tasks)
    write_teacher_outputs(str(tmp_path / "dup" / "b.parquet"), scored[5:6], logits[5:6], dm.tasks)
    with pytest.raises(DataError, match=f"duplicate example_id {int(scored[5])}"):
        TeacherTable(str(tmp_path / "dup"), dm.tasks)
    with pytest.raises(DataError, match="logit_click"):
        TeacherTable(str(tmp_path / "t"), ["click_typo"] + dm.tasks[1:])


def test_cli_style_parsing():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LatticeDataModule, "data")
    cfg = parser.parse_object({"data": {
        "synthetic": {"num_users": 50, "domains": [{"name": "a", "rows": 100}, {"name": "b", "rows": 20}],
                      "tasks": [{"name": "click", "base_rate": 0.2}]},
        "batch_size": 64, "split": "time", "csv": {"delimiter": ";"}}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = parser.instantiate_classes(cfg).data
    assert dm.domains == ["a", "b"] and dm.tasks == ["click"] and dm.batch_size == 64
    assert dm.csv.delimiter == ";"
    with pytest.raises(SystemExit):  # jsonargparse reports the bad value and exits
        parser.parse_object({"data": {"split": "random"}})


class _Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.example_id.clone())
        return (self.w * batch.dense.sum()).sum() * 0 + self.w.sum() ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, **kw):
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     accelerator="cpu", devices=1, **kw)


def test_lightning_resumes_mid_epoch_exactly(cache, tmp_path):
    """A checkpoint taken 5 batches into epoch 1 resumes with exactly the batches that were left."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def dm():
        return LatticeDataModule(synthetic=tiny_config(), cache_dir=cache, split="none", batch_size=100,
                                 shuffle_buffer=300)

    epoch_len = 18
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _Recorder()
        every = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=epoch_len + 5, save_top_k=-1)
        _trainer(tmp_path / "full", max_epochs=2, callbacks=[every], enable_checkpointing=True).fit(
            full, datamodule=dm())
        assert len(full.seen) == 2 * epoch_len
        (ckpt,) = [os.path.join(tmp_path / "ckpt", f) for f in os.listdir(tmp_path / "ckpt") if f"step={epoch_len + 5}" in f]
        resumed = _Recorder()
        _trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=dm(), ckpt_path=ckpt)
    want = [x.tolist() for x in full.seen[epoch_len + 5:]]
    assert [x.tolist() for x in resumed.seen] == want  # the same batches, in the same order
