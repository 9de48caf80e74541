"""benchmarks/bench_pooling.py end to end at smoke size: the JSON holds the timings, the targets and the
bandwidth floor of the fused step (distinct rows, bytes written back, the read-modify-write bandwidth), with
values that follow from the workload."""
import importlib.util
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # bench_pooling imports pool_agreement from there
    try:
        spec = importlib.util.spec_from_file_location("bench_pooling", os.path.join(ROOT, "benchmarks",
                                                                                    "bench_pooling.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))
    return module


def test_quick_run_reports_the_step_bandwidth_floor(tmp_path):
    bench = _bench()
    out = tmp_path / "pool.json"
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--rows", "5000", "--dims", "64", "--batch", "64", "--tables", "4", "--repeats", "3",
                         "--warmup", "1", "--no-loop", "--no-reference", "--no-scaling", "--stream-gib", "0.0625",
                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["stream_update"]["gbps"] > 0 and report["stream_read"]["gbps"] > 0
    (entry,) = report["configs"]
    w = bench.Workload(4, 5000, 64, 64, 40)  # the same seed and sizes: the same ids
    assert entry["unique_rows"] == torch.unique(w.global_indices).numel() <= entry["N"]
    assert entry["update_bytes"] == 2 * entry["unique_rows"] * (64 * 4 + 4)
    s = entry["summary"]
    fwd = entry["results"]["lattice"]["forward"]["median_s"]
    update_s = entry["update_bytes"] / (report["stream_update"]["gbps"] * 1e9)
    assert abs(s["step_over_forward_floor"] - (fwd + update_s) / fwd) < 1e-9
    assert s["step_over_forward_floor"] > 1 and s["step_over_forward_floor_at_60pct_forward"] > 1
    assert "fused row-wise Adagrad step <= 2.5x forward" in s["targets"]
