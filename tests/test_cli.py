"""The `lattice` command end to end, in-process, on a tiny planted world: fit, validate, test, predict,
resume from a checkpoint, readable config errors, and lattice's own data commands."""
import json
import math
import os

import pyarrow.parquet as pq
import pytest
import yaml

from lattice.cli import main

pytestmark = pytest.mark.slow


def _config(tmp_path, network="lattice.models.DLRM", max_epochs=1):
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": max_epochs,
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tiny"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
        "model": {
            "network": {"class_path": network, "init_args": {"dim": 8}},
            "sparse_optimizer": "rowwise_adagrad",
        },
        "data": {
            "cache_dir": str(tmp_path / "cache"),
            "batch_size": 128,
            "synthetic": {
                "num_users": 150,
                "num_items": 80,
                "domains": [{"name": "feed", "rows": 700}, {"name": "shop", "rows": 300, "absent_features": ["price"]}],
            },
        },
        "metrics_table": {"output_dir": str(tmp_path / "tables")},
    }


def _write(tmp_path, config, name="config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_validate_test_predict_and_resume(tmp_path, capsys):
    cfg = _write(tmp_path, _config(tmp_path))
    main(["fit", "--config", cfg])
    out = capsys.readouterr().out
    assert "val metrics" in out and "oracle_auc" in out
    table = json.loads((tmp_path / "tables" / "metrics_val.json").read_text())
    domains = {r["domain"] for r in table["rows"]}
    assert {"feed", "shop", "ALL"} <= domains
    # A tiny split can leave a (domain, task) with one class: its AUC is NaN, never out of range.
    assert all(math.isnan(r["auc"]) or 0.0 <= r["auc"] <= 1.0 for r in table["rows"] if "auc" in r)
    assert any(r["domain"] == "ALL" and r["auc"] > 0.5 for r in table["rows"] if "auc" in r)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.exists()

    main(["validate", "--config", cfg, "--ckpt_path", str(last)])
    main(["test", "--config", cfg, "--ckpt_path", str(last)])
    assert (tmp_path / "tables" / "metrics_test.csv").exists()

    pred_dir = tmp_path / "pred"
    main(["predict", "--config", cfg, "--ckpt_path", str(last), "--prediction_writer.output_dir", str(pred_dir)])
    table = pq.read_table(str(pred_dir / "predictions-rank0.parquet"))
    assert {"example_id", "click", "logit_click"} <= set(table.column_names)
    ids = table.column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == 1000  # predict_split=all: every row exactly once

    # Resume: a second epoch continues from the first one's checkpoint.
    cfg2 = _write(tmp_path, _config(tmp_path, max_epochs=2), "config2.yaml")
    main(["fit", "--config", cfg2, "--ckpt_path", str(last)])
    metrics = (tmp_path / "logs" / "tiny").glob("version_*/metrics.csv")
    assert any("1," in p.read_text() for p in metrics)


def test_config_errors_are_reported_by_the_parser(tmp_path, capsys):
    config = _config(tmp_path)
    config["model"]["network"]["init_args"]["no_such_argument"] = 3
    cfg = _write(tmp_path, config)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", cfg])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "no_such_argument" in err and "Traceback" not in err


def test_unknown_command(capsys):
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    assert "unknown command" in capsys.readouterr().err


def test_data_generate_command(tmp_path, capsys):
    world = {"synthetic": {"num_users": 50, "num_items": 40, "domains": [{"name": "a", "rows": 200}]}}
    cfg = _write(tmp_path, world, "world.yaml")
    main(["data", "generate", "--config", cfg, "--out", str(tmp_path / "world")])
    files = [f for f in os.listdir(tmp_path / "world") if f.endswith(".parquet") or os.path.isdir(tmp_path / "world" / f)]
    assert files


# ---- distillation through the same `lattice fit|predict` (configs/teacher.yaml, configs/student.yaml) ----
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORLD = {"synthetic": {
    "num_users": 150, "num_items": 80, "max_sequence_length": 6, "mean_sequence_length": 3.0, "row_group_size": 256,
    "domains": [{"name": "feed", "rows": 500}, {"name": "search", "rows": 300, "absent_features": ["item_tags"]},
                {"name": "video", "rows": 200, "tasks": ["click", "like"]}, {"name": "shop", "rows": 400}],
}}
_QUIET = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
          "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1}


def _csv_metrics(directory):
    import csv

    rows = []
    for path in directory.glob("version_*/metrics.csv"):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    return rows


def test_teacher_predict_then_student_fit_with_the_shipped_configs(tmp_path, monkeypatch, capsys):
    """configs/teacher.yaml (a LatticeModule, plain init args) and configs/student.yaml (a
    DistillationModule by class_path) run as shipped — only made tiny by a stacked config — through
    the one `lattice` command: teacher fit -> predict (logits per example_id to Parquet) -> student fit on
    them -> student predict from its checkpoint."""
    import torch

    monkeypatch.chdir(tmp_path)  # the configs' relative paths (data/world, runs/...) land here
    main(["data", "generate", "--config", _write(tmp_path, _WORLD, "world.yaml"), "--out", "data/world"])
    teacher = ["--config", os.path.join(ROOT, "configs", "teacher.yaml"), "--config", _write(tmp_path, {
        "trainer": {**_QUIET, "logger": False},
        "model": {"network": {"init_args": {"dim": 8, "num_layers": 1, "representation_dim": 16,
                                            "head_hidden_dims": [16]}}},
        "data": {"batch_size": 128},
        "metrics_table": {"output_dir": "tables/teacher"},
    }, "teacher_tiny.yaml")]
    main(["fit", *teacher])
    ckpt = tmp_path / "runs" / "teacher" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    main(["predict", *teacher, "--ckpt_path", str(ckpt)])
    logged = pq.read_table(str(tmp_path / "runs" / "teacher" / "outputs" / "predictions-rank0.parquet"))
    assert {"example_id", "logit_click", "logit_like", "logit_conversion", "embedding"} <= set(logged.column_names)
    ids = logged.column("example_id").to_pylist()
    assert len(ids) == len(set(ids)) == 1400  # every row of every domain, once

    # A checkpoint written before the CLI took LatticeModule subclasses (no `_class_path` in its
    # hyper-parameters) still predicts.
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    class_path = state["hyper_parameters"].pop("_class_path")  # jsonargparse names the shortest public path
    assert class_path in ("lattice.train.LatticeModule", "lattice.train.module.LatticeModule")
    torch.save(state, tmp_path / "old.ckpt")
    main(["predict", *teacher, "--ckpt_path", str(tmp_path / "old.ckpt"), "--prediction_writer.output_dir", "old"])
    assert pq.read_table(str(tmp_path / "old" / "predictions-rank0.parquet")).num_rows == 1400

    # The student: the class_path form, with a plain-init-args config stacked on top of it.
    student = ["--config", os.path.join(ROOT, "configs", "student.yaml"), "--config", _write(tmp_path, {
        "trainer": {**_QUIET, "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                         "init_args": {"save_dir": "logs", "name": "student"}}},
        "model": {"network": {"init_args": {"dim": 8}}},
        "data": {"batch_size": 128},
        "metrics_table": {"output_dir": "tables/student"},
    }, "student_tiny.yaml")]
    main(["fit", *student, "--model.distill_weight", "0.5"])
    rows = _csv_metrics(tmp_path / "logs" / "student")
    coverage = [float(r["train/distill/coverage"]) for r in rows if r.get("train/distill/coverage")]
    assert coverage and min(coverage) == 1.0  # every student row found its teacher logits
    assert any(r.get("train/adapter/loss") for r in rows)
    student_ckpt = next((tmp_path / "logs" / "student").glob("version_*/checkpoints/*.ckpt"))
    hparams = torch.load(student_ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["_class_path"] == "lattice.distill.DistillationModule"
    assert hparams["distillation"] == "aux_head" and hparams["adapter"] is True and hparams["distill_weight"] == 0.5

    # Predict from the student's checkpoint: its hyper-parameters are laid over the config (the network
    # still comes from the config); only the serving heads write logits.
    main(["predict", *student, "--ckpt_path", str(student_ckpt), "--prediction_writer.output_dir", "student_preds"])
    preds = pq.read_table(str(tmp_path / "student_preds" / "predictions-rank0.parquet"))
    assert preds.num_rows == 400  # the shop domain only
    assert {"logit_click", "logit_like", "logit_conversion"} <= set(preds.column_names)
    assert "val metrics" in capsys.readouterr().out


def _print_config(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_both_model_forms(capsys):
    """Plain init args (stacked baselines) resolve to LatticeModule; the distillation student keeps its class."""
    config = _print_config(capsys, "--config", os.path.join(ROOT, "configs", "mdmo.yaml"),
                           "--config", os.path.join(ROOT, "configs", "interformer.yaml"))
    assert config["model"]["class_path"] in ("lattice.train.LatticeModule", "lattice.train.module.LatticeModule")
    assert config["model"]["init_args"]["network"]["class_path"] == "lattice.models.InterFormer"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.002  # from mdmo.yaml, kept

    config = _print_config(capsys, "--config", os.path.join(ROOT, "configs", "student.yaml"),
                           "--model.distillation", "soft_label", "--model.network.init_args.dim", "12")
    assert config["model"]["class_path"] == "lattice.distill.DistillationModule"
    args = config["model"]["init_args"]
    assert args["distillation"] == "soft_label" and args["adapter"] is True
    assert args["network"]["class_path"] == "lattice.models.SharedBottom"
    assert args["network"]["init_args"]["dim"] == 12 and args["network"]["init_args"]["bottom_dims"] == [256, 64]

    # A plain-args config can switch to the student class and keep its network.
    config = _print_config(capsys, "--config", os.path.join(ROOT, "configs", "mdmo.yaml"),
                           "--model", "lattice.distill.DistillationModule", "--model.distillation", "none")
    assert config["model"]["class_path"] == "lattice.distill.DistillationModule"
    assert config["model"]["init_args"]["network"]["class_path"] == "lattice.models.LatticeNetwork"


def test_model_errors_are_reported_by_the_parser(tmp_path, capsys):
    for model, bad in (({"class_path": "lattice.distill.DistillationModule",
                         "init_args": {"network": {"class_path": "lattice.models.DLRM"}, "distilation": "none"}},
                        "distilation"),
                       ({"class_path": "torch.nn.Linear"}, "LatticeModule")):
        config = _config(tmp_path)
        config["model"] = model
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", _write(tmp_path, config)])
        assert exit_info.value.code != 0
        err = capsys.readouterr().err
        assert bad in err and "Traceback" not in err
