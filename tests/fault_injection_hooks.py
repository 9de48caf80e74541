"""Test-only hooks a ``lattice fit`` subprocess loads from its config (tests/ on PYTHONPATH), driven by
environment variables so that one config serves every run of a kill-and-resume sequence:

  LATTICE_TEST_KILL_AT_STEP=S     SIGKILL the whole process group right after global step S
  LATTICE_TEST_KILL_IN_SAVE=S     SIGKILL the process group halfway through writing the first ``last.ckpt``
                                  after global step S (half its bytes reach the temporary file)
  LATTICE_TEST_FINAL_STATE=PATH   at the end of fit, rank 0 writes the full model state dict (dense
                                  weights, fused tables, fused optimizer state), the dense optimizer state,
                                  the validation metrics, the global step training started from (a resumed
                                  checkpoint's) and the final one to PATH
"""
from __future__ import annotations

import io
import os
import signal

import lightning.pytorch as pl
import torch


def kill_process_group() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _env_int(name: str):
    value = os.environ.get(name)
    return int(value) if value else None


class FaultInjection(pl.Callback):
    def __init__(self) -> None:
        self.kill_at_step = _env_int("LATTICE_TEST_KILL_AT_STEP")
        self.kill_in_save = _env_int("LATTICE_TEST_KILL_IN_SAVE")
        self.final_state = os.environ.get("LATTICE_TEST_FINAL_STATE")
        self.armed = False
        self.result = None
        self.start_step = None

    def setup(self, trainer, pl_module, stage):
        if self.kill_in_save is not None and stage == "fit":
            self._wrap_checkpoint_io(trainer.strategy.checkpoint_io)

    def _wrap_checkpoint_io(self, checkpoint_io) -> None:
        """The real CheckpointIO (lattice's atomic one) writes; torch.save dies halfway through ``last.ckpt``."""
        real_io_save, real_torch_save = checkpoint_io.save_checkpoint, torch.save
        target = {}

        def io_save(checkpoint, path, storage_options=None):
            target["name"] = os.path.basename(os.fspath(path))
            return real_io_save(checkpoint, path, storage_options)

        def dying_save(obj, f, *args, **kwargs):
            if not (self.armed and target.get("name") == "last.ckpt" and hasattr(f, "write")):
                return real_torch_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_torch_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            kill_process_group()

        checkpoint_io.save_checkpoint = io_save
        torch.save = dying_save

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.kill_at_step is not None and step == self.kill_at_step and trainer.global_rank == 0:
            kill_process_group()
        if self.kill_in_save is not None and step >= self.kill_in_save:
            self.armed = True

    def on_train_end(self, trainer, pl_module):
        if self.final_state is not None:
            optimizer = trainer.strategy.optimizer_state(trainer.optimizers[0])
            self.result = {"state": _detached(pl_module.state_dict()), "optimizer": _detached(optimizer),
                           "start_step": self.start_step, "steps": trainer.global_step}

    def teardown(self, trainer, pl_module, stage):
        if self.result is not None and trainer.global_rank == 0:  # after fit's last validation
            self.result["val"] = dict(pl_module.eval_results.get("val", {}))
            torch.save(self.result, self.final_state)


def _detached(tree):
    if isinstance(tree, dict):
        return {k: _detached(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detached(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    return tree
