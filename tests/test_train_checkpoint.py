"""Checkpoint files: atomic saves, a failed save (a full disk) leaving the previous file intact and named,
telling complete checkpoints from truncated or damaged ones, and which file ``ckpt_path="last"`` resumes."""
import errno
import os
import warnings
import zipfile

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lattice.train.checkpoint import (AtomicCheckpointIO, CheckpointError, CheckpointWriteError, atomic_torch_save,
                                      verify_checkpoint)
from lattice.train.resume import resolve_ckpt_path, resolve_last_checkpoint


class Boom(Exception):
    pass


def _state(step):
    return {"global_step": step, "w": torch.arange(4096.0) + step}


def test_crash_while_saving_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, str(path))

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reach the temporary file, then the save fails
        raise Boom()

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(CheckpointWriteError) as info:
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, str(path))
    assert isinstance(info.value.__cause__, Boom)
    monkeypatch.undo()

    loaded = io.load_checkpoint(str(path))
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the temporary file was cleaned up


@pytest.mark.parametrize("as_torch_reports_it", [False, True])
def test_disk_full_while_saving_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch,
                                                                                  as_torch_reports_it):
    path = tmp_path / "ckpt" / "last.ckpt"
    atomic_torch_save(_state(3), str(path))
    before = path.read_bytes()
    real_save = torch.save

    def filling_save(obj, f, *args, **kwargs):  # the device fills up halfway through the write
        real_save(obj, f, *args, **kwargs)
        f.seek(f.tell() // 2)
        f.truncate()
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            if as_torch_reports_it:  # torch's zip writer raises this while handling the failed write
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            raise

    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(CheckpointWriteError) as info:
        AtomicCheckpointIO().save_checkpoint(_state(6), str(path))
    monkeypatch.undo()
    error = info.value
    assert error.errno == errno.ENOSPC and error.filename == str(path)
    assert str(path) in str(error) and "No space left on device" in str(error) and "left as it was" in str(error)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["last.ckpt"]
    verify_checkpoint(str(path))


def test_a_first_save_that_fails_says_nothing_was_written(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match="no checkpoint was written"):
        atomic_torch_save(_state(1), str(tmp_path / "x.ckpt"))
    assert os.listdir(tmp_path) == []


def test_atomic_save_overwrites_and_creates_directories(tmp_path):
    path = tmp_path / "a" / "b" / "x.pt"
    atomic_torch_save({"v": 1}, str(path))
    atomic_torch_save({"v": 2}, str(path))
    assert torch.load(str(path))["v"] == 2


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "empty":
        data = b""
    elif how == "zeroed":  # the size of a complete file, its blocks never written (power loss)
        data = bytes(len(data))
    elif how == "bit flip":  # inside the tensor's bytes: torch.load would return the wrong value silently
        with zipfile.ZipFile(path) as archive:
            record = next(r for r in archive.infolist() if r.filename.endswith("data/0"))
        data[record.header_offset + 1000] ^= 0x10  # well past the record header
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "empty", "zeroed", "bit flip"])
def test_verify_checkpoint_names_a_damaged_file(tmp_path, how):
    path = tmp_path / "last.ckpt"
    atomic_torch_save(_state(5), str(path))
    verify_checkpoint(str(path))
    _damage(path, how)
    with pytest.raises(CheckpointError, match=str(path)) as info:
        verify_checkpoint(str(path))
    assert info.value.path == str(path)
    if how == "bit flip":
        assert "data/0" in str(info.value)
        torch.load(str(path), weights_only=True)  # why the CRC check is needed: this loads without a complaint


def test_verify_checkpoint_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        verify_checkpoint(str(tmp_path / "missing.ckpt"))
    with zipfile.ZipFile(tmp_path / "other.ckpt", "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="without data.pkl"):
        verify_checkpoint(str(tmp_path / "other.ckpt"))


def test_a_checkpoint_saved_without_crc_still_verifies(tmp_path):
    path = str(tmp_path / "nocrc.ckpt")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(_state(1), path)
    finally:
        torch.serialization.set_crc32_options(True)
    verify_checkpoint(path)


def test_loading_a_damaged_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "step.ckpt"
    atomic_torch_save(_state(2), str(path))
    _damage(path, "truncated")
    with pytest.raises(CheckpointError, match=f"{path}: truncated"):
        AtomicCheckpointIO().load_checkpoint(str(path))


# ---- which checkpoint ckpt_path="last" resumes ----

def _trainer(folder):
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[ModelCheckpoint(dirpath=str(folder), save_last=True, save_top_k=-1)])


def _write(folder, name, step, age):
    """A checkpoint of ``step`` written ``age`` seconds ago."""
    path = folder / name
    atomic_torch_save(_state(step), str(path))
    stamp = 1_700_000_000 - age
    os.utime(path, (stamp, stamp))
    return str(path)


def _resolve(trainer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = resolve_ckpt_path(trainer, "last")
    return path, [str(w.message) for w in caught if "lattice:" in str(w.message)]


def test_last_resolves_to_a_complete_last_checkpoint_silently(tmp_path):
    _write(tmp_path, "epoch=0-step=3.ckpt", 3, age=20)
    _write(tmp_path, "epoch=0-step=6.ckpt", 6, age=10)
    last = _write(tmp_path, "last.ckpt", 6, age=9)
    assert _resolve(_trainer(tmp_path)) == (last, [])


@pytest.mark.parametrize("how", ["truncated", "zeroed", "bit flip"])
def test_a_damaged_last_checkpoint_falls_back_to_the_newest_complete_one(tmp_path, how):
    _write(tmp_path, "epoch=0-step=3.ckpt", 3, age=30)
    newest_complete = _write(tmp_path, "epoch=0-step=6.ckpt", 6, age=20)
    step9 = _write(tmp_path, "epoch=0-step=9.ckpt", 9, age=10)
    last = _write(tmp_path, "last.ckpt", 9, age=9)
    for path in (last, step9):  # a crash while a non-atomic writer wrote both
        _damage(tmp_path / os.path.basename(path), how)
    resolved, messages = _resolve(_trainer(tmp_path))
    assert resolved == newest_complete
    assert len(messages) == 1 and last in messages[0] and step9 in messages[0] and newest_complete in messages[0]
    assert torch.load(resolved, weights_only=True)["global_step"] == 6


def test_no_complete_checkpoint_stops_with_an_error_naming_the_files(tmp_path):
    last = _write(tmp_path, "last.ckpt", 9, age=9)
    step = _write(tmp_path, "epoch=0-step=9.ckpt", 9, age=10)
    _damage(tmp_path / "last.ckpt", "truncated")
    _damage(tmp_path / "epoch=0-step=9.ckpt", "empty")
    with pytest.raises(CheckpointError) as info:
        resolve_last_checkpoint(_trainer(tmp_path))
    message = str(info.value)
    assert message.startswith(f"checkpoint {last}: truncated") and step in message and "no complete checkpoint" in message


def test_last_with_no_checkpoint_at_all_is_a_fresh_start_and_says_so(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert _resolve(_trainer(tmp_path)) == (None, [f"lattice: --ckpt_path last found no checkpoint (looked in "
                                                   f"{tmp_path}); training starts from scratch."])
    assert resolve_last_checkpoint(_trainer(tmp_path / "missing")) is None


def test_last_in_a_new_logger_version_resumes_the_newest_earlier_version(tmp_path):
    """A versioned logger (the shipped configs' CSVLogger) gives the resumed run a new, empty version_N folder; "last"
    is the newest earlier version's last.ckpt, not a silent fresh start."""
    from lightning.pytorch.loggers import CSVLogger

    for version, step in ((0, 3), (1, 6)):
        folder = tmp_path / "runs" / "quick" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        _write(folder, "last.ckpt", step, age=10 - version)
    trainer = pl.Trainer(logger=CSVLogger(str(tmp_path / "runs"), name="quick"), enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ModelCheckpoint(save_last=True)])
    assert trainer.log_dir.endswith("version_2")
    resolved, messages = _resolve(trainer)
    assert resolved == str(tmp_path / "runs" / "quick" / "version_1" / "checkpoints" / "last.ckpt")
    assert len(messages) == 1 and "version_1" in messages[0]


def test_an_explicit_damaged_path_is_an_error_and_other_values_pass_through(tmp_path):
    path = _write(tmp_path, "epoch=0-step=3.ckpt", 3, age=1)
    trainer = _trainer(tmp_path)
    assert resolve_ckpt_path(trainer, path) == path
    _damage(tmp_path / "epoch=0-step=3.ckpt", "truncated")
    with pytest.raises(CheckpointError, match=path):
        resolve_ckpt_path(trainer, path)
    assert resolve_ckpt_path(trainer, None) is None
    assert resolve_ckpt_path(trainer, "best") == "best"
    missing = str(tmp_path / "missing.ckpt")
    assert resolve_ckpt_path(trainer, missing) == missing  # Lightning's FileNotFoundError names it
