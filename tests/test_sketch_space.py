"""The sketch's search space, objective and constraints as data: bad input is a ValueError naming the field; a
switched network class keeps only the arguments it accepts; `lattice sketch` prints one error line."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from lattice.sketch.commands import parse_budget  # noqa: E402
from lattice.sketch.constraints import Constraints  # noqa: E402
from lattice.sketch.objective import Objective  # noqa: E402
from lattice.sketch.results import pareto_front  # noqa: E402
from lattice.sketch.space import SearchSpace  # noqa: E402

BASE = {
    "model": {"class_path": "lattice.train.LatticeModule", "init_args": {
        "network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8, "bottom_dims": [64]}},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002, "weight_decay": 0.01}},
        "sparse_lr": 0.05}},
    "data": {"batch_size": 128, "seed": 0},
}


@pytest.mark.parametrize("fields, message", [
    ({"model.network.init_args.nope": {"low": 1, "high": 2}}, "'model.network.init_args.nope': unknown field 'nope'"),
    ({"model.optimizer.init_args.lr": {"low": 0.1, "high": 0.01}}, "'model.optimizer.init_args.lr': empty range"),
    ({"model.network.init_args.dim": {"choices": []}}, "'model.network.init_args.dim': choices is empty"),
    ({"model.sparse_lr": {"low": 0, "high": 1, "log": True}}, "'model.sparse_lr': a log range needs low > 0"),
    ({"model.nope.x": {"low": 1, "high": 2}}, "'model.nope.x': unknown field 'nope'"),
    ({"data.seed": {"low": 1, "high": 2}}, "'data.seed': only model.* fields and data.batch_size"),
    ({"model.network.class_path": {"choices": ["lattice.models.NoSuchNet"]}}, "lattice.models.NoSuchNet"),
    ({"model.optimizer.init_args.lr": {"low": "abc", "high": 1}}, "'model.optimizer.init_args.lr' low"),
])
def test_bad_space_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(").replace("*", r"\*")):
        SearchSpace(fields, BASE)


def test_class_switch_keeps_accepted_arguments_and_samples_define_by_run():
    space = SearchSpace({
        "model.network.class_path": {"choices": ["lattice.models.DLRM", "lattice.models.MMoE"]},
        "model.network.num_experts": {"low": 2, "high": 4},  # MMoE only; init_args may be left out
        "model.optimizer.lr": {"low": "1e-3", "high": "1e-1", "log": True},
        "data.batch_size": {"choices": [64, 128]},
    }, BASE)
    config = space.apply({"model.network.class_path": "lattice.models.MMoE", "model.network.num_experts": 3,
                          "data.batch_size": 64})
    network = config["model"]["init_args"]["network"]
    assert network == {"class_path": "lattice.models.MMoE", "init_args": {"dim": 8, "num_experts": 3}}
    assert config["data"]["batch_size"] == 64 and BASE["data"]["batch_size"] == 128  # the base is not mutated

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {}
    for _ in range(12):
        trial = study.ask()
        values = space.sample(trial)
        seen.setdefault(values["model.network.class_path"], set()).add("model.network.num_experts" in values)
        assert 1e-3 <= values["model.optimizer.lr"] <= 1e-1
        study.tell(trial, 0.0)
    assert seen == {"lattice.models.DLRM": {False}, "lattice.models.MMoE": {True}}


def test_objectives_read_validation_results():
    results = {"mean_auc": 0.7, "a/click/auc": 0.6, "b/click/auc": 0.8, "a/click/ne": 0.9, "b/click/ne": math.nan,
               "click/auc": 0.65, "like/auc": 0.75}
    assert Objective.parse(None).value(results, ["a", "b"], ["click"]) == 0.7
    assert Objective.parse("ne").value(results, ["a", "b"], ["click"]) == 0.9
    assert Objective.parse("ne").direction == "minimize"
    mix = Objective.parse({"task_mix": {"click": 1, "like": 3}})
    assert mix.value(results, ["a", "b"], ["click", "like"]) == pytest.approx((0.65 + 3 * 0.75) / 4)
    with pytest.raises(ValueError, match=r"task_mix names tasks \['buy'\]"):
        Objective.parse({"task_mix": {"buy": 1}}).check_tasks(["click"])
    with pytest.raises(ValueError, match="objective: expected"):
        Objective.parse("auc")


def test_constraints_parse_and_violations():
    c = Constraints.parse({"flops_per_sample": "2e6", "latency_ms": {"max": 5, "batch_size": 64}})
    assert c.active == {"flops_per_sample": 2e6, "latency_ms": 5.0} and c.latency_batch_size == 64
    assert c.violations({"flops_per_sample": 3e6, "latency_ms": 1.0}) == {"flops_per_sample": 1e6, "latency_ms": -4.0}
    with pytest.raises(ValueError, match="unknown constraint"):
        Constraints.parse({"flops": 1})
    with pytest.raises(ValueError, match="constraint 'num_parameters': expected a positive number"):
        Constraints.parse({"num_parameters": -1})


def test_budget_and_pareto_front():
    assert parse_budget("90") == 90 and parse_budget("10m") == 600 and parse_budget("1.5h") == 5400
    with pytest.raises(ValueError, match="--budget '10 min'"):
        parse_budget("10 min")
    points = [(1.0, 0.60), (2.0, 0.70), (3.0, 0.65), (4.0, 0.72), (2.0, 0.50)]
    assert pareto_front(points, maximize=True) == [(1.0, 0.60), (2.0, 0.70), (4.0, 0.72)]


def test_bad_space_is_one_error_line(tmp_path):
    base = {"trainer": {"accelerator": "cpu", "max_epochs": 1},
            "model": {"network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8}}},
            "data": {"cache_dir": str(tmp_path / "cache"), "batch_size": 64,
                     "synthetic": {"num_users": 50, "num_items": 30, "domains": [{"name": "feed", "rows": 200}]}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(
        {"base": ["base.yaml"], "space": {"model.network.init_args.depth": {"low": 1, "high": 3}}}))
    env = dict(os.environ)
    env.pop("LATTICE_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "lattice.cli", "sketch", "--space", "space.yaml", "--n-trials", "1",
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lattice: error: ")]
    assert len(errors) == 1 and "'model.network.init_args.depth': unknown field 'depth'" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


class _Trial:
    def __init__(self, prune):
        self.prune, self.reports = prune, []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune


def _trainer(rank, world_size, step, broadcasts):
    from types import SimpleNamespace

    def broadcast(obj, src=0):
        broadcasts.append((rank, obj))
        return broadcasts[0][1]  # what rank 0 sent

    return SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"), global_step=step,
                           world_size=world_size, is_global_zero=rank == 0,
                           strategy=SimpleNamespace(broadcast=broadcast))


def test_pruning_reports_samples_seen_and_rank_zero_decides():
    from types import SimpleNamespace

    from lattice.sketch.pruning import PruningCallback

    module = SimpleNamespace(eval_results={"val": {"mean_auc": 0.61}}, domain_names=["a"], task_names=["click"])
    trial = _Trial(prune=False)
    callback = PruningCallback(trial, Objective(), batch_size=64)
    callback.on_validation_end(_trainer(0, 1, 10, []), module)
    module.eval_results["val"]["mean_auc"] = 0.58
    callback.on_validation_end(_trainer(0, 1, 20, []), module)
    assert trial.reports == [(640, 0.61), (1280, 0.58)]  # step = samples seen
    assert (callback.best, callback.best_step) == (0.61, 640)

    # Two ranks: rank 0 holds the trial and its decision reaches rank 1, which has none.
    broadcasts = []
    rank0 = PruningCallback(_Trial(prune=True), Objective(), batch_size=64)
    with pytest.raises(optuna.TrialPruned, match="pruned at 2560 samples seen"):
        rank0.on_validation_end(_trainer(0, 2, 20, broadcasts), module)
    rank1 = PruningCallback(None, Objective(), batch_size=64)
    with pytest.raises(optuna.TrialPruned):
        rank1.on_validation_end(_trainer(1, 2, 20, broadcasts), module)
    assert broadcasts == [(0, True), (1, False)]


@pytest.mark.parametrize("value, sampler, message", [
    (-1, "tpe", "--n-startup-trials must be an integer >= 0, got -1"),
    ("3", "tpe", "--n-startup-trials must be an integer >= 0, got '3'"),
    (True, "tpe", "--n-startup-trials must be an integer >= 0, got True"),
    (2, "random", "--n-startup-trials applies to --sampler tpe only, not 'random'"),
])
def test_n_startup_trials_is_validated(tmp_path, value, sampler, message):
    from lattice.sketch.search import SearchOptions

    with pytest.raises(ValueError, match=message):
        SearchOptions(out_dir=str(tmp_path), n_trials=1, sampler=sampler, n_startup_trials=value)
    SearchOptions(out_dir=str(tmp_path), n_trials=1, n_startup_trials=0)  # 0: TPE from the first trial


def test_n_startup_trials_is_checked_from_the_command_line_and_the_sketch_file(tmp_path):
    from lattice.sketch.commands import main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    space = {"base": ["base.yaml"], "space": {"model.optimizer.init_args.lr": {"low": 1.0e-3, "high": 1.0e-2}}}
    (tmp_path / "cli.yaml").write_text(yaml.safe_dump(space))
    (tmp_path / "file.yaml").write_text(yaml.safe_dump({**space, "search": {"n_startup_trials": -2}}))
    out = ["--n-trials", "1", "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--n-startup-trials must be an integer >= 0, got -1"):
        main(["sketch", "--space", str(tmp_path / "cli.yaml"), "--n-startup-trials", "-1", *out])
    with pytest.raises(ValueError, match="--n-startup-trials must be an integer >= 0, got -2"):
        main(["sketch", "--space", str(tmp_path / "file.yaml"), *out])
