"""``lattice filter`` as the README runs it, in subprocesses on a tiny planted world: fit, then filter the
checkpoint to a budget; the kept-features YAML is a schema a data config can load."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lattice.data.schema import Schema

pytestmark = pytest.mark.slow


def _config(tmp_path):
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False, "logger": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
        "model": {"network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8}}},
        "data": {"cache_dir": str(tmp_path / "cache"), "batch_size": 128,
                 "synthetic": {"num_users": 150, "num_items": 80,
                               "domains": [{"name": "feed", "rows": 700}, {"name": "shop", "rows": 300}]}},
        "metrics_table": {"output_dir": str(tmp_path / "tables")},
    }


def _lattice(tmp_path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, LATTICE_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc


def test_lattice_filter_command_end_to_end(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_config(tmp_path)))
    _lattice(tmp_path, "fit", "--config", "config.yaml")
    proc = _lattice(tmp_path, "filter", "--config", "config.yaml", "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
                    "--budget", "4", "--repeats", "1", "--plot", "false", "--out_dir", "filtered")
    doc = yaml.safe_load((tmp_path / "filtered" / "kept_features.yaml").read_text())
    assert len(doc["features"]) == 4 and doc["selection"]["budget"] == 4
    kept = Schema.from_yaml(str(tmp_path / "filtered" / "kept_features.yaml"))
    assert kept.feature_names == doc["features"] and kept.task_names == ["click", "like", "conversion"]
    assert "kept_features.yaml" in proc.stdout
