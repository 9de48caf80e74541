import os

import pytest
import torch

from lattice.train.checkpoint import AtomicCheckpointIO, atomic_torch_save


class Boom(Exception):
    pass


def test_crash_while_saving_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.arange(4.0)}, str(path))

    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # some bytes reach the temporary file, then the process "dies"
        raise Boom()

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(Boom):
        io.save_checkpoint({"step": 2, "w": torch.zeros(4)}, str(path))
    monkeypatch.setattr(torch, "save", real_save)

    loaded = io.load_checkpoint(str(path))
    assert loaded["step"] == 1 and torch.equal(loaded["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # the temporary file was cleaned up


def test_atomic_save_overwrites_and_creates_directories(tmp_path):
    path = tmp_path / "a" / "b" / "x.pt"
    atomic_torch_save({"v": 1}, str(path))
    atomic_torch_save({"v": 2}, str(path))
    assert torch.load(str(path))["v"] == 2
