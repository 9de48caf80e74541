"""The README's multi-process commands end to end, as a user runs them: `lattice fit` under DDP and FSDP2 (2 processes,
gloo), then `lattice validate` and `lattice test` under DDP on the checkpoint. Each must exit 0, print the metrics
table exactly once (rank 0) and write its CSV/JSON — the DDP fit once died at the end, in the table's callback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")

pytestmark = pytest.mark.slow

# Stacked after the README's configs: a small world and short epochs, everything written under the test's folder.
_SMALL = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "limit_test_batches": 2,
},
    "data": {"batch_size": 128, "synthetic": {"num_users": 200, "num_items": 100,
                                              "domains": [{"name": "feed", "rows": 1500}, {"name": "shop", "rows": 700}]}},
}


def _lattice(tmp_path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, LATTICE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LATTICE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check(proc: subprocess.CompletedProcess, stage: str, tables) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    title = f"{stage} metrics (per domain x task"
    assert proc.stdout.count(title) == 1, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    written = sorted(tables.glob(f"metrics_{stage}.*"))
    assert [p.suffix for p in written] == [".csv", ".json"], written
    table = json.loads((tables / f"metrics_{stage}.json").read_text())
    assert {row["domain"] for row in table["rows"]} == {"feed", "shop", "ALL"}
    return table


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One DDP fit (the README's command on the quickstart config), shared by the validate/test checks."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**_SMALL, "metrics_table": {"output_dir": str(tmp_path / "tables")}}))
    proc = _lattice(tmp_path, "fit", "--config", os.path.join(CONFIGS, "quickstart.yaml"),
                    "--config", os.path.join(CONFIGS, "ddp.yaml"), "--config", str(small))
    return tmp_path, small, proc


def test_ddp_fit(ddp_run):
    tmp_path, _, proc = ddp_run
    table = _check(proc, "val", tmp_path / "tables")
    assert table["metrics"]["click/count"] > 0
    assert "args parameter is intended" not in proc.stderr  # LightningCLI's warning when given argv twice
    summary = next(line for line in proc.stdout.splitlines() if "LatticeNetwork" in line)
    assert summary.rstrip(" │|").split()[-1] not in ("0", "-"), summary  # lattice's FLOPs per sample
    assert list(tmp_path.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_ddp_validate_and_test(ddp_run, stage):
    tmp_path, small, fit = ddp_run
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = sorted(tmp_path.glob("runs/quickstart/version_*/checkpoints/last.ckpt"))[-1]
    tables = tmp_path / f"tables_{stage}"
    proc = _lattice(tmp_path, stage, "--config", os.path.join(CONFIGS, "quickstart.yaml"),
                    "--config", os.path.join(CONFIGS, "ddp.yaml"), "--config", str(small),
                    "--metrics_table.output_dir", str(tables), "--ckpt_path", str(ckpt))
    _check(proc, {"validate": "val", "test": "test"}[stage], tables)


def test_fsdp_fit(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({**_SMALL, "metrics_table": {"output_dir": str(tmp_path / "tables")}}))
    proc = _lattice(tmp_path, "fit", "--config", os.path.join(CONFIGS, "quickstart.yaml"),
                    "--config", os.path.join(CONFIGS, "fsdp.yaml"), "--config", str(small))
    _check(proc, "val", tmp_path / "tables")


def test_ddp_data_error_is_one_line_per_failing_rank(tmp_path):
    """A data error that every rank hits after the launch (per-domain folders given without their domains) ends the
    run with exit 2 and one `lattice: error:` line per rank naming the file and column, and no traceback."""
    world = tmp_path / "world"
    (tmp_path / "world.yaml").write_text(yaml.safe_dump({"synthetic": _SMALL["data"]["synthetic"]}))
    gen = _lattice(tmp_path, "data", "generate", "--config", str(tmp_path / "world.yaml"), "--out", str(world))
    assert gen.returncode == 0, gen.stderr[-3000:]
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({"trainer": _SMALL["trainer"], "data": {"batch_size": 128}}))
    proc = _lattice(tmp_path, "fit", "--config", os.path.join(CONFIGS, "quickstart.yaml"),
                    "--config", os.path.join(CONFIGS, "ddp.yaml"), "--config", str(small),
                    "--data.paths", f"[{world / 'feed'}, {world / 'shop'}]", "--data.schema", str(world / "schema.yaml"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lattice: error:")]
    assert len(errors) == 2 and sum("[rank 1]" in line for line in errors) == 1, proc.stderr[-3000:]
    assert all("part-00000.parquet, column 'domain'" in line for line in errors), errors
    assert "Traceback" not in proc.stderr
