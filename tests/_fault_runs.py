"""Running the real ``lattice fit`` in subprocesses for the fault-injection tests
(tests/test_fault_injection_*.py): a tiny config with periodic checkpoints and the hooks of
tests/fault_injection_hooks.py, a runner that keeps each run in its own session, and small checks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
import yaml

from _workers import run_in_session, session_env

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SIGKILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)
EVERY_N_STEPS = 3
# The installed console script of this interpreter (what a user runs), else the same entry point as a module.
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "lattice")
LATTICE = [_SCRIPT] if os.access(_SCRIPT, os.X_OK) else [sys.executable, "-m", "lattice.cli"]


def lattice_config(run, cache, max_epochs=2, every_n_steps=EVERY_N_STEPS, save_top_k=-1) -> dict:
    """A tiny LatticeNetwork fit (fused row-wise Adagrad tables, AdamW) with periodic step checkpoints in
    ``run/ckpt`` and the fault-injection hooks of tests/fault_injection_hooks.py."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": max_epochs, "num_sanity_val_steps": 0,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(run),
            "logger": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run / "ckpt"), "every_n_train_steps": every_n_steps,
                               "save_last": True, "save_top_k": save_top_k}},
                {"class_path": "fault_injection_hooks.FaultInjection"},
            ],
        },
        "model": {
            "network": {"class_path": "lattice.models.LatticeNetwork",
                        "init_args": {"dim": 8, "num_layers": 1, "num_heads": 2}},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            "sparse_optimizer": "rowwise_adagrad",
            "sparse_lr": 0.1,
            "group_auc": False,
        },
        "data": {
            "cache_dir": str(cache), "batch_size": 64, "shuffle": True, "shuffle_buffer": 256, "seed": 3,
            "synthetic": {"num_users": 150, "num_items": 80, "row_group_size": 128,
                          "domains": [{"name": "feed", "rows": 700},
                                      {"name": "shop", "rows": 300, "absent_features": ["price"]}]},
        },
        "metrics_table": {"output_dir": str(run / "tables"), "print_table": False},
    }


def write_config(run, config) -> str:
    """``config`` as YAML beside ``run`` (not inside: `lattice fit` saves its resolved config.yaml there)."""
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def lattice(*args: str, env: dict | None = None, timeout: float = 240,
            prefix: tuple = ()) -> subprocess.CompletedProcess:
    """Runs ``lattice ARGS`` (the console script's ``main``) in its own session, one thread, tests/ importable;
    ``prefix`` wraps the command (e.g. ``unshare``)."""
    return run_in_session([*prefix, *LATTICE, *args], session_env(env), timeout)


def checked(proc: subprocess.CompletedProcess, *codes: int) -> subprocess.CompletedProcess:
    assert proc.returncode in (codes or (0,)), (f"exit {proc.returncode}, expected {codes or 0}\n"
                                               f"{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}")
    return proc


def step_of(path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])
