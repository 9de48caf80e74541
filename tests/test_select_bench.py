"""benchmarks/bench_filter.py --quick end to end: lattice fit -> lattice filter -> lattice fit on the kept
features (the filter's YAML as the data config's schema) -> lattice test, on a small planted world."""
import importlib.util
import json
import math
import os

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_filter", os.path.join(ROOT, "benchmarks", "bench_filter.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_planted_informs_follows_the_world():
    from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticTask

    bench = _bench()
    informs = bench.planted_informs(SyntheticConfig())
    tasks = ["click", "like", "conversion"]
    assert informs["user"] == tasks and informs["position"] == tasks  # a click driver drives its children
    assert informs["item_brand"] == ["like"] and informs["price"] == ["conversion"]
    assert informs["user_segment"] == [] and "noise_s0" not in informs
    cfg = SyntheticConfig(domains=[SyntheticDomain("feed", 100)],
                          tasks=[SyntheticTask("click", hour=0.0, position=0.0, query=0.0)])
    assert bench.planted_informs(cfg)["hour"] == []


@pytest.mark.slow
def test_bench_filter_quick(tmp_path):
    bench = _bench()
    out = tmp_path / "bench_filter.json"
    rep = bench.main(["--quick", "--work", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                      "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "bench_filter"
    roles = rep["roles"]
    assert len(roles["noise"]) == 4 and rep["budget"] == len(roles["informative"]) == 15
    # the filter's outputs, as the command wrote them
    files = os.listdir(tmp_path / "work" / "filter")
    for name in ("kept_features.yaml", "importance.csv", "importance.json", "importance.txt", "importance.png"):
        assert name in files
    kept_doc = yaml.safe_load(open(rep["filter"]["kept_yaml"]))
    assert kept_doc["features"] == rep["kept"] and len(rep["kept"]) == rep["budget"]
    assert [f["name"] for f in kept_doc["schema"]["features"]] == rep["kept"]
    # the retrained model was built from that YAML: exactly the kept features
    assert sorted(rep["filtered"]["features"]) == sorted(rep["kept"])
    assert len(rep["full"]["features"]) == 19
    for name in ("full", "filtered"):
        auc = rep[name]["auc"]
        assert set(auc["per_task"]) == {"click", "like", "conversion"}
        assert all(0.6 < v <= 1.0 for v in auc["per_task"].values())
        assert math.isclose(auc["mean"], sum(auc["per_task"].values()) / 3)
    t = rep["targets"]
    assert math.isclose(t["delta_mean_auc"], rep["filtered"]["auc"]["mean"] - rep["full"]["auc"]["mean"])
    assert isinstance(t["auc_within_tolerance"], bool)
    r = rep["ranking"]
    assert set(r["noise"]) == set(roles["noise"]) and len(r["overall_order"]) == 19
    # the ranking property on this world: no noise feature scores above zero on any task, and every
    # informative feature ranks above every noise feature on each task it informs
    for n, where in r["noise"].items():
        assert all(v == 0.0 for v in where["score"].values()), (n, where)
    assert t["ranking"], r["violations"]
