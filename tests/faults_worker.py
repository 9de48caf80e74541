"""Worker for tests/test_train_faults.py: a short fit of a tiny planted LatticeNetwork through the real
Parquet reader (shuffled) with periodic step checkpoints, which the test kills, resumes, corrupts or poisons.

Usage: python tests/faults_worker.py {single,ddp,fsdp} CACHE_DIR RUN_DIR TAG [options]

  --kill-at-step S     SIGKILL the whole process group after step S (a preempted job)
  --kill-in-save S     SIGKILL the whole process group halfway through writing the first checkpoint
                       after step S (a crash while saving)
  --die-rank R --die-at-step S
                       SIGKILL only rank R after step S (a rank that dies)
  --nan-at-step S      make the ``click`` labels NaN in step S's batch of the last rank
  --resume             fit from the checkpoint ``ckpt_path="last"`` resolves to (lattice.train.resume)

Run it in its own session (the test does): the kills take the whole process group down. At the end of a
fit it writes ``RUN_DIR/<TAG>-rank<R>.pt`` with the full state dict, the optimizer state (rank 0) and the
final validation metrics.
"""
from __future__ import annotations

import argparse
import os
import signal
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lattice.data import LatticeDataModule, SyntheticConfig, SyntheticDomain
from lattice.models import LatticeNetwork
from lattice.train.checkpoint import AtomicCheckpointIO
from lattice.train.module import LatticeModule
from lattice.train.resume import resolve_ckpt_path
from lattice.train.strategies import FSDP2Strategy

EVERY_N_STEPS = 3
MAX_EPOCHS = 2


def datamodule(cache: str) -> LatticeDataModule:
    world = SyntheticConfig(
        num_users=200, num_items=120, row_group_size=128,
        domains=[SyntheticDomain("feed", 900), SyntheticDomain("shop", 400, absent_features=["price"])],
    )
    return LatticeDataModule(synthetic=world, cache_dir=cache, split="hash", batch_size=64, shuffle=True,
                             shuffle_buffer=256, seed=3)


def kill_everything() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


class Faults(pl.Callback):
    def __init__(self, args):
        self.args = args
        self.armed_save = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (self.args.nan_at_step is not None and trainer.global_step == self.args.nan_at_step
                and trainer.global_rank == trainer.world_size - 1):  # one rank only: every rank must stop
            click = pl_module.task_names.index("click")
            batch.labels[:, click] = float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.args.kill_at_step is not None and step == self.args.kill_at_step and trainer.global_rank == 0:
            kill_everything()
        if self.args.die_at_step is not None and step == self.args.die_at_step and trainer.global_rank == self.args.die_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.args.kill_in_save is not None and step >= self.args.kill_in_save:
            self.armed_save = True


def install_save_crash(faults: Faults) -> None:
    """torch.save writes half the checkpoint's bytes, then the process group dies, once ``faults`` is armed."""
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        if not faults.armed_save:
            return real_save(obj, f, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        else:
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
        kill_everything()

    torch.save = crashing_save


def full_tensors(state):
    if isinstance(state, dict):
        return {k: full_tensors(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full_tensors(v) for v in state)
    if hasattr(state, "full_tensor"):
        return state.full_tensor().detach().clone()
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["single", "ddp", "fsdp"])
    p.add_argument("cache")
    p.add_argument("run_dir")
    p.add_argument("tag")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-in-save", type=int)
    p.add_argument("--die-rank", type=int, default=1)
    p.add_argument("--die-at-step", type=int)
    p.add_argument("--nan-at-step", type=int)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    faults = Faults(args)
    if args.kill_in_save is not None:
        install_save_crash(faults)
    pl.seed_everything(0, verbose=False)
    dm = datamodule(args.cache)
    network = LatticeNetwork(dm.schema, dim=8, num_layers=1, num_heads=2)
    module = LatticeModule(network, sparse_optimizer="rowwise_adagrad", sparse_lr=0.1, group_auc=False)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(args.run_dir, "ckpt"), every_n_train_steps=EVERY_N_STEPS,
                                  save_last=True, save_top_k=-1)
    strategy = {"single": "auto", "ddp": "ddp", "fsdp": FSDP2Strategy()}[args.mode]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1 if args.mode == "single" else 2, strategy=strategy, max_epochs=MAX_EPOCHS,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        use_distributed_sampler=False, callbacks=[faults, checkpoints], plugins=[AtomicCheckpointIO()],
        default_root_dir=args.run_dir,
    )
    final = FinalState()
    trainer.callbacks.insert(0, final)
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(trainer, "last") if args.resume else None)
    result = {**final.result, "val": dict(module.eval_results.get("val", {})), "steps": trainer.global_step}
    torch.save(result, os.path.join(args.run_dir, f"{args.tag}-rank{trainer.global_rank}.pt"))


class FinalState(pl.Callback):
    """The full model and optimizer state at the end of training (before the strategy tears down)."""

    def on_train_end(self, trainer, pl_module):
        self.result = {
            "state": full_tensors(pl_module.state_dict()),
            "optimizer": full_tensors(trainer.strategy.optimizer_state(trainer.optimizers[0])),
        }


if __name__ == "__main__":
    main()
