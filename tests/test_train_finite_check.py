"""The deferred non-finite loss check: steps are recorded on the device and read every N steps, before
validation, at epoch end and before a checkpoint is written; the error names the first bad step, and a NaN
never reaches a checkpoint file."""
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from _models import make_schema, planted_batches
from lattice.models import DLRM
from lattice.train import LatticeModule, NonFiniteLossError
from lattice.train.finite_check import FiniteLossWatch, StepPlace

pytestmark = pytest.mark.usefixtures("single_thread")

NAN = float("nan")


def _record(watch, step, loss=0.5, click=0.3, conversion=0.2):
    watch.record(torch.tensor(loss), {"click": torch.tensor(click), "conversion": torch.tensor(conversion)},
                 StepPlace(global_step=step, epoch=1, batch_idx=step - 10))


def test_a_nan_is_reported_at_the_next_check_naming_its_step_and_part():
    watch = FiniteLossWatch(every=4)
    _record(watch, 10)
    _record(watch, 11, loss=NAN, conversion=NAN)
    _record(watch, 12, loss=NAN, click=NAN, conversion=NAN)  # what follows a bad step: everything
    assert watch.pending == 3  # nothing read yet
    with pytest.raises(NonFiniteLossError) as info:
        _record(watch, 13, loss=NAN)
    message = str(info.value)
    assert "at global step 11 (epoch 1, batch 1); non-finite parts: ['conversion']" in message
    assert "checked 2 step(s) later (every 4 steps" in message
    with pytest.raises(NonFiniteLossError, match="at global step 11"):  # the weights are spoiled: again
        watch.check()


def test_every_step_checks_before_the_bad_steps_backward():
    watch = FiniteLossWatch(every=1)
    _record(watch, 10)
    with pytest.raises(NonFiniteLossError) as info:
        _record(watch, 11, loss=float("inf"))
    assert "at global step 11" in str(info.value) and "(inf on this rank)" in str(info.value)
    assert "overflowed" in str(info.value) and "later" not in str(info.value)
    watch.check()  # raised before its backward: nothing spoiled, nothing pending
    _record(watch, 12)


def test_a_check_on_demand_reads_the_pending_steps():
    watch = FiniteLossWatch(every=50)
    watch.check()  # nothing recorded: no error
    _record(watch, 10)
    watch.check()
    assert watch.pending == 0
    _record(watch, 11, click=NAN)
    with pytest.raises(NonFiniteLossError, match=r"global step 11 .*\['click'\]"):
        watch.check()


@pytest.mark.parametrize("every", [0, -3, 2.0, True])
def test_the_interval_is_validated(every):
    with pytest.raises(ValueError, match="finite_check_every_n_steps must be an integer >= 1"):
        LatticeModule(DLRM(make_schema(num_domains=1, rows=20, zipper=False), dim=4),
                      finite_check_every_n_steps=every)


class _Poison(pl.Callback):
    """Makes the click labels of the step with global step ``at`` NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            batch.labels[:, pl_module.task_names.index("click")] = NAN


def _count_reads(monkeypatch, watch) -> list:
    """The watch's reads of the device (checks with steps pending), as the number of steps each read."""
    reads = []
    real = watch.check

    def counting(*args, **kwargs):
        if watch.pending:
            reads.append(watch.pending)
        return real(*args, **kwargs)

    monkeypatch.setattr(watch, "check", counting)
    return reads


def _loader(batches):
    return DataLoader(batches, batch_size=None, shuffle=False)


def _fit(tmp_path, monkeypatch, every, poison_at=None, num_batches=12, save_every=3, **trainer_args):
    torch.manual_seed(0)
    schema = make_schema(num_domains=2, rows=30, num_sequences=0, zipper=False)
    batches = planted_batches(schema, num_batches=num_batches, batch_size=16)
    module = LatticeModule(DLRM(schema, dim=4), sparse_lr=0.05, group_auc=False, finite_check_every_n_steps=every)
    reads = _count_reads(monkeypatch, module.finite_watch)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=save_every, save_top_k=-1,
                                  filename="{step}")
    callbacks = [checkpoints] + ([] if poison_at is None else [_Poison(poison_at)])
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
                         default_root_dir=str(tmp_path), **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=_loader(batches), val_dataloaders=_loader(batches[:2]))
    return reads


def _saved_steps(tmp_path):
    return sorted(int(name[len("step="):-len(".ckpt")]) for name in os.listdir(tmp_path / "ckpt"))


def test_a_clean_fit_reads_the_loss_every_n_steps_and_before_saves(tmp_path, monkeypatch):
    # 12 steps, read every 4 and before the saves after steps 6 and 12; nothing is left for the validation
    reads = _fit(tmp_path, monkeypatch, every=4, save_every=6)
    assert reads == [4, 2, 4, 2], reads
    assert _saved_steps(tmp_path) == [6, 12]


def test_the_default_interval_is_the_trainers_log_interval(tmp_path, monkeypatch):
    reads = _fit(tmp_path, monkeypatch, every=None, log_every_n_steps=2, num_batches=6)
    assert reads == [2, 1, 2, 1], reads  # every 2, and before the saves at steps 3 and 6


def test_a_deferred_nan_stops_the_fit_before_the_next_checkpoint(tmp_path, monkeypatch):
    # the NaN comes at step 4 (global step 4, the fifth batch); the check runs every 50 steps, so the one
    # that finds it is the save after the sixth step, which then is not written
    with pytest.raises(NonFiniteLossError) as info:
        _fit(tmp_path, monkeypatch, every=50, poison_at=4)
    message = str(info.value)
    assert "at global step 4 (epoch 0, batch 4); non-finite parts: ['click']" in message
    assert "checked 1 step(s) later" in message
    assert _saved_steps(tmp_path) == [3]
    assert all(torch.isfinite(v).all() for v in torch.load(tmp_path / "ckpt" / "step=3.ckpt",
                                                           weights_only=True)["state_dict"].values()
               if v.is_floating_point())
