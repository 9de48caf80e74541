"""Worker for tests/test_train_parallel.py: one epoch of a tiny planted LatticeNetwork, single-process or
2-process (DDP / FSDP2 on CPU over gloo), then a validation through the real Parquet reader.

Usage: python tests/parallel_worker.py {single,ddp,fsdp} CACHE_DIR OUT_DIR
(Lightning's launcher re-runs this same command for rank 1.)

Training sees the same *global* batches in every mode: single-process reads batches of ``2 * PER_RANK``
rows; rank r of 2 trains on rows ``[r * PER_RANK, (r + 1) * PER_RANK)`` of each. Writes
``<out>/rank<R>.pt``: the full final state dict, the validation metrics (synced) and what this rank
validated (example ids, logits, labels), for the test to compare.
"""
from __future__ import annotations

import os
import sys
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lattice.data import LatticeDataModule, SyntheticConfig, SyntheticDomain
from lattice.models import LatticeNetwork
from lattice.train.module import LatticeModule
from lattice.train.strategies import FSDP2Strategy

PER_RANK = 64
WORLD = 2


def datamodule(cache: str, batch_size: int) -> LatticeDataModule:
    world = SyntheticConfig(
        num_users=200, num_items=120, row_group_size=128,
        domains=[SyntheticDomain("feed", 900), SyntheticDomain("shop", 400, absent_features=["price"])],
    )
    return LatticeDataModule(synthetic=world, cache_dir=cache, split="hash", batch_size=batch_size,
                             shuffle=False)


def global_batches(cache: str) -> list:
    """The training batches of ``WORLD * PER_RANK`` rows, read before any process group exists."""
    dm = datamodule(cache, WORLD * PER_RANK)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        if batch.batch_size == WORLD * PER_RANK:  # full global batches only, so ranks split evenly
            out.append(batch.select_rows(torch.arange(batch.batch_size)))  # own copy of the rows
    return out, dm.schema


class ValidationRecorder(pl.Callback):
    def __init__(self):
        self.ids, self.logits, self.labels, self.masks = [], [], [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with torch.no_grad():
            logits = pl_module(batch).logits.float()
        self.ids.append(batch.example_id.clone())
        self.logits.append(logits)
        self.labels.append(batch.labels.clone())
        self.masks.append(batch.label_mask.clone())


def full_state(module: torch.nn.Module) -> dict:
    out = {}
    for name, value in module.state_dict().items():
        if hasattr(value, "full_tensor"):  # an FSDP2-sharded DTensor
            value = value.full_tensor()
        out[name] = value.detach().clone()
    return out


def main() -> None:
    mode, cache, out = sys.argv[1], sys.argv[2], sys.argv[3]
    warnings.filterwarnings("ignore")
    batches, schema = global_batches(cache)
    pl.seed_everything(0, verbose=False)
    network = LatticeNetwork(schema, dim=8, num_layers=1, num_heads=2, standardize_dense=True, wide=True, wide_dim=4,
                             task_parents={"like": "click", "conversion": "click"})
    module = LatticeModule(network, sparse_optimizer="rowwise_adagrad", sparse_lr=0.1, group_auc=False)
    devices = 1 if mode == "single" else WORLD
    strategy = {"single": "auto", "ddp": "ddp", "fsdp": FSDP2Strategy()}[mode]
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )

    class RankShare(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            if mode == "single":
                return batches[i]
            rank = trainer.global_rank
            return batches[i].select_rows(torch.arange(rank * PER_RANK, (rank + 1) * PER_RANK))

    trainer.fit(module, train_dataloaders=DataLoader(RankShare(), batch_size=None))
    state = full_state(module)

    recorder = ValidationRecorder()
    trainer.callbacks.append(recorder)
    trainer.validate(module, datamodule=datamodule(cache, 50), verbose=False)
    result = {
        "world_size": trainer.world_size,
        "state": state,
        "val": dict(module.eval_results["val"]),
        "val_ids": torch.cat(recorder.ids),
        "val_logits": torch.cat(recorder.logits),
        "val_labels": torch.cat(recorder.labels),
        "val_masks": torch.cat(recorder.masks),
        "steps": trainer.global_step,
    }
    torch.save(result, os.path.join(out, f"{mode}-rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
