"""benchmarks/bench_sharding.py --smoke: the four placements at W=2 send what the planner estimates and store what
the plan says, and tables 1.6x the per-rank cap fail replicated and train sharded."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_sharding_smoke(tmp_path):
    out = tmp_path / "sharding.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_sharding.py"), "--smoke",
                           "--out", str(out)], cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(r["world"], r["kind"]): r for r in report["placements"]}
    assert set(rows) == {(2, k) for k in ("replicated", "table_wise", "row_wise", "column_wise")}
    for (world, kind), r in rows.items():
        assert r["step_ms"] > 0
        # storage as planned (nn.placement.shard_bytes), traffic as the planner's cost model estimates
        assert r["bytes_per_rank"] == pytest.approx(r["bytes_planned"], rel=0.05), kind
        assert r["sent_per_rank"] == pytest.approx(r["sent_estimate"], rel=0.15), kind
    total = rows[(2, "replicated")]["bytes_per_rank"][0]
    assert rows[(2, "row_wise")]["bytes_per_rank"] == pytest.approx([total / 2] * 2, rel=0.01)
    cap = report["capacity"]
    assert cap["ratio_to_cap"] == pytest.approx(1.6, rel=0.02)
    assert "table 't" in cap["replicated_error"] and "bytes" in cap["replicated_error"]
    assert max(cap["bytes_per_rank"]) <= cap["memory_per_rank"]
    assert cap["loss_last"] < 0.5 * cap["loss_first"]
    assert "sent/rank/step" in proc.stdout and "study 2" in proc.stdout
