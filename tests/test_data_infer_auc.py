"""The inferred schema trains as well as the hand-written one: a planted world written to Parquet without
lattice's embedded schema, one LatticeNetwork on each schema, validation AUC per task compared.

The hand-written schema is listed in the inferred schema's feature order. Order changes only which random
numbers each embedding table's initialization draws, not what the model can learn, but at this size that
alone moves AUC by up to 0.015 (moving one feature to the end, measured); in the same order the comparison
measures what the schemas say. Under the old inference (user_id/item_id only id columns, as
``id_features=False``) the inferred model trails by about 0.016 on both tasks."""
from __future__ import annotations

import os
import warnings

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch

from lattice.data import DataSource, LatticeDataModule, infer_schema
from lattice.data.infer import SCHEMA_METADATA_KEY
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticTask, SyntheticWorld
from lattice.models import LatticeNetwork
from lattice.train.module import LatticeModule

TASKS = ["click", "like"]
# The two schemas name their tables differently, so their tables start from different values (each table's
# initial values are seeded by its name): the runs differ by training noise, about 0.01 AUC on these 3000
# validation rows.
TOLERANCE = 0.012


def _world() -> SyntheticWorld:
    return SyntheticWorld(SyntheticConfig(
        seed=0, num_users=300, num_items=200,
        domains=[SyntheticDomain("feed", 8000, absent_features=["query_cluster"]),
                 SyntheticDomain("search", 4000, absent_features=["item_tags"])],
        tasks=[SyntheticTask("click", base_rate=0.2), SyntheticTask("like", parent="click", base_rate=0.3)],
    ))


def _write_plain(world: SyntheticWorld, out: str) -> list:
    """Each domain's rows as Parquet with no schema in the metadata, as a user's own logs would be."""
    sources = []
    for d in world.config.domains:
        os.makedirs(os.path.join(out, d.name))
        for i, table in enumerate(world.domain_tables(d.name)):
            path = os.path.join(out, d.name, f"part-{i}.parquet")
            pq.write_table(table.replace_schema_metadata(None), path, row_group_size=2048)
            assert SCHEMA_METADATA_KEY not in (pq.read_schema(path).metadata or {})
        sources.append(DataSource(os.path.join(out, d.name), domain=d.name))
    return sources


def _val_auc(datamodule: LatticeDataModule) -> dict:
    L.seed_everything(0, workers=False)
    network = LatticeNetwork(datamodule.schema, dim=16, num_layers=1, num_heads=2, fm_tokens=4, lcb_tokens=4)
    module = LatticeModule(network, optimizer=lambda p: torch.optim.AdamW(p, lr=0.003, weight_decay=0.0),
                           group_auc=False)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule)
    return {t: float(trainer.callback_metrics[f"val/{t}/auc"]) for t in TASKS}


@pytest.mark.slow
def test_inferred_schema_reaches_the_hand_written_auc(tmp_path):
    world = _world()
    sources = _write_plain(world, str(tmp_path / "logs"))
    common = dict(sources=sources, split="hash", val_fraction=0.25, test_fraction=0.0, batch_size=256, seed=0)
    # the user's path: no schema, the label columns named
    inferred = LatticeDataModule(tasks=TASKS, **common)
    assert inferred.schema == infer_schema(sources, tasks=TASKS)
    s = inferred.schema
    assert s.feature("user_id").kind == "sparse" and s.feature("item_id").kind == "sparse"
    assert s.feature("hist_items").shared_table == "item_id"
    assert s.feature("hist_clusters").shared_table == "item_cluster"
    written = world.schema()
    rank = {f.source: i for i, f in enumerate(s.features)}
    written = written.replace(features=sorted(written.features, key=lambda f: rank.get(f.source, len(rank))))
    hand = LatticeDataModule(schema=written, **common)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two small models: threads only contend on a shared machine
    try:
        auc_hand, auc_inferred = _val_auc(hand), _val_auc(inferred)
    finally:
        torch.set_num_threads(threads)
    for t in TASKS:
        assert auc_inferred[t] >= auc_hand[t] - TOLERANCE, (t, auc_inferred, auc_hand)
