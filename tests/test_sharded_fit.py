"""The documented sharded commands end to end, as a user runs them (2 processes, gloo), on a small world.

``lattice fit --config configs/mdmo.yaml --config configs/sharded.yaml``: row-wise and column-wise tables are
forced by overrides so every kind runs inside a real network (the table-wise one gives the ranks shards of
different shapes, which DDP must leave alone); the checkpoint must name its tables folder, hold no table in the
file itself, and record the plan.

``lattice plan --out plan.yaml``, then ``lattice fit ... --model.sharding.plan plan.yaml`` trains under exactly
that plan, and ``lattice predict`` of its checkpoint writes every row once although the two ranks read
different numbers of batches."""
from __future__ import annotations

import os
import subprocess
import glob
import sys

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

pytestmark = pytest.mark.slow

_SMALL = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "default_root_dir": "runs"},
    "data": {"batch_size": 128, "synthetic": {"num_users": 200, "num_items": 100,
                                              "domains": [{"name": "feed", "rows": 1500}, {"name": "shop", "rows": 700}]}},
    # a dict option is replaced, not merged, by a later config: the whole mapping again
    "model": {"sharding": {"plan": "auto", "memory_per_rank": "1GiB",
                           "overrides": {"item": "row_wise", "user": "column_wise", "device": "table_wise"}}},
}


def test_documented_sharded_fit(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**_SMALL, "metrics_table": {"output_dir": str(tmp_path / "tables")}}))
    env = dict(os.environ, LATTICE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "lattice.cli", "fit", "--config", os.path.join(CONFIGS, "mdmo.yaml"),
                           "--config", os.path.join(CONFIGS, "sharded.yaml"), "--config", str(small)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("val metrics (per domain x task") == 1, proc.stdout[-3000:]
    ckpt = sorted(tmp_path.glob("runs/**/checkpoints/last.ckpt"))[-1]
    checkpoint = torch.load(ckpt, weights_only=False)
    entry = checkpoint["sharded_tables"]
    assert (ckpt.parent / entry["folder"] / ".metadata").exists()
    assert len(list((ckpt.parent / entry["folder"]).glob("__*_0.distcp"))) == 2  # one file per rank
    kinds = {name: p["kind"] for plan in entry["plans"].values() for name, p in plan["tables"].items()}
    assert (kinds["item"], kinds["user"], kinds["device"]) == ("row_wise", "column_wise", "table_wise"), kinds
    sharded_paths = tuple(f"{p}." for p in entry["plans"])
    assert not [k for k in checkpoint["state_dict"] if k.startswith(sharded_paths)]  # tables only in the folder


def _run(tmp_path, *args, timeout=400):
    env = dict(os.environ, LATTICE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_plan_file_then_fit_then_predict_with_uneven_batches(tmp_path):
    import pyarrow.parquet as pq

    # 2201 rows: predict gives the ranks 1100 and 1101, 11 and 12 batches of 100
    data = {**_SMALL["data"], "eval_batch_size": 100}
    domains = [{"name": "feed", "rows": 1500}, {"name": "shop", "rows": 701}]
    data["synthetic"] = {**data["synthetic"], "domains": domains}
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**_SMALL, "data": data, "metrics_table": {"output_dir": str(tmp_path / "tables")},
                                     "prediction_writer": {"output_dir": str(tmp_path / "predictions")}}))
    configs = ["--config", os.path.join(CONFIGS, "mdmo.yaml"), "--config", os.path.join(CONFIGS, "sharded.yaml"),
               "--config", str(small)]
    _run(tmp_path, "plan", "--config", os.path.join(CONFIGS, "mdmo.yaml"), "--config", str(small), "--world-size", "2",
         "--memory-per-rank", "1GiB", "--override", "item=column_wise", "--override", "user=row_wise",
         "--num-batches", "2", "--time-limit", "0.5", "--out", "plan.yaml")
    written = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    _run(tmp_path, "fit", *configs, "--model.sharding.plan", "plan.yaml")
    ckpt = sorted(tmp_path.glob("runs/**/checkpoints/last.ckpt"))[-1]
    saved = {name: p for plan in torch.load(ckpt, weights_only=False)["sharded_tables"]["plans"].values()
             for name, p in plan["tables"].items()}
    assert {n: (p["kind"], p["ranks"]) for n, p in saved.items()} == {
        n: (p["kind"], p["ranks"]) for n, p in written["tables"].items()}
    assert (saved["item"]["kind"], saved["user"]["kind"]) == ("column_wise", "row_wise")

    _run(tmp_path, "predict", *configs, "--model.sharding.plan", "plan.yaml", "--ckpt_path", str(ckpt))
    files = sorted(glob.glob(str(tmp_path / "predictions" / "predictions-rank*.parquet")))
    ids = [pq.read_table(f, columns=["example_id"]).column(0).to_pylist() for f in files]
    assert len(ids) == 2 and len(ids[0]) != len(ids[1]), [len(i) for i in ids]  # the ranks ran unequal batch counts
    every = ids[0] + ids[1]
    assert len(every) == len(set(every)) == 1500 + 701  # each row once: the padding steps wrote nothing
