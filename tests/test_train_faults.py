"""Exact resume and fault behaviour under DDP and FSDP2 (2 CPU processes, gloo), in subprocesses killed
with SIGKILL: a preempted fit resumed from its last periodic checkpoint, a crash halfway through writing a
checkpoint, a NaN loss on one rank, and a rank that dies."""
from __future__ import annotations

import glob
import os
import time

import pytest
import torch

from _workers import assert_same_tree, load, run_worker

pytestmark = pytest.mark.slow
SIGKILLED = (-9, 137)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from faults_worker import datamodule

    path = str(tmp_path_factory.mktemp("cache"))
    datamodule(path).setup("fit")  # generate the world once, before any worker reads it
    return path


def _last_step(run_dir) -> int:
    return int(torch.load(os.path.join(run_dir, "ckpt", "last.ckpt"), weights_only=True)["global_step"])


# DDP's kill-and-resume runs through the real `lattice fit` (SIGKILL at 3 seeded steps, one mid-save):
# tests/test_fault_injection_resume.py.
@pytest.mark.parametrize("mode", ["fsdp"])
def test_killed_and_resumed_equals_uninterrupted(cache, tmp_path, mode):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_worker("faults_worker.py", mode, cache, full, "run")
    want = [load(os.path.join(full, f"run-rank{r}.pt")) for r in range(2)]

    # Preempted mid-epoch 0 (step 7; the last checkpoint is step 6's).
    killed = run_worker("faults_worker.py", mode, cache, part, "run", "--kill-at-step", "7", expect_ok=False)
    assert killed.returncode in SIGKILLED, killed.stderr[-2000:]
    assert _last_step(part) == 6
    # Resumed, then killed halfway through writing step 12's checkpoint: last.ckpt must still be step 9's.
    crashed = run_worker("faults_worker.py", mode, cache, part, "run", "--resume", "--kill-in-save", "10",
                         expect_ok=False)
    assert crashed.returncode in SIGKILLED, crashed.stderr[-2000:]
    assert glob.glob(os.path.join(part, "ckpt", ".*.tmp")), "the crash should have left a partial temporary file"
    assert _last_step(part) == 9
    # Resumed again to the end: the same weights, optimizer state (dense and fused sparse) and metrics.
    run_worker("faults_worker.py", mode, cache, part, "run", "--resume")
    got = [load(os.path.join(part, f"run-rank{r}.pt")) for r in range(2)]
    assert not glob.glob(os.path.join(part, "ckpt", ".*.tmp")), "stale temporary checkpoint left behind"
    for rank in range(2):
        assert got[rank]["steps"] == want[rank]["steps"] > 12
        assert_same_tree(want[rank]["state"], got[rank]["state"], what=f"{mode} rank {rank} state ")
        assert_same_tree(want[rank]["val"], got[rank]["val"], what=f"{mode} rank {rank} metrics ")
    assert_same_tree(want[0]["optimizer"], got[0]["optimizer"], what=f"{mode} optimizer ")
    assert any(n.endswith("optimizer_state.d8_sum") for n in want[0]["state"])  # the fused Adagrad state


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nan_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(cache, tmp_path, mode):
    run = str(tmp_path / "nan")
    proc = run_worker("faults_worker.py", mode, cache, run, "nan", "--nan-at-step", "5", expect_ok=False, timeout=240)
    assert proc.returncode not in (0, *SIGKILLED)
    messages = [line for line in proc.stderr.splitlines() if "NonFiniteLossError: training loss became non-finite" in line]
    assert len(messages) == 2, proc.stderr[-3000:]  # both ranks stop, not only the one that saw the NaN
    assert all("global step 5" in m and "['click']" in m for m in messages)
    assert _last_step(run) == 3
    torch.load(os.path.join(run, "ckpt", "last.ckpt"), weights_only=True)  # loadable


@pytest.mark.parametrize("dead_rank", [1, 0])
def test_a_dead_rank_fails_the_run_fast(cache, tmp_path, dead_rank):
    run = str(tmp_path / f"die{dead_rank}")
    start = time.monotonic()
    proc = run_worker("faults_worker.py", "ddp", cache, run, "die", "--die-rank", str(dead_rank), "--die-at-step", "4",
                      expect_ok=False, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 180, f"took {elapsed:.0f} s to fail"
    assert not proc.leftover, f"ranks {proc.leftover} outlived the run"
    if dead_rank == 1:
        # The survivor names itself and the likely cause instead of only a deep collective traceback.
        assert "lattice: stopping (rank 0 of 2" in proc.stderr and "another rank died" in proc.stderr, proc.stderr[-3000:]
    assert not glob.glob(os.path.join(run, "die-rank*.pt"))
