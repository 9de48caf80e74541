"""benchmarks/bench_serve.py --smoke end to end (one model, tiny world): every path and batch size is timed,
the JSON holds what the table prints, and the AOTI and eager paths give the same validation AUC."""
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
    timings = student["timings"]
    assert set(timings) == {f"{p}/{b}" for p in ("eager", "exported", "aoti") for b in (1, 64, 512)}
    for entry in timings.values():
        assert entry["rows_per_s"] > 0 and 0 < entry["p50_ms"] <= entry["p99_ms"] and entry["calls"] == 2
    assert timings["aoti/1"]["batch"] == 1 and timings["aoti/64"]["batch"] == 64
    for task, auc in student["auc"]["eager"].items():
        assert math.isnan(auc) or abs(student["auc"]["aoti"][task] - auc) < 1e-4
    assert re.search(r"^student\s+aoti\s+64\s", done.stdout, re.M)
    assert "target student AOTI >= 2x eager rows/s at batch 64" in done.stdout
