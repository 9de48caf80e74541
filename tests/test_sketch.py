"""`lattice sketch` end to end on a tiny planted world: a search writes best.yaml that `lattice fit` runs, resumes
from its SQLite file, prunes constraint breakers before training, is reproducible under a seed; `--lr-find`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from lattice.cli import main  # noqa: E402
from lattice.sketch.search import SearchOptions, run_search  # noqa: E402
from lattice.sketch.spec import SketchSpec  # noqa: E402

pytestmark = pytest.mark.slow

# Trials see 2 training batches and 2 validation batches (reported twice per epoch to the pruner).
_FAST = ["--limit-train-batches", "2", "--limit-val-batches", "2"]


def _base(tmp_path) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "num_sanity_val_steps": 0,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"), "logger": False},
        "model": {"network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8}}},
        "data": {"cache_dir": str(tmp_path / "cache"), "batch_size": 128,
                 "synthetic": {"num_users": 150, "num_items": 80,
                               "domains": [{"name": "feed", "rows": 700},
                                           {"name": "shop", "rows": 300, "absent_features": ["price"]}]}},
        "metrics_table": {"output_dir": str(tmp_path / "tables")},
    }
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _space(tmp_path, name="space.yaml", **extra) -> str:
    spec = {
        "base": ["base.yaml"],
        "space": {"model.optimizer.init_args.lr": {"low": "1e-3", "high": "3e-2", "log": True},
                  "model.network.init_args.dim": {"choices": [4, 8]},
                  "model.network.class_path": {"choices": ["lattice.models.DLRM", "lattice.models.MMoE"]}},
        **extra,
    }
    _base(tmp_path)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _lattice(tmp_path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("LATTICE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _trials(out) -> list[dict]:
    return json.loads((out / "trials.json").read_text())["trials"]


def test_search_writes_best_yaml_that_fits_and_resumes(tmp_path):
    space, out = _space(tmp_path), tmp_path / "out"
    proc = _lattice(tmp_path, "sketch", "--space", space, "--n-trials", "2", "--out", str(out), *_FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "best: trial" in proc.stdout
    assert [t["number"] for t in _trials(out)] == [0, 1]
    for name in ("best.yaml", "trials.csv", "history.png", "study.db"):
        assert (out / name).is_file(), name

    # Resume from the SQLite file: --n-trials is the study's total, so one more trial runs, numbered 2.
    main(["sketch", "--space", space, "--n-trials", "3", "--out", str(out), *_FAST])
    trials = _trials(out)
    assert [t["number"] for t in trials] == [0, 1, 2]
    # the resumed run's sampler does not draw the first run's parameters again
    assert trials[2]["model.optimizer.init_args.lr"] not in (trials[0]["model.optimizer.init_args.lr"],
                                                               trials[1]["model.optimizer.init_args.lr"])
    study = optuna.load_study(study_name="sketch", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3

    best = yaml.safe_load((out / "best.yaml").read_text())
    finished = [t for t in trials if t["state"] == "COMPLETE"]
    top = max(finished, key=lambda t: t["value"])
    assert best["model"]["init_args"]["network"]["class_path"] == top["model.network.class_path"]
    assert best["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        top["model.optimizer.init_args.lr"])
    proc = _lattice(tmp_path, "fit", "--config", str(out / "best.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "tables" / "metrics_val.json").is_file()


def test_flops_constraint_prunes_before_training(tmp_path):
    space = _space(tmp_path, constraints={"flops_per_sample": 1000})
    spec = SketchSpec.load(space)
    study = run_search(spec, SearchOptions(out_dir=str(tmp_path / "out"), n_trials=2, limit_train_batches=2,
                                           limit_val_batches=2))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    for trial in study.trials:
        assert trial.user_attrs["pruned_by"].startswith("constraint: flops_per_sample")
        assert trial.user_attrs["flops_per_sample"] > 1000
        assert trial.intermediate_values == {}  # never reported a validation: it did not train
        assert trial.system_attrs["constraints:flops_per_sample"] > 0


@pytest.mark.parametrize("where", ["command line", "sketch file"])
def test_n_startup_trials_reaches_the_tpe_sampler(tmp_path, monkeypatch, where):
    made = []

    class Recording(optuna.samplers.TPESampler):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optuna.samplers, "TPESampler", Recording)
    # every trial breaks the FLOPs bound: pruned before training, so only the sampling runs
    extra = {"search": {"n_startup_trials": 1}} if where == "sketch file" else {}
    space = _space(tmp_path, constraints={"flops_per_sample": 1000}, **extra)
    flag = ["--n-startup-trials", "1"] if where == "command line" else []
    main(["sketch", "--space", space, "--n-trials", "2", "--seed", "5", *flag, "--out", str(tmp_path / "out"), *_FAST])
    # the search's sampler (a study opened without one, for the results, gets Optuna's default: no seed)
    assert [kwargs for kwargs in made if "seed" in kwargs] == [{"seed": 5, "n_startup_trials": 1}], made
    assert [t["state"] for t in _trials(tmp_path / "out")] == ["PRUNED"] * 2


def test_search_is_reproducible_under_a_seed(tmp_path):
    space = _space(tmp_path)
    runs = []
    for name in ("a", "b"):
        main(["sketch", "--space", space, "--n-trials", "2", "--seed", "3", "--pruner", "none",
              "--out", str(tmp_path / name), *_FAST])
        runs.append([(t["model.optimizer.init_args.lr"], t["model.network.class_path"], t["value"])
                     for t in _trials(tmp_path / name)])
    assert runs[0] == runs[1]


def test_lr_find_suggests_a_learning_rate(tmp_path):
    base = _base(tmp_path)
    proc = _lattice(tmp_path, "sketch", "--lr-find", "--config", base, "--lr-steps", "24", "--out", str(tmp_path / "lr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("suggested learning rate:"))
    assert 1e-5 <= float(line.split(":")[1]) <= 1.0
    assert (tmp_path / "lr" / "lr_find.png").is_file()


def test_two_jobs_run_trials_at_once_in_a_journal(tmp_path):
    space, out = _space(tmp_path), tmp_path / "out"
    main(["sketch", "--space", space, "--n-trials", "2", "--n-jobs", "2", "--out", str(out), *_FAST])
    assert (out / "study.journal").is_file() and not (out / "study.db").exists()
    study = optuna.load_study(study_name="sketch", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    trials = study.trials
    assert len(trials) == 2 and {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    first, second = sorted(trials, key=lambda t: t.datetime_start)
    assert second.datetime_start < first.datetime_complete  # separate processes, running at the same time


def test_shipped_quickstart_sketch_runs_on_small_data(tmp_path):
    """configs/sketch/quickstart.yaml as the README runs it, on the quickstart config made tiny by a stacked one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    small = yaml.safe_load(open(_base(tmp_path)))
    small = {"trainer": {"default_root_dir": str(tmp_path / "run"), "logger": False}, "data": small["data"]}
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(small))
    out = tmp_path / "out"
    proc = _lattice(tmp_path, "sketch", "--space", os.path.join(root, "configs", "sketch", "quickstart.yaml"),
                    "--config", os.path.join(root, "configs", "quickstart.yaml"), "--config", "small.yaml",
                    "--n-trials", "1", "--max-epochs", "1", "--out", str(out), *_FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (trial,) = _trials(out)
    assert trial["state"] in ("COMPLETE", "PRUNED") and trial["flops_per_sample"] > 0
    assert trial["model.network.class_path"] in ("lattice.models.LatticeNetwork", "lattice.models.MMoE")


def test_a_value_the_config_rejects_is_an_error_naming_the_trial(tmp_path):
    space = tmp_path / "bad.yaml"
    _base(tmp_path)
    space.write_text(yaml.safe_dump({"base": ["base.yaml"],
                                     "space": {"model.network.init_args.dim": {"choices": ["wide"]}}}))
    with pytest.raises(ValueError, match=r"trial 0: its config .* does not parse .*'wide'"):
        run_search(SketchSpec.load(str(space)), SearchOptions(out_dir=str(tmp_path / "out"), n_trials=1))


def test_a_killed_search_resumes_and_retries_the_cut_trial(tmp_path):
    """SIGKILL during trial 0; after its heartbeat lapses, the same command fails it, retries its parameters and
    completes the study's total."""
    import signal
    import time

    from lattice.sketch.storage import GRACE_S

    space, out = _space(tmp_path), tmp_path / "out"
    started = tmp_path / "trial0.started"
    # The first trial's fit blocks, so the kill always lands inside trial 0 however fast the machine is.
    hang = tmp_path / "hang_first_fit.py"
    hang.write_text(
        "import pathlib, sys, time\n"
        "import lightning.pytorch as pl\n"
        "from lattice.cli import main\n"
        "def fit(self, *args, **kwargs):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    time.sleep(600)\n"
        "pl.Trainer.fit = fit\n"
        "main(sys.argv[1:])\n")
    args = [sys.executable, str(hang), "sketch", "--space", space, "--n-trials", "2", "--out", str(out),
            "--pruner", "none", *_FAST]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{out / 'study.db'}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not started.exists():
        time.sleep(0.2)
    assert started.exists() and proc.poll() is None, "trial 0 never reached fit"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(GRACE_S + 2)

    main(["sketch", "--space", space, "--n-trials", "2", "--out", str(out), "--pruner", "none", *_FAST])
    trials = optuna.load_study(study_name="sketch", storage=storage).trials
    states = [t.state.name for t in trials]
    assert states[0] == "FAIL" and states[1:].count("COMPLETE") == 2 and len(trials) == 3, states
    assert trials[1].params == trials[0].params  # the cut-off trial's parameters ran again
