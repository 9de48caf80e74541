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
