"""benchmarks/bench_pooling_int8.py end to end at smoke size, in a subprocess (the command docs/serving.md names)."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "int8.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_pooling_int8.py"), "--quick", "--out",
                          str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "int8/fp32" in res.stdout
    data = json.loads(out.read_text())
    (r,) = data["results"]
    assert r["B"] == 64 and r["agrees"] and r["table_bytes_ratio"] == 72 / 256
    assert r["fp32_median_ms"] > 0 and r["int8_median_ms"] > 0 and len(r["times_s"]["int8"]) == 5
