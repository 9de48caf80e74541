"""Without --ckpt_path, `lattice validate|test|predict` and `lattice export` use the best checkpoint the config's
monitored ModelCheckpoint kept (lattice.train.resume.resolve_best_checkpoint), found from the callback state every
checkpoint records; end to end on a tiny world, and on hand-written checkpoints for the corner cases."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lattice.cli import main
from lattice.train.resume import (best_checkpoint_for_configs, default_ckpt_path, resolve_best_checkpoint,
                                  resolve_ckpt_path)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trainer(tmp_path, *callbacks, logger=False) -> pl.Trainer:
    return pl.Trainer(callbacks=list(callbacks), logger=logger, default_root_dir=str(tmp_path / "root"),
                      accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)


def _monitored(**kwargs) -> ModelCheckpoint:
    return ModelCheckpoint(monitor="val/mean_auc", mode="max", filename="best-{epoch}-{step}", **kwargs)


def _save(path, callback: ModelCheckpoint, best, score=None, mtime=None) -> str:
    """A checkpoint whose ``callback`` state records ``best`` as its best file (``None``: no state at all)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    states = {} if best is None else {callback.state_key: {
        "monitor": callback.monitor, "best_model_path": str(best),
        "best_model_score": None if score is None else torch.tensor(score)}}
    torch.save({"state_dict": {"w": torch.zeros(2)}, "callbacks": states}, str(path))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


def test_the_newest_checkpoint_names_the_best_and_is_announced(tmp_path, capsys):
    callback = _monitored(dirpath=str(tmp_path / "ckpt"))
    folder = tmp_path / "ckpt"
    old_best = _save(folder / "best-epoch=0-step=4.ckpt", callback, folder / "best-epoch=0-step=4.ckpt", 0.61, 100)
    best = _save(folder / "best-epoch=1-step=8.ckpt", callback, folder / "best-epoch=1-step=8.ckpt", 0.64, 200)
    # last.ckpt is newer and is not the best: its record of the callback names the best file
    _save(folder / "last.ckpt", callback, folder / "best-epoch=1-step=8.ckpt", 0.64, 300)
    trainer = _trainer(tmp_path, callback)
    found = resolve_best_checkpoint(trainer)
    assert (found.path, found.monitor, found.score) == (os.path.normpath(best), "val/mean_auc", pytest.approx(0.64))
    assert found.path != os.path.normpath(old_best)
    # the same from the parsed trainer section of a config, as the CLI resolves it before building anything
    section = Namespace(default_root_dir=str(tmp_path / "root"), logger=False, callbacks=[Namespace(
        class_path="lightning.pytorch.callbacks.ModelCheckpoint",
        init_args=Namespace(monitor="val/mean_auc", mode="max", dirpath=str(folder)))])
    assert default_ckpt_path(section, "test") == found.path
    assert capsys.readouterr().out.strip() == (
        f"lattice test: no --ckpt_path given; using the best checkpoint by val/mean_auc = 0.64, {found.path}")
    assert resolve_ckpt_path(trainer, None) is None  # fit without --ckpt_path still starts from scratch


def test_an_empty_versioned_run_uses_the_newest_earlier_runs_best(tmp_path):
    callback = _monitored()
    logs = tmp_path / "logs"
    for version, score in ((0, 0.70), (1, 0.66)):  # the newest run is taken, not the best score across runs
        folder = logs / "mdmo" / f"version_{version}" / "checkpoints"
        _save(folder / "best-epoch=2-step=9.ckpt", callback, folder / "best-epoch=2-step=9.ckpt", score)
    trainer = _trainer(tmp_path, callback, logger=CSVLogger(str(logs), name="mdmo"))
    assert trainer.logger.version == 2  # this run's own folder holds no checkpoint
    found = resolve_best_checkpoint(trainer)
    assert found.path == os.path.normpath(logs / "mdmo" / "version_1" / "checkpoints" / "best-epoch=2-step=9.ckpt")
    assert found.score == pytest.approx(0.66)


def test_a_moved_run_and_a_damaged_newest_file(tmp_path):
    callback = _monitored(dirpath=str(tmp_path / "moved"))
    folder = tmp_path / "moved"
    # trained in another folder: the recorded path is gone, the file of that name is here
    best = _save(folder / "best-epoch=3-step=12.ckpt", callback, "/gone/run/best-epoch=3-step=12.ckpt", 0.7, 100)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    os.utime(folder / "last.ckpt", (200, 200))
    with pytest.warns(UserWarning, match=r"damaged checkpoints: .*last\.ckpt"):
        found = resolve_best_checkpoint(_trainer(tmp_path, callback))
    assert found.path == os.path.normpath(best)


def test_no_best_checkpoint_is_an_error_naming_the_folder_and_monitor(tmp_path):
    folder = tmp_path / "ckpt"
    callback = _monitored(dirpath=str(folder))
    with pytest.raises(ValueError, match=rf"no best checkpoint by val/mean_auc: no checkpoint in {folder}; run "
                                         r"`lattice fit` with this config first, or pass --ckpt_path"):
        resolve_best_checkpoint(_trainer(tmp_path, callback))
    _save(folder / "weights.ckpt", callback, None)  # records no callback state
    with pytest.raises(ValueError, match=r"none of the 1 checkpoint\(s\) in .*ckpt records a best one"):
        resolve_best_checkpoint(_trainer(tmp_path, callback))
    with pytest.raises(ValueError, match=r"no trainer.callbacks ModelCheckpoint has a monitor.*pass --ckpt_path"):
        resolve_best_checkpoint(_trainer(tmp_path, ModelCheckpoint(dirpath=str(folder), save_last=True)))


def _tiny(tmp_path, max_epochs: int = 2) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "logs"), "name": "tiny"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"monitor": "val/mean_auc", "mode": "max", "save_last": True,
                                         "filename": "best-{epoch}-{step}"}}],
        },
        "model": {"network": {"class_path": "lattice.models.DLRM", "init_args": {"dim": 8}},
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05}}},
        "data": {"cache_dir": str(tmp_path / "cache"), "batch_size": 128,
                 "synthetic": {"num_users": 150, "num_items": 80,
                               "domains": [{"name": "feed", "rows": 700},
                                           {"name": "shop", "rows": 300, "absent_features": ["price"]}]}},
        "metrics_table": {"output_dir": str(tmp_path / "tables")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_test_predict_and_export_default_to_the_best_checkpoint(tmp_path, capsys, monkeypatch):
    cfg = _tiny(tmp_path)
    main(["fit", "--config", cfg])
    folder = tmp_path / "logs" / "tiny" / "version_0" / "checkpoints"
    (best,) = [p for p in folder.iterdir() if p.name.startswith("best-")]
    with open(folder.parent / "metrics.csv") as f:
        aucs = [float(r["val/mean_auc"]) for r in csv.DictReader(f) if r.get("val/mean_auc")]
    assert len(aucs) == 2 and best.name.startswith(f"best-epoch={aucs.index(max(aucs))}-")

    env = {k: v for k, v in os.environ.items() if k != "LATTICE_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "lattice.cli", "test", "--config", cfg], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    announced = f"lattice test: no --ckpt_path given; using the best checkpoint by val/mean_auc = {max(aucs):.6g}, {best}"
    assert announced in proc.stdout
    assert f"Loaded model weights from the checkpoint at {best}" in proc.stdout + proc.stderr
    assert (tmp_path / "tables" / "metrics_test.json").is_file()
    capsys.readouterr()

    main(["predict", "--config", cfg, "--prediction_writer.output_dir", str(tmp_path / "preds")])
    assert "lattice predict: no --ckpt_path given; using the best checkpoint by val/mean_auc" in capsys.readouterr().out
    assert list((tmp_path / "preds").glob("*.parquet"))

    # export: the same resolution from the configs alone (no AOTInductor compile here: export_package is recorded)
    assert best_checkpoint_for_configs([cfg]).path == str(best)
    exported = {}
    monkeypatch.setattr("lattice.serve.export.export_package",
                        lambda module, out, **kwargs: exported.update(module=module, out=out) or (out, None))
    from lattice.serve.commands import run_export

    run_export(["--config", cfg, "--out", str(tmp_path / "model.pt2")])
    assert "lattice export: no --ckpt_path given; using the best checkpoint by val/mean_auc" in capsys.readouterr().out
    weights = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in exported["module"].state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_export_without_ckpt_path_and_no_best_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LATTICE_DEBUG", raising=False)
    cfg = _tiny(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--config", cfg, "--out", str(tmp_path / "m.pt2")])
    assert exit_.value.code == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("lattice")] == [
        f"lattice: error: no best checkpoint by val/mean_auc: no checkpoint in "
        f"{tmp_path / 'logs' / 'tiny' / 'version_0' / 'checkpoints'} or an earlier version_N run beside it; run "
        "`lattice fit` with this config first, or pass --ckpt_path"]
