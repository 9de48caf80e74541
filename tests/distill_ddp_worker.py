"""Worker for test_distill_callback's 2-process CPU DDP run (gloo): trains a student with the online
teacher callback and writes what each rank saw to ``<out>/rank<R>.json``.

Usage: python tests/distill_ddp_worker.py TEACHER_CKPT OUT_DIR
(Lightning's DDP launcher re-runs this same command for rank 1.)
"""
import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _distill import TinyNetwork, batches, planted_rows, tiny_schema  # noqa: E402

from lattice.distill import DistillationCallback, DistillationModule  # noqa: E402


class Recorder(pl.Callback):
    """Checks, on every batch, that the teacher outputs in the batch are this rank's own teacher's."""

    def __init__(self, teacher_cb: DistillationCallback):
        self.teacher_cb = teacher_cb
        self.example_ids: list[int] = []
        self.max_diff = 0.0
        self.batches_with_teacher = 0
        self.distill_losses: list[float] = []
        self.step_newest: list[int] = []  # per step: the newest event time in this rank's batch
        self.clocks: list[int] = []  # per step: the adapter's clock after it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.example_ids += batch.example_id.tolist()
        self.step_newest.append(int(batch.timestamp.max()))
        self.clocks.append(int(pl_module.adapter_clock))
        if batch.teacher_logits is not None:
            self.batches_with_teacher += 1
            with torch.no_grad():
                want = self.teacher_cb.teacher(batch).logits
            self.max_diff = max(self.max_diff, float((batch.teacher_logits - want).abs().max()))
            assert bool(batch.teacher_mask.all())
        value = trainer.callback_metrics.get("train/distill/loss")
        if value is not None:
            self.distill_losses.append(float(value))


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    schema = tiny_schema()
    rows = planted_rows(128, seed=4)
    rows["timestamp"] = rows["example_id"] * 100  # event times; the adapter's clock is the newest over all ranks
    train = batches(rows, 16)
    teacher_cb = DistillationCallback(
        teacher_ckpt=ckpt,
        teacher_network={"class_path": "_distill.TinyNetwork", "init_args": {"dim": 8, "hidden": 24}},
        every_k_steps=1,
    )
    recorder = Recorder(teacher_cb)
    student = DistillationModule(TinyNetwork(schema, dim=4, hidden=8), distillation="aux_head", adapter=True,
                                 adapter_half_life=1000.0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[teacher_cb, recorder],
    )
    trainer.fit(student, DataLoader(train, batch_size=None))
    rank = trainer.global_rank
    params = torch.cat([p.detach().flatten() for p in student.parameters()])
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "example_ids": recorder.example_ids,
        "batches_with_teacher": recorder.batches_with_teacher,
        "teacher_calls": teacher_cb.teacher_calls,
        "max_diff": recorder.max_diff,
        "distill_losses": recorder.distill_losses,
        "adapter_clock": int(student.adapter_clock),
        "step_newest": recorder.step_newest,
        "clocks": recorder.clocks,
        "param_sum": float(params.double().sum()),
        "param_abs_sum": float(params.double().abs().sum()),
        "teacher_in_student": any(n.startswith("teacher") for n, _ in student.named_parameters()),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
