"""benchmarks/bench_serve.py --smoke end to end (one model, tiny world): every path (eager, exported, AOTI, AOTI
with int8 tables) and batch size is timed, the JSON holds what the table prints, the AOTI and eager paths give the
same validation AUC and the int8 package a close one, and the D=64 int8 pooling check reports its byte ratio."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_bench_serve_smoke(tmp_path):
    out = tmp_path / "bench.json"
    script = str(ROOT / "benchmarks" / "bench_serve.py")
    done = subprocess.run([sys.executable, script, "--smoke", "--models", "student", "--cache-dir",
                           str(tmp_path / "cache"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    student = result["models"]["student"]
    assert student["module_class"] == "DistillationModule" and student["table_bytes"] > 0
    assert 0 < student["table_bytes_int8"] < 0.5 * student["table_bytes"]
    timings = student["timings"]
    assert set(timings) == {f"{p}/{b}" for p in ("eager", "exported", "aoti", "aoti_int8") for b in (1, 64, 512)}
    for entry in timings.values():
        assert entry["rows_per_s"] > 0 and 0 < entry["p50_ms"] <= entry["p99_ms"] and entry["calls"] == 2
    assert timings["aoti/1"]["batch"] == 1 and timings["aoti/64"]["batch"] == 64
    for task, auc in student["auc"]["eager"].items():
        assert math.isnan(auc) or abs(student["auc"]["aoti"][task] - auc) < 1e-4
        assert math.isnan(auc) or abs(student["auc"]["aoti_int8"][task] - auc) < 0.05
    assert set(student["auc"]["aoti_int8"]) == set(student["auc"]["eager"])
    assert re.search(r"^student\s+aoti\s+64\s", done.stdout, re.M)
    assert re.search(r"^student\s+aoti_int8\s+64\s", done.stdout, re.M)
    assert "target student AOTI >= 2x eager rows/s at batch 64" in done.stdout
    assert "target student int8 mean AUC drop <= 0.001" in done.stdout
    pool = result["pooling_int8"]
    assert pool["D"] == 64 and pool["agrees"] and abs(pool["table_bytes_ratio"] - 72 / 256) < 1e-9
    assert "target int8 table bytes <= 0.29x fp32 at D=64: met" in done.stdout
