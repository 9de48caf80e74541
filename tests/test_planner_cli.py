"""``lattice plan`` as a subprocess on a tiny planted world: the printed table and cost model, the written plan YAML
(overrides from the command line and from a file applied, every rank within the budget), and bad input as one
``lattice: error:`` line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from lattice.nn.placement import ShardingPlan, shard_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MDMO = os.path.join(ROOT, "configs", "mdmo.yaml")
# stacked onto configs/mdmo.yaml: its network and tasks on a tiny planted world
SMALL_DATA = {
    "trainer": {"logger": False, "enable_progress_bar": False},
    "data": {"batch_size": 64,
             "synthetic": {"num_users": 80, "num_items": 50,
                           "domains": [{"name": "feed", "rows": 300}, {"name": "shop", "rows": 120}]}},
}


def _lattice(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "lattice.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_lattice_plan_prints_and_writes_the_plan(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**SMALL_DATA, "data": {**SMALL_DATA["data"], "cache_dir": str(tmp_path)}}))
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(yaml.safe_dump({"user": {"kind": "table_wise", "ranks": [1]}}))
    out = tmp_path / "plan" / "plan.yaml"
    budget = 120 * 1024  # all replicated would take 161 KiB
    done = _lattice("plan", "--config", MDMO, "--config", str(small), "--world-size", "2", "--memory-per-rank", "120KiB",
                    "--overrides", str(overrides), "--override", "item=row_wise", "--out", str(out),
                    "--batch-size", "256")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for column in ("table", "placement", "ranks", "bytes per rank", "sent per step per rank"):
        assert column in text.splitlines()[0]
    assert "cost model:" in text and "batch per rank      256 samples" in text and "memory per rank 120 KiB" in text
    plan = ShardingPlan.from_dict(yaml.safe_load(out.read_text()))
    assert plan.world_size == 2
    # the planted world's tables: its sparse features, with the histories sharing the item tables
    assert {"user", "item", "item_cluster", "item_tags", "noise_s0", "noise_s1"} <= set(plan.tables)
    assert plan.tables["user"].kind == "table_wise" and plan.tables["user"].ranks == [1]
    assert plan.tables["item"].kind == "row_wise" and plan.tables["item"].num_embeddings == 50
    for rank in range(2):
        assert sum(shard_bytes(p, rank, 4, "rowwise_adagrad") for p in plan.tables.values()) <= budget
    # the two 500-row noise tables (64.5 KiB each with their state) cannot both be replicated within 120 KiB
    assert any(plan.tables[n].kind != "replicated" for n in ("noise_s0", "noise_s1"))


def test_lattice_plan_bad_memory_size_is_one_line(tmp_path):
    done = _lattice("plan", "--config", MDMO, "--world-size", "2", "--memory-per-rank", "lots")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "lattice: error: --memory-per-rank: cannot read 'lots' as a size; write e.g. 4GiB, 512MB or 1000000"]


@pytest.mark.parametrize("args,message", [
    (["--world-size", "0", "--memory-per-rank", "1GiB"], "--world-size must be >= 1, got 0"),
    (["--world-size", "2", "--memory-per-rank", "1GiB", "--override", "item"],
     "--override 'item': expected TABLE=KIND, e.g. item=row_wise"),
])
def test_lattice_plan_bad_arguments(tmp_path, capsys, args, message):
    from lattice.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", str(tmp_path / "unread.yaml"), *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"lattice: error: {message}\n"
