"""The documented sharded fit end to end, as a user runs it (2 processes, gloo), on a small world:
``lattice fit --config configs/mdmo.yaml --config configs/sharded.yaml``. Row-wise and column-wise tables are
forced by overrides so every kind runs inside a real network (the table-wise one gives the ranks shards of
different shapes, which DDP must leave alone); the checkpoint must name its tables folder, hold
no table in the file itself, and record the plan."""
from __future__ import annotations

import os
import subprocess
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
