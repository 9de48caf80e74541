"""benchmarks/bench_sketch.py --smoke: the shipped config, random search and Sketch each run through the library on
a tiny world and report a mean AUC and FLOPs per sample."""
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("optuna")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_sketch_smoke(tmp_path):
    out = tmp_path / "sketch.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_sketch.py"), "--smoke",
                           "--out", str(out)], cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"shipped mdmo.yaml", "random search", "sketch (TPE + SHA)"}
    shipped = rows["shipped mdmo.yaml"]
    assert 0.0 < shipped["best_mean_auc"] < 1.0 and shipped["flops_per_sample"] > 0
    assert report["flops_bound"] == pytest.approx(4 * shipped["flops_per_sample"])
    assert report["n_startup_trials"] == 4 and report["seed"] == 0
    assert len(set(report["arm_seeds"].values())) == 3
    for name in ("random search", "sketch (TPE + SHA)"):
        assert sum(rows[name]["trials"].values()) == 2, rows[name]
        if "best_mean_auc" in rows[name]:  # every trial may be pruned on a tiny world
            assert math.isfinite(rows[name]["best_mean_auc"])
            assert rows[name]["flops_per_sample"] <= report["flops_bound"]
    # the searches alternate, one trial each per round
    assert [(r["round"], r["method"]) for r in report["rounds"]] == [
        (0, "random search"), (0, "sketch (TPE + SHA)"), (1, "random search"), (1, "sketch (TPE + SHA)")]
    assert "best val mean AUC" in proc.stdout


def test_scale_keeps_the_mdmo_world_but_its_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    from benchmarks.bench_sketch import MDMO, _scaled_world
    from lattice.sketch.search import base_config
    from lattice.sketch.spec import SketchSpec

    full, scaled = (base_config(SketchSpec(space={}, base=base))["data"]["synthetic"]
                    for base in ([MDMO], [MDMO, _scaled_world(0.05, str(tmp_path))]))
    assert [d["rows"] for d in scaled["domains"]] == [max(200, round(d["rows"] * 0.05)) for d in full["domains"]]
    for domain, original in zip(scaled["domains"], full["domains"]):
        assert {**domain, "rows": original["rows"]} == original
    assert {k: v for k, v in scaled.items() if k != "domains"} == {k: v for k, v in full.items() if k != "domains"}


def test_the_arms_draw_from_their_own_seeds(monkeypatch):
    monkeypatch.syspath_prepend(ROOT)
    import optuna

    from benchmarks.bench_sketch import ARMS, arm_seeds
    from lattice.sketch.search import make_sampler

    seeds = arm_seeds(0)
    assert seeds == arm_seeds(0) != arm_seeds(1) and set(seeds) == set(ARMS)
    values = sorted(seeds.values())
    # a resumed study seeds round r with seed + r: the arms stay far apart for any realistic number of rounds
    assert all(b - a > 10_000 for a, b in zip(values, values[1:])) and values[-1] + 10_000 < 2**32
    first = {}
    for arm, sampler in (("random", make_sampler("random", seeds["random"])),
                         ("sketch", make_sampler("tpe", seeds["sketch"], 4))):
        study = optuna.create_study(sampler=sampler)
        first[arm] = [study.ask().suggest_float("lr", 1e-3, 3e-2, log=True) for _ in range(3)]
    assert first["random"] != first["sketch"]
