"""benchmarks/bench_quality.py --quick runs end to end (in-process) and writes the expected JSON structure.
Only the structure is checked: figures of a one-epoch run on a tiny world mean nothing, and times are
never asserted."""
import json
import math

import pytest


def _load():
    from benchmarks import bench_quality

    return bench_quality


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_quality")
    out = tmp / "bench_quality.json"
    bench = _load()
    bench.main(["--quick", "--threads", "1", "--cache-dir", str(tmp / "cache"), "--out", str(out)])
    with open(out) as f:
        return bench, json.load(f)


def test_quick_run_writes_every_model_and_pair(quick_run):
    bench, result = quick_run
    assert result["benchmark"] == "bench_quality" and result["quick"] is True
    assert set(result["models"]) == set(bench.MODELS)
    pairs = result["pairs"]
    # video has no conversion task; every other domain has all three
    assert len(pairs) == 11 and "video/conversion" not in pairs and "shop/conversion" in pairs
    assert set(result["oracle"]) == set(pairs)
    assert result["world"]["data_poor_domain"] == "shop"
    for key, model in result["models"].items():
        assert model["group"] == bench.MODELS[key][0]
        assert set(model["metrics"]) == set(pairs)
        for metrics in model["metrics"].values():
            assert {"auc", "logloss", "count"} <= set(metrics)
        for field in ("params", "dense_params", "mflops_per_sample", "mflops_per_sample_mean_len", "train_s",
                      "test_s", "mean_auc", "mean_logloss", "poor_domain_mean_auc", "gap_closed_vs_lr"):
            assert field in model, (key, field)
        assert model["params"] > 0 and model["mflops_per_sample"] > 0
        assert 0.0 <= model["mean_auc"] <= 1.0
    assert result["models"]["lr"]["gap_closed_vs_lr"] == pytest.approx(0.0)
    # the resolved init arguments show what each network got, settings carried over from mdmo.yaml included
    interformer = result["models"]["interformer"]["network_init_args"]
    assert interformer["history_match"] is True and interformer["dim"] == 32 and "schema" not in interformer
    assert result["seeds"] == [None] and result["seed_statistics"] is None and result["per_seed"] is None
    assert set(result["models"]["per_domain"]["batch_size"]) == {"feed", "search", "video", "shop"}
    # the per-domain models are the base config's network: same FLOPs as the consolidated one
    assert result["models"]["per_domain"]["mflops_per_sample"] == result["models"]["lattice"]["mflops_per_sample"]


def test_quick_run_reports_the_three_targets(quick_run):
    _, result = quick_run
    targets = result["targets"]
    assert set(targets) == {"1_best_mean_auc", "2_poor_domain_beats_per_domain", "3_closes_lr_oracle_gap"}
    for target in targets.values():
        assert isinstance(target["pass"], bool)
    gap = targets["3_closes_lr_oracle_gap"]
    assert gap["oracle_mean_auc"] == pytest.approx(result["oracle_mean_auc"])
    assert math.isfinite(gap["lr_mean_auc"])
    # the shop test set is enlarged to --eval-rows from the same planted world
    rows = result["world"]["split_rows"]["shop"]
    assert rows["test"] >= 1000 > rows.get("test_original", 0)


def test_network_arg_reaches_every_model_that_accepts_it(quick_run, tmp_path):
    bench, plain = quick_run
    out = tmp_path / "helped.json"
    bench.main(["--quick", "--threads", "1", "--models", "lr", "lattice", "--network-arg", "wide=true",
                "standardize_dense=true", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    with open(out) as f:
        models = json.load(f)["models"]
    # LogisticRegression takes no wide path of its own: it gets only what it accepts
    assert models["lr"]["network_args"] == {"standardize_dense": "true"}
    assert models["lattice"]["network_args"] == {"wide": "true", "standardize_dense": "true"}
    assert models["lattice"]["mflops_per_sample"] > plain["models"]["lattice"]["mflops_per_sample"]  # the wide path
    assert plain["models"]["lattice"]["network_args"] == {}


@pytest.mark.parametrize("bad", [["not_an_argument=1"], ["wide"]])
def test_network_arg_errors(bad, tmp_path):
    with pytest.raises(SystemExit):
        _load().main(["--quick", "--models", "lr", "--network-arg", *bad, "--out", str(tmp_path / "x.json")])


def test_several_seeds_report_means_paired_differences_and_per_seed_targets(tmp_path):
    bench = _load()
    out = tmp_path / "seeds.json"
    bench.main(["--quick", "--threads", "1", "--models", "lr", "lattice", "--seed", "3", "5",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    with open(out) as f:
        result = json.load(f)
    assert result["seeds"] == [3, 5] and [run["seed"] for run in result["per_seed"]] == [3, 5]
    per_seed = [run["models"] for run in result["per_seed"]]
    assert per_seed[0]["lattice"]["mean_auc"] != per_seed[1]["lattice"]["mean_auc"]  # the seed reached training
    stats = result["seed_statistics"]
    for key in ("lr", "lattice"):
        values = [models[key]["mean_auc"] for models in per_seed]
        # the reported model is the mean over the seeds, pair by pair and so on average
        assert result["models"][key]["mean_auc"] == pytest.approx(sum(values) / 2)
        for pair, metrics in result["models"][key]["metrics"].items():
            assert metrics["auc"] == pytest.approx(sum(m[key]["metrics"][pair]["auc"] for m in per_seed) / 2)
        assert stats["mean_auc"][key]["per_seed"] == pytest.approx(values)
        assert stats["mean_auc"][key]["se"] == pytest.approx(abs(values[0] - values[1]) / 2)
        assert len(result["models"][key]["best_epoch"]) == 2
    diffs = [m["lattice"]["mean_auc"] - m["lr"]["mean_auc"] for m in per_seed]
    assert stats["lattice_minus"]["lr"]["per_seed"] == pytest.approx(diffs)
    assert stats["lattice_minus"]["lr"]["mean"] == pytest.approx(sum(diffs) / 2)
    # the targets are judged on the means, and each seed's own verdict is kept beside them
    target = result["targets"]["1_best_mean_auc"]
    assert target["lattice_mean_auc"] == pytest.approx(result["models"]["lattice"]["mean_auc"])
    assert stats["targets_per_seed"]["1_best_mean_auc"] == [run["targets"]["1_best_mean_auc"]["pass"]
                                                           for run in result["per_seed"]]
    gap = result["targets"]["3_closes_lr_oracle_gap"]
    assert gap["lr_mean_auc"] == pytest.approx(result["models"]["lr"]["mean_auc"])
