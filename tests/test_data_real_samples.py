"""The real public samples in ../shared/data ingest through their configs/data/*.yaml and yield correct
batches (skipped where the samples are absent)."""
from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import pyarrow.csv as pacsv
import pytest
import yaml

from lattice.data import LatticeDataModule

from _data_utils import REPO, SHARED_DATA

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "data", "*.yaml")))
pytestmark = pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not available")

# config -> (rows in paths, rows in val_paths or None, {label: positives over all training rows})
EXPECTED = {
    "deepctr_byterec": (200, None, {"finish": 76, "like": 7}),
    "rechub_ali_ccp": (100, 50, None),
    "fuxictr_tiny_mtl": (100, 100, None),
    "swrec_douban": (3000, None, {"rating": 1936}),
    "swrec_mind": (8000, None, {"click": 363}),
}


def _resolve(p):
    return [_resolve(x) for x in p] if isinstance(p, list) else os.path.normpath(os.path.join(REPO, p))


def load(config: str, **overrides) -> LatticeDataModule:
    """The DataModule a config describes (the ``data:`` section of a fit config, LatticeDataModule's
    arguments), parsed by jsonargparse as the CLI parses it."""
    from jsonargparse import ArgumentParser

    with open(config) as fh:
        args = yaml.safe_load(fh)
    for key in ("paths", "val_paths", "test_paths"):
        if key in args:
            args[key] = _resolve(args[key])
    args.update(overrides)
    parser = ArgumentParser()
    parser.add_class_arguments(LatticeDataModule, "data")
    cfg = parser.parse_object({"data": args})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parser.instantiate_classes(cfg).data


def test_configs_parse_as_the_cli_reads_them():
    """``--data configs/data/<sample>.yaml`` on the command line (paths relative to the repo root)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(LatticeDataModule, "data")
    for config in CONFIGS:
        cfg = parser.parse_args(["--data", config])
        assert cfg.data.schema.tasks, config


def test_every_named_sample_has_a_config():
    names = {os.path.splitext(os.path.basename(c))[0] for c in CONFIGS}
    assert set(EXPECTED) <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: os.path.splitext(os.path.basename(c))[0])
def test_sample_ingests_with_correct_batches(config):
    name = os.path.splitext(os.path.basename(config))[0]
    rows, val_rows, positives = EXPECTED[name]
    dm = load(config, split="none")
    dm.setup("fit")
    schema = dm.schema
    batches = list(dm.train_dataloader())
    n = sum(b.batch_size for b in batches)
    assert n == rows  # nothing dropped
    ids = np.concatenate([b.example_id.numpy() for b in batches])
    assert len(np.unique(ids)) == rows
    for b in batches:
        assert b.dense.shape == (b.batch_size, len(schema.dense_features))
        assert b.sparse.keys() == [f.name for f in schema.sparse_features]
        assert b.labels.shape == (b.batch_size, len(schema.tasks)) and b.label_mask.all()
        assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
        for f in schema.sparse_features:
            v = b.sparse[f.name].values()
            assert v.numel() == 0 or (v.min() >= 0 and v.max() < f.num_embeddings)
        assert b.dense_mask.all()
    if positives:
        labels = np.concatenate([b.labels.numpy() for b in batches])
        for task, count in positives.items():
            assert int(labels[:, schema.task_names.index(task)].sum()) == count, task
    if val_rows is not None:
        assert sum(b.batch_size for b in dm.val_dataloader()) == val_rows


def test_values_match_the_file():
    """Spot check: the MIND sample's domains and labels row by row, ByteRec's channels and dense-free ids."""
    config = os.path.join(REPO, "configs", "data", "swrec_mind.yaml")
    dm = load(config, split="none", shuffle=False, batch_size=10_000)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    raw = pacsv.read_csv(os.path.join(SHARED_DATA, "swrec_mind", "mind_sample.csv"))
    order = np.argsort(batch.example_id.numpy())  # derived ids follow the file's row order
    domains = np.array(dm.domains)[batch.domain.numpy()[order]]
    assert (domains == np.array(raw["Category"].to_pylist())).all()
    assert np.array_equal(batch.labels[:, 0].numpy()[order], raw["label"].to_numpy().astype(np.float32))
    config = os.path.join(REPO, "configs", "data", "deepctr_byterec.yaml")
    dm = load(config, split="none", shuffle=False, batch_size=1000)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    cols = "uid,user_city,item_id,author_id,item_city,channel,finish,like,music_id,device,time,duration_time".split(",")
    raw = pacsv.read_csv(os.path.join(SHARED_DATA, "deepctr_byterec", "byterec_sample.txt"),
                         read_options=pacsv.ReadOptions(column_names=cols),
                         parse_options=pacsv.ParseOptions(delimiter="\t"))
    assert np.array_equal(batch.domain.numpy(), raw["channel"].to_numpy())
    assert np.array_equal(batch.sparse["user"].values().numpy(), raw["uid"].to_numpy())
    assert np.array_equal(batch.user_id.numpy(), raw["uid"].to_numpy())
    # -1 ("unknown") user cities are hashed into range under oov: hash, the rest kept as they are
    city = batch.sparse["user_city"].values().numpy()
    raw_city = raw["user_city"].to_numpy()
    assert np.array_equal(city[raw_city >= 0], raw_city[raw_city >= 0])
    assert (city[raw_city < 0] >= 0).all()
