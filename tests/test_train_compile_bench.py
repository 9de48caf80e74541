"""``bench_train.py --study compile --smoke`` end to end: eager before the eager cuts, eager, compiled and the
plain-PyTorch MMoE on a tiny world, its tables and JSON (samples/s, cold and warm compile, recompiles, AUC)."""
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
    for variant in ("eager_before", "eager", "compiled", "plain"):
        assert row[f"{variant}_samples_per_s"] > 0 and row[f"{variant}_samples_per_cpu_s"] > 0, variant
        assert 0.0 <= row[f"{variant}_mean_auc"] <= 1.0, variant
    assert row["eager_before_vs_eager_before"] == 1.0 and row["eager_vs_plain"] > 0
    assert report["eager_before_commit"] and "plain" in proc.stdout
    assert len(row["compiled_runs"]) == 2  # cold, then warm from the same cache
    assert 0 <= row["recompiles_after_warmup"] <= 2  # loader batches of new jagged lengths reuse the graph
    assert row["compile_s_cold"] is not None and row["compile_s_warm"] is not None
    assert 0.0 <= row["eager_mean_auc"] <= 1.0 and 0.0 <= row["compiled_mean_auc"] <= 1.0
