"""benchmarks/bench_pooling.py end to end at smoke size: the JSON holds the timings, the targets and the
bandwidth floor of the fused step (distinct rows, bytes written back, the read-modify-write bandwidth, the bare
sparse update and gather probes), with values that follow from the workload. Also lattice.benchmark.memory_probe's
loops against torch on small tables."""
import json

import pytest
import torch



def _bench():
    from benchmarks import bench_pooling

    return bench_pooling


def _run(bench, tmp_path, *args: str) -> dict:
    """bench_pooling.main at smoke size with ``args`` added; its JSON report."""
    out = tmp_path / "pool.json"
    threads = torch.get_num_threads()
    try:
        rc = bench.main(["--warmup", "1", "--no-loop", "--no-reference", "--no-scaling", "--stream-gib", "0.0625",
                         "--out", str(out), *args])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_run_reports_the_step_bandwidth_floor(tmp_path):
    bench = _bench()
    report = _run(bench, tmp_path, "--rows", "5000", "--dims", "64", "--batch", "64", "--tables", "4", "--repeats", "3")
    assert report["stream_update"]["gbps"] > 0 and report["stream_read"]["gbps"] > 0
    (entry,) = report["configs"]
    w = bench.Workload(4, 5000, 64, 64, 40)  # the same seed and sizes: the same ids
    assert entry["unique_rows"] == torch.unique(w.global_indices).numel() <= entry["N"]
    assert entry["update_bytes"] == 2 * entry["unique_rows"] * (64 * 4 + 4)
    s = entry["summary"]
    fwd = entry["results"]["lattice"]["forward"]["median_s"]
    # the bandwidths are those of the configuration's own rounds, timed beside the forwards and the step
    assert s["bandwidths_timed_in_rounds"] is True
    refs = entry["round_references"]
    read = refs["ref: stream read"]
    assert read["bytes"] == int(0.0625 * (1 << 30)) // 4 * 4 and refs["ref: stream read-modify-write"]["bytes"] == 2 * read["bytes"]
    assert len(read["times_s"]) == 3 == len(entry["results"]["lattice"]["forward"]["times_s"])
    assert abs(s["stream_read_gbps"] - read["bytes"] / read["median_s"] / 1e9) < 1e-9
    assert abs(s["forward_fraction_of_stream_bw"] * s["stream_read_gbps"] - s["forward_effective_gbps"]) < 1e-6
    update_s = entry["update_bytes"] / (s["stream_update_gbps"] * 1e9)
    assert abs(s["step_over_forward_floor"] - (fwd + update_s) / fwd) < 1e-9
    assert s["step_over_forward_floor"] > 1 and s["step_over_forward_floor_at_60pct_forward"] > 1
    assert "fused row-wise Adagrad step <= 2.5x forward" in s["targets"]
    probes = entry["probes"]
    if _probe()[0] is None:  # no C compiler here: the probe is skipped, not faked
        assert probes == {} and "step_over_forward_floor_sparse" not in s
        return
    assert probes["gather"]["bytes"] == entry["gathered_bytes"]
    assert probes["sparse_update"]["bytes"] == 2 * entry["unique_rows"] * 64 * 4
    sparse_s = entry["update_bytes"] / (probes["sparse_update"]["gbps"] * 1e9)
    assert abs(s["step_over_forward_floor_sparse"] - (fwd + sparse_s) / fwd) < 1e-9
    assert abs(s["forward_fraction_of_gather_probe"] * probes["gather"]["gbps"] - s["forward_effective_gbps"]) < 1e-6
    assert probes["gather"]["prefetch"] in (0, 8, 16, 32)
    for key, name in (("gather", "ref: bare gather"), ("sparse_update", "ref: bare sparse update")):
        assert probes[key]["timed_in_rounds"] and probes[key]["median_s"] == refs[name]["median_s"]
        assert probes[key]["sweep_median_s"] > 0 and refs[name]["bytes"] == probes[key]["bytes"]


def test_without_forward_rounds_the_run_wide_bandwidths_stand_in(tmp_path):
    report = _run(_bench(), tmp_path, "--rows", "2000", "--dims", "32", "--batch", "32", "--tables", "2", "--repeats", "2",
                  "--modes", "fwd+bwd")
    (entry,) = report["configs"]
    s = entry["summary"]
    assert s["bandwidths_timed_in_rounds"] is False and entry["round_references"] == {}
    assert s["stream_read_gbps"] == report["stream_read"]["gbps"]
    assert s["stream_update_gbps"] == report["stream_update"]["gbps"]
    assert "forward" not in entry["results"]["lattice"] and "fwd+bwd" in entry["results"]["lattice"]


def _probe():
    from lattice.benchmark import memory_probe

    lib, why = memory_probe.load()
    return lib, why, memory_probe


@pytest.mark.parametrize("D", [3, 64, 128])
def test_memory_probe_loops_touch_exactly_the_rows_they_are_given(D):
    lib, why, probe = _probe()
    if lib is None:
        pytest.skip(f"memory probe unavailable: {why}")
    g = torch.Generator().manual_seed(D)
    w = torch.randn(1000, D, generator=g)
    rows = torch.randint(0, 1000, (5000,), generator=g)
    # the gather's returned total is the sum of every gathered row, repeats included
    total = lib.row_gather(w.data_ptr(), D, rows.data_ptr(), rows.numel(), 16, 2)
    gathered = w.double()[rows]
    assert abs(total - float(gathered.sum())) <= 1e-4 * float(gathered.abs().sum())
    # the update scales exactly the rows named, in place
    distinct = torch.unique(rows)
    want = w.clone()
    want[distinct] *= 0.5
    lib.sparse_row_update(w.data_ptr(), D, distinct.data_ptr(), distinct.numel(), 8, 0.5, 2)
    assert torch.equal(w, want)
    # the timed helpers leave the table as it was
    before = w.clone()
    r = probe.sparse_update_bandwidth(w, distinct, threads=2, repeats=1, warmup=0, distances=(0, 8))
    assert torch.equal(w, before) and r["bytes"] == 2 * distinct.numel() * D * 4 and r["prefetch"] in (0, 8)


def test_memory_probe_refuses_bad_arguments():
    lib, why, probe = _probe()
    if lib is None:
        pytest.skip(f"memory probe unavailable: {why}")
    w = torch.zeros(10, 4)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 10\), got \[0, 10\]"):
        probe.gather_bandwidth(w, torch.tensor([0, 10]), threads=1)
    with pytest.raises(ValueError, match="sorted ascending without repeats"):
        probe.sparse_update_bandwidth(w, torch.tensor([3, 3]), threads=1)
    with pytest.raises(ValueError, match="weights must be a contiguous 2-D float32"):
        probe.gather_bandwidth(w.double(), torch.tensor([0]), threads=1)
    with pytest.raises(ValueError, match="rows must be a contiguous 1-D int64"):
        probe.gather_bandwidth(w, torch.tensor([0], dtype=torch.int32), threads=1)
