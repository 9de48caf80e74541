"""``bench_train.py --study compile --smoke`` end to end: eager and compiled fits on a tiny world, its table and
JSON (samples/s, cold and warm compile, recompiles, AUC)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_compile_study_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_train.py"), "--study", "compile", "--smoke",
         "--threads", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled (aot_eager) vs eager" in proc.stdout and "recompiles" in proc.stdout
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["network"] == "MMoE" and row["backend"] == "aot_eager"
    assert row["eager_samples_per_s"] > 0 and row["compiled_samples_per_s"] > 0
    assert len(row["compiled_runs"]) == 2  # cold, then warm from the same cache
    assert 0 <= row["recompiles_after_warmup"] <= 2  # loader batches of new jagged lengths reuse the graph
    assert row["compile_s_cold"] is not None and row["compile_s_warm"] is not None
    assert 0.0 <= row["eager_mean_auc"] <= 1.0 and 0.0 <= row["compiled_mean_auc"] <= 1.0
