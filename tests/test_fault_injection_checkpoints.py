"""Damaged checkpoints and a full disk, through the real ``lattice fit`` (subprocesses, tiny planted world):

- a truncated ``last.ckpt`` (and a corrupt step checkpoint): ``--ckpt_path last`` names the bad files, warns,
  and resumes from the newest complete checkpoint;
- no complete checkpoint: it stops with ``lattice: error: checkpoint PATH: ...`` (exit status 2) instead of
  training from scratch;
- the disk fills up while a checkpoint is written (a tmpfs smaller than two checkpoints): the run stops with
  ``lattice: error: PATH: could not write the checkpoint ([Errno 28] No space left on device) ...``, and the
  previous ``last.ckpt`` stays complete.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import pytest
import torch

from lattice.train.checkpoint import verify_checkpoint
from _fault_runs import checked, lattice, lattice_config, step_of, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of a tiny fit with a checkpoint every 3 steps: ``(base folder, its checkpoint folder)``."""
    base = tmp_path_factory.mktemp("fault_ckpt")
    run = base / "first"
    checked(lattice("fit", "--config", write_config(run, lattice_config(run, base / "cache", max_epochs=1))))
    return base, run / "ckpt"


def copy_run(trained, name):
    base, ckpt = trained
    run = base / name
    shutil.copytree(ckpt, run / "ckpt")
    return run, run / "ckpt", write_config(run, lattice_config(run, base / "cache", max_epochs=1))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_tensor_byte(path):
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)  # the largest tensor's bytes
    data[record.header_offset + 200 + record.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def step_files(ckpt):
    return sorted(ckpt.glob("epoch=*-step=*.ckpt"), key=step_of)


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_complete_one(trained):
    run, ckpt, config = copy_run(trained, "fallback")
    steps = step_files(ckpt)
    newest, previous = steps[-1], steps[-2]
    assert step_of(ckpt / "last.ckpt") == step_of(newest)
    truncate(ckpt / "last.ckpt")
    flip_a_tensor_byte(newest)  # loads without complaint through torch.load: only its CRC tells
    final = run / "final.pt"
    proc = checked(lattice("fit", "--config", config, "--ckpt_path", "last",
                           env={"LATTICE_TEST_FINAL_STATE": str(final)}))
    warning = " ".join(line for line in proc.stderr.splitlines() if "lattice: not resuming from" in line)
    assert str(ckpt / "last.ckpt") in warning and str(newest) in warning, proc.stderr[-3000:]
    assert f"resuming from {previous}" in proc.stderr
    got = torch.load(final, weights_only=False)
    assert got["start_step"] == step_of(previous) > 0  # resumed, not trained from scratch
    assert got["steps"] > step_of(newest)
    # The resumed run saved a complete last checkpoint again (last-v1.ckpt here: the restored callback state
    # names the first run's folder, from which these files were copied).
    newest_last = max(ckpt.glob("last*.ckpt"), key=os.path.getmtime)
    verify_checkpoint(str(newest_last))
    assert step_of(newest_last) > step_of(previous)


def test_no_complete_checkpoint_stops_with_an_error_naming_the_file(trained):
    run, ckpt, config = copy_run(trained, "none_valid")
    for path in [ckpt / "last.ckpt", *step_files(ckpt)]:
        truncate(path)
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    final = run / "final.pt"
    proc = lattice("fit", "--config", config, "--ckpt_path", "last", env={"LATTICE_TEST_FINAL_STATE": str(final)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("lattice: error:")]
    assert line.startswith(f"lattice: error: checkpoint {ckpt / 'last.ckpt'}: truncated"), line
    assert "no complete checkpoint to resume from" in line and "Traceback" not in proc.stderr
    assert not final.exists(), "it trained"
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before, "the damaged files were touched"


def _mount_namespace_prefix() -> list[str] | None:
    """``unshare`` arguments that give a private mount namespace in which tmpfs can be mounted, or ``None``."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for flags in (["--mount"], ["--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([unshare, *flags, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [unshare, *flags]
    return None


def test_disk_full_while_saving_keeps_the_previous_checkpoint_and_names_the_path(trained, tmp_path):
    prefix = _mount_namespace_prefix()
    if prefix is None:
        pytest.skip("needs a private mount namespace (unshare --mount) to mount a small tmpfs")
    base, first = trained
    size = (ckpt_bytes := os.path.getsize(first / "last.ckpt")) + ckpt_bytes // 2  # room for 1.5 checkpoints
    run = tmp_path / "full_disk"
    ckpt, kept = run / "ckpt", tmp_path / "kept"
    ckpt.mkdir(parents=True)
    # Only last.ckpt, every 3 steps: the save at step 6 needs a second checkpoint's room for its temporary file.
    config = write_config(run, lattice_config(run, base / "cache", max_epochs=1, save_top_k=0))
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; "$@"; status=$?; '
              f'cp -a "{ckpt}/." "{kept}/"; exit $status')
    kept.mkdir()
    proc = lattice("fit", "--config", config, prefix=(*prefix, "sh", "-c", script, "sh", str(ckpt)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("lattice: error:")]
    assert line.startswith(f"lattice: error: {ckpt / 'last.ckpt'}: could not write the checkpoint"), line
    assert "No space left on device" in line and "left as it was" in line, line
    assert os.listdir(kept) == ["last.ckpt"], "the temporary file was not removed"
    verify_checkpoint(str(kept / "last.ckpt"))
    assert step_of(kept / "last.ckpt") == 3
