"""Serving a sharded run: fit 2 ranks with ``configs/sharded.yaml`` (row-, column- and table-wise tables forced),
then ``lattice export`` its checkpoint as a subprocess. The package's probabilities, and those of
``Predictor.from_checkpoint``, equal those of the same model rebuilt independently: the dense weights from the
file and the whole tables converted from the DCP folder by torch's own ``dcp_to_torch_save``. A checkpoint
copied without its tables folder is refused with one ``lattice: error:`` line naming the folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lattice.nn.embedding import EmbeddingBagCollection
from lattice.serve.predictor import Predictor
from lattice.train.loading import load_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

pytestmark = pytest.mark.slow

_SMALL = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "default_root_dir": "runs",
                "logger": False, "enable_progress_bar": False},
    "data": {"batch_size": 128, "synthetic": {"num_users": 200, "num_items": 100,
                                              "domains": [{"name": "feed", "rows": 1500},
                                                          {"name": "shop", "rows": 700}]}},
    "model": {
        # AOTInductor miscompiles the MaskNet merge of parallel sequence features (export refuses that package)
        "network": {"class_path": "lattice.models.LatticeNetwork",
                    "init_args": {"dim": 8, "num_layers": 1, "num_heads": 2, "sequence_merge": "concat"}},
        "sharding": {"plan": "auto", "memory_per_rank": "1GiB",
                     "overrides": {"item": "row_wise", "user": "column_wise", "device": "table_wise"}}},
}


def _lattice(tmp, *args):
    env = dict(os.environ, LATTICE_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_export")
    small = tmp / "small.yaml"
    small.write_text(yaml.safe_dump({**_SMALL, "metrics_table": {"output_dir": str(tmp / "tables")}}))
    configs = [os.path.join(CONFIGS, "mdmo.yaml"), os.path.join(CONFIGS, "sharded.yaml"), str(small)]
    done = _lattice(tmp, "fit", *[a for c in configs for a in ("--config", c)])
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    ckpt = sorted(tmp.glob("runs/**/checkpoints/last.ckpt"))[-1]
    return tmp, configs, ckpt


def _reference(configs, ckpt, tmp):
    """The checkpoint's model rebuilt without lattice's loader: the file's dense weights, and whole tables from
    the DCP folder converted by torch."""
    module, _ = load_from_config(configs, seed=False)
    checkpoint = torch.load(ckpt, weights_only=False)
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    assert not result.unexpected_keys
    full = tmp / "tables.pt"
    dcp_to_torch_save(str(ckpt.parent / checkpoint["sharded_tables"]["folder"]), str(full))
    tables = torch.load(full, weights_only=False)
    loaded = set()
    for path, collection in module.named_modules():
        if not isinstance(collection, EmbeddingBagCollection):
            continue
        for t in collection.tables:
            with torch.no_grad():
                collection.embedding_weight(t.name).copy_(tables[f"{path}.{t.name}.weight"])
            loaded.add(f"{path}.")
    assert not [k for k in result.missing_keys if not k.startswith(tuple(loaded))], result.missing_keys
    return module.eval()


def test_export_of_a_sharded_checkpoint_scores_like_the_checkpoint(sharded_run):
    tmp, configs, ckpt = sharded_run
    out = tmp / "pkg" / "model.pt2"
    done = _lattice(tmp, "export", *[a for c in configs for a in ("--config", c)], "--ckpt_path", str(ckpt),
                    "--out", str(out))
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    files = sorted((tmp / "cache").rglob("*.parquet"))[:2]
    assert files
    reference = Predictor.from_model(_reference(configs, ckpt, tmp))
    expected = pa.concat_tables([reference.predict(str(f)) for f in files])
    fresh = Predictor.from_model(load_from_config(configs, seed=False)[0].eval())
    for predictor, name in ((Predictor.from_package(out), "package"),
                            (Predictor.from_checkpoint(configs, ckpt), "from_checkpoint")):
        got = pa.concat_tables([predictor.predict(str(f)) for f in files])
        assert got.column("example_id").to_pylist() == expected.column("example_id").to_pylist()
        for task in predictor.task_names:
            np.testing.assert_allclose(got.column(task).to_numpy(), expected.column(task).to_numpy(), rtol=0,
                                       atol=1e-5, err_msg=f"{name} {task}")
    # the trained tables are in play: an untrained model scores otherwise
    untrained = pa.concat_tables([fresh.predict(str(f)) for f in files])
    assert max(float(np.abs(untrained.column(t).to_numpy() - expected.column(t).to_numpy()).max())
               for t in fresh.task_names) > 1e-4


def test_export_without_the_tables_folder_is_an_error(sharded_run):
    tmp, configs, ckpt = sharded_run
    alone = tmp / "alone"
    alone.mkdir(exist_ok=True)
    shutil.copy(ckpt, alone / "last.ckpt")
    done = _lattice(tmp, "export", *[a for c in configs for a in ("--config", c)], "--ckpt_path",
                    str(alone / "last.ckpt"), "--out", str(tmp / "m.pt2"))
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("lattice: error: sharded checkpoint: the tables folder"), done.stderr[-3000:]
    assert str(alone) in lines[-1] and "does not exist" in lines[-1]
