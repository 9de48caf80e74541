"""Fault injection through the real ``lattice fit`` (subprocesses on a tiny planted world): SIGKILL at three
seeded random steps, one of them halfway through writing ``last.ckpt``, each followed by ``--ckpt_path last``;
the resumed run must end with the uninterrupted run's dense weights, fused embedding tables, fused and dense
optimizer state, bit for bit."""
from __future__ import annotations

import glob
import os
import random
import subprocess

import pytest
import torch

from _fault_runs import EVERY_N_STEPS, ROOT, SIGKILLED, checked, lattice, lattice_config, step_of, write_config
from _workers import assert_same_tree, flatten

pytestmark = pytest.mark.slow
SEED = 25
DDP_CONFIG = os.path.join(ROOT, "configs", "ddp.yaml")


def kill_steps(total_steps: int, seed: int = SEED) -> list[int]:
    """Three seeded random steps, one in each third of the run, each past the previous kill's checkpoint."""
    rng = random.Random(seed)
    third = total_steps // 3
    return [rng.randrange(max(2, i * third), (i + 1) * third - 1) for i in range(3)]


def run_fit(config: list[str], env: dict) -> subprocess.CompletedProcess:
    return lattice("fit", *config, env=env, timeout=300)


def kill_and_resume(base, ddp: bool):
    """The uninterrupted run's and the killed-and-resumed run's final states (``LATTICE_TEST_FINAL_STATE``)."""
    cache = base / "cache"
    runs = {}
    for name in ("full", "killed"):
        run = base / name
        # Under DDP each of the 2 ranks reads half the global batch of 64, so both modes take the same steps.
        config = lattice_config(run, cache)
        if ddp:
            config["data"]["batch_size"] = 32
        runs[name] = (run, ["--config", write_config(run, config)] + (["--config", DDP_CONFIG] if ddp else []))

    run, config = runs["full"]
    checked(run_fit(config, {"LATTICE_TEST_FINAL_STATE": str(run / "final.pt")}))
    want = torch.load(run / "final.pt", weights_only=False)
    total = want["steps"]
    first, in_save, last = kill_steps(total)
    assert total >= 18 and first < in_save < last < total

    run, config = runs["killed"]
    ckpt = run / "ckpt"
    resume = [*config, "--ckpt_path", "last"]
    # 1. Preempted after step `first`; last.ckpt is the newest multiple of EVERY_N_STEPS before it.
    checked(run_fit(config, {"LATTICE_TEST_KILL_AT_STEP": str(first)}), *SIGKILLED)
    assert step_of(ckpt / "last.ckpt") == first // EVERY_N_STEPS * EVERY_N_STEPS

    # 2. Resumed, then killed halfway through writing the first last.ckpt after step `in_save`.
    checked(run_fit(resume, {"LATTICE_TEST_KILL_IN_SAVE": str(in_save)}), *SIGKILLED)
    partial = glob.glob(str(ckpt / ".last.ckpt.*.tmp"))
    assert len(partial) == 1 and os.path.getsize(partial[0]) > 0, os.listdir(ckpt)
    saving = -(-in_save // EVERY_N_STEPS) * EVERY_N_STEPS  # the save that was cut short
    assert step_of(ckpt / "last.ckpt") == saving - EVERY_N_STEPS, "last.ckpt must still hold the previous save"
    [completed] = glob.glob(str(ckpt / f"epoch=*-step={saving}.ckpt"))  # written just before last.ckpt
    assert step_of(completed) == saving

    # 3. Resumed, preempted again after step `last`.
    checked(run_fit(resume, {"LATTICE_TEST_KILL_AT_STEP": str(last)}), *SIGKILLED)
    assert not glob.glob(str(ckpt / ".last.ckpt.*.tmp")), "the next save of last.ckpt removes the partial file"

    # 4. Resumed to the end.
    checked(run_fit(resume, {"LATTICE_TEST_FINAL_STATE": str(run / "final.pt")}))
    got = torch.load(run / "final.pt", weights_only=False)
    assert got["steps"] == total and got["start_step"] == last // EVERY_N_STEPS * EVERY_N_STEPS
    names = list(want["state"])
    assert any(".optimizer_state." in n for n in names), "the fused Adagrad state is part of the comparison"
    assert any("tables" in n and "optimizer_state" not in n for n in names), "the fused tables too"
    return want, got


def max_abs_diff(want: dict, got: dict) -> float:
    other = dict(flatten(got))
    pairs = [(x, other[k]) for k, x in flatten(want) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return max(float((x.double() - y.double()).abs().max()) for x, y in pairs if x.numel())


def test_sigkill_at_three_seeded_steps_then_resume_equals_the_uninterrupted_run(tmp_path):
    want, got = kill_and_resume(tmp_path, ddp=False)
    assert_same_tree(want["state"], got["state"], what="model state ")  # bit for bit
    assert_same_tree(want["optimizer"], got["optimizer"], what="dense optimizer state ")
    assert_same_tree(want["val"], got["val"], what="validation metrics ")


def test_sigkill_under_ddp_then_resume_equals_the_uninterrupted_run(tmp_path):
    want, got = kill_and_resume(tmp_path, ddp=True)
    print(f"DDP max |diff| state {max_abs_diff(want['state'], got['state']):.3g}, "
          f"optimizer {max_abs_diff(want['optimizer'], got['optimizer']):.3g}")
    # float32 rounding: the 2-process all-reduce may sum in another order after a restart
    assert_same_tree(want["state"], got["state"], atol=1e-6, what="DDP model state ")
    assert_same_tree(want["optimizer"], got["optimizer"], atol=1e-6, what="DDP dense optimizer state ")
    assert_same_tree(want["val"], got["val"], atol=1e-6, what="DDP validation metrics ")
