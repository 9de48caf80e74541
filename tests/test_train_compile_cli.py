"""``model.compile`` through the CLI, as the README and docs/performance.md run it: ``lattice fit`` on the
quickstart config with the network compiled, its checkpoint evaluated by ``lattice validate`` with compile off,
and the same fit under DDP (2 processes, gloo).

The fits compile with ``{backend: aot_eager}`` (the dict form of ``model.compile``): Dynamo capture, AOTAutograd and
the custom ops' fake kernels, as inductor does, without generating C++, which takes minutes per graph on 2 busy
cores. ``model.compile: true`` (inductor) parses to the same path: tests/test_train_compile.py checks the option.
"""
from __future__ import annotations

import glob
import os
import shlex
import sys

import pytest
import torch
import yaml

from _workers import run_in_session, session_env
from lattice.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")
AOT = "{backend: aot_eager}"

# Stacked after the README's configs: a small world, a few batches, everything under the test's folder.
_SMALL = {
    "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2, "enable_progress_bar": False,
                "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                               "init_args": {"save_last": True}}]},
    "data": {"batch_size": 128, "synthetic": {"num_users": 200, "num_items": 100,
                                              "domains": [{"name": "feed", "rows": 1500}, {"name": "shop", "rows": 700}]}},
}


def _lattice(tmp_path, *args: str, timeout: float = 600):
    small = tmp_path / "small.yaml"
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "run")}}
    small.write_text(yaml.safe_dump({**_SMALL, "metrics_table": {"output_dir": str(tmp_path / "tables")},
                                     "trainer": {**_SMALL["trainer"], "default_root_dir": str(tmp_path / "run"),
                                                 "logger": logger}}))
    env = session_env({"LATTICE_CACHE": str(tmp_path / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    env.pop("LATTICE_DEBUG", None)
    command = [sys.executable, "-m", "lattice.cli", args[0], "--config", os.path.join(CONFIGS, "quickstart.yaml"),
               *args[1:], "--config", str(small)]
    proc = run_in_session(command, env, timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    assert not proc.leftover, proc.leftover
    return proc


def _saved_compile(tmp_path):
    (config,) = glob.glob(str(tmp_path / "run" / "**" / "config.yaml"), recursive=True)
    with open(config) as f:
        return yaml.safe_load(f)["model"]["init_args"]["compile"]


def test_readme_compile_line_resolves_to_compile_true(capsys):
    """The README's compile command, resolved by ``lattice fit --print_config`` (the fit itself runs below)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        (line,) = [x for x in f if "--model.compile" in x and x.startswith("lattice fit")]
    args = shlex.split(line.split("#")[0])[2:]
    assert args[-2:] == ["--model.compile", "true"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[os.path.join(ROOT, a) if a.startswith("configs/") else a for a in args], "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["compile"] is True


@pytest.mark.slow
def test_fit_compiled_then_validate_its_checkpoint_eager(tmp_path):
    fit = _lattice(tmp_path, "fit", "--model.compile", AOT)
    assert fit.stdout.count("val metrics (per domain x task") == 1, fit.stdout[-3000:]
    assert _saved_compile(tmp_path) == {"backend": "aot_eager"}
    (last,) = glob.glob(str(tmp_path / "run" / "**" / "last.ckpt"), recursive=True)
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)  # compiled in place: the eager module's keys
    validate = _lattice(tmp_path, "validate", "--model.compile", "false", "--ckpt_path", last)
    assert validate.stdout.count("val metrics (per domain x task") == 1, validate.stdout[-3000:]


@pytest.mark.slow
def test_fit_compiled_under_ddp(tmp_path):
    proc = _lattice(tmp_path, "fit", "--config", os.path.join(CONFIGS, "ddp.yaml"), "--model.compile", AOT)
    assert proc.stdout.count("val metrics (per domain x task") == 1, proc.stdout[-3000:]
    assert _saved_compile(tmp_path) == {"backend": "aot_eager"}
