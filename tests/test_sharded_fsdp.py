"""FSDP2 with sharded tables, as documented: ``lattice fit --config configs/mdmo.yaml --config
configs/sharded.yaml --config configs/fsdp.yaml`` (2 processes, gloo). The dense layers are under
``fully_shard``, the row-, column- and table-wise tables stay out of it, and every checkpoint keeps the tables
in a DCP folder with one piece per rank. A run stopped after 2 steps and resumed from its ``last.ckpt`` to
step 4 ends with the same tables, row-wise Adagrad state and dense weights as an uninterrupted 4-step run."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "configs", c) for c in ("mdmo.yaml", "sharded.yaml", "fsdp.yaml")]

pytestmark = pytest.mark.slow


def _small(tmp, name: str, max_steps: int) -> str:
    config = {
        "trainer": {"max_steps": max_steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp / name),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp / name / "ckpt"), "save_last": True,
                                                 "every_n_train_steps": 2}}]},
        "data": {"batch_size": 64, "synthetic": {"num_users": 200, "num_items": 100,
                                                 "domains": [{"name": "feed", "rows": 1500},
                                                             {"name": "shop", "rows": 700}]}},
        "model": {"network": {"class_path": "lattice.models.LatticeNetwork",
                              "init_args": {"dim": 8, "num_layers": 1, "num_heads": 2}},
                  "sharding": {"plan": "auto", "memory_per_rank": "1GiB",
                               "overrides": {"item": "row_wise", "user": "column_wise", "device": "table_wise"}}},
        "metrics_table": {"output_dir": str(tmp / name / "tables")},
    }
    path = tmp / f"{name}-{max_steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _fit(tmp, small: str, *extra: str) -> None:
    env = dict(os.environ, LATTICE_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    args = [a for c in [*CONFIGS, small] for a in ("--config", c)]
    done = subprocess.run([sys.executable, "-m", "lattice.cli", "fit", *args, *extra], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def _state(ckpt, tmp):
    """``(dense state_dict, tables {key: tensor}, checkpoint)`` of a checkpoint file and its tables folder."""
    checkpoint = torch.load(ckpt, weights_only=False)
    folder = ckpt.parent / checkpoint["sharded_tables"]["folder"]
    assert len(list(folder.glob("__*_0.distcp"))) == 2  # every rank wrote its own shards
    out = tmp / f"{ckpt.parent.parent.name}-tables.pt"
    dcp_to_torch_save(str(folder), str(out))
    tables = {k: v for k, v in torch.load(out, weights_only=False).items() if isinstance(v, torch.Tensor)}
    return checkpoint["state_dict"], tables, checkpoint


def test_fsdp2_with_sharded_tables_resumes_exactly(tmp_path):
    _fit(tmp_path, _small(tmp_path, "straight", 4))
    _fit(tmp_path, _small(tmp_path, "resumed", 2))
    first = tmp_path / "resumed" / "ckpt" / "last.ckpt"
    assert torch.load(first, weights_only=False)["global_step"] == 2
    _fit(tmp_path, _small(tmp_path, "resumed", 4), "--ckpt_path", str(first))

    dense_a, tables_a, ckpt_a = _state(tmp_path / "straight" / "ckpt" / "last.ckpt", tmp_path)
    dense_b, tables_b, ckpt_b = _state(first, tmp_path)
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 4
    kinds = {n: p["kind"] for plan in ckpt_a["sharded_tables"]["plans"].values() for n, p in plan["tables"].items()}
    assert (kinds["item"], kinds["user"], kinds["device"]) == ("row_wise", "column_wise", "table_wise"), kinds
    prefixes = tuple(f"{p}." for p in ckpt_a["sharded_tables"]["plans"])
    assert not [k for k in dense_a if k.startswith(prefixes)]  # the tables are only in the folder
    assert any(k.endswith(".momentum") for k in tables_a) and sorted(tables_a) == sorted(tables_b)
    for key in tables_a:
        torch.testing.assert_close(tables_b[key], tables_a[key], rtol=0, atol=1e-6, msg=key)
    assert sorted(dense_a) == sorted(dense_b)
    for key in dense_a:
        torch.testing.assert_close(dense_b[key], dense_a[key], rtol=0, atol=1e-6, msg=key)
    # the dense optimizer's state is in the file (FSDP2's full state dict, gathered on rank 0)
    assert len(ckpt_a["optimizer_states"]) == 1 and ckpt_a["optimizer_states"][0]["state"]
