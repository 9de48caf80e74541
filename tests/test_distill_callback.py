"""The online teacher: checkpoint loading, per-batch teacher outputs, every-k steps, and a 2-process CPU
DDP run (gloo)."""
import json
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from _distill import TinyNetwork, batches, make_batch, planted_rows, tiny_schema
from lattice.distill import DistillationCallback, DistillationModule, load_teacher_network
from lattice.train.module import LatticeModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")

TEACHER_SPEC = {"class_path": "_distill.TinyNetwork", "init_args": {"dim": 8, "hidden": 24}}


def _trainer(**kw):
    return pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A teacher LatticeModule trained briefly and checkpointed, with a LightningCLI-style config.yaml."""
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("teacher")
    module = LatticeModule(TinyNetwork(tiny_schema(), dim=8, hidden=24))
    trainer = _trainer(max_epochs=1)
    trainer.fit(module, DataLoader(batches(planted_rows(128, seed=7), 32), batch_size=None))
    os.makedirs(directory / "checkpoints")
    path = str(directory / "checkpoints" / "last.ckpt")
    trainer.save_checkpoint(path)
    with open(directory / "config.yaml", "w") as f:
        yaml.safe_dump({"model": {"class_path": "lattice.train.module.LatticeModule", "init_args": {"network": TEACHER_SPEC}}}, f)
    return path, module


def test_load_teacher_network_from_spec_and_from_config(teacher_ckpt):
    path, module = teacher_ckpt
    batch = make_batch(planted_rows(8, seed=9))
    module.eval()
    with torch.no_grad():
        want = module.network(batch).logits
    for kwargs in (dict(network=TEACHER_SPEC), dict(), dict(config=os.path.join(os.path.dirname(os.path.dirname(path)), "config.yaml"))):
        teacher = load_teacher_network(path, tiny_schema(), **kwargs).eval()
        with torch.no_grad():
            assert torch.equal(teacher(batch).logits, want)


def test_load_teacher_errors(teacher_ckpt, tmp_path):
    path, _ = teacher_ckpt
    with pytest.raises(FileNotFoundError):
        load_teacher_network(str(tmp_path / "nope.ckpt"), tiny_schema())
    wrong = {"class_path": "_distill.TinyNetwork", "init_args": {"dim": 4}}
    with pytest.raises(ValueError, match="does not match"):
        load_teacher_network(path, tiny_schema(), network=wrong)
    lone = tmp_path / "lone.ckpt"
    torch.save(torch.load(path, weights_only=False), lone)
    with pytest.raises(ValueError, match="architecture"):
        load_teacher_network(str(lone), tiny_schema())
    with pytest.raises(ValueError, match="teacher_ckpt"):
        DistillationCallback()
    with pytest.raises(ValueError, match="every_k_steps"):
        DistillationCallback(teacher_ckpt=path, every_k_steps=0)


class _Seen(pl.Callback):
    def __init__(self):
        self.teacher = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.teacher.append(None if batch.teacher_logits is None else batch.teacher_logits.clone())


def test_callback_feeds_the_frozen_teachers_outputs_every_k_steps(teacher_ckpt):
    path, module = teacher_ckpt
    torch.manual_seed(0)
    train = batches(planted_rows(96, seed=11), 16)  # 6 batches
    callback = DistillationCallback(teacher_ckpt=path, teacher_network=TEACHER_SPEC, every_k_steps=2)
    seen = _Seen()
    student = DistillationModule(TinyNetwork(tiny_schema(), dim=4, hidden=8), distillation="aux_head")
    trainer = _trainer(max_epochs=1, callbacks=[callback, seen])
    before = {k: v.clone() for k, v in callback_teacher_state(callback, path).items()}
    trainer.fit(student, DataLoader(train, batch_size=None))
    assert [t is not None for t in seen.teacher] == [True, False] * 3
    assert callback.teacher_calls == 3 and callback.batches_seen == 6
    module.eval()
    with torch.no_grad():
        assert torch.equal(seen.teacher[0], module.network(train[0]).logits)
    # frozen: no gradients, eval mode, weights unchanged, not part of the student
    assert not callback.teacher.training
    assert all(not p.requires_grad for p in callback.teacher.parameters())
    for k, v in callback.teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(k.startswith("teacher") for k in student.state_dict())
    assert callback.state_dict() == {"batches_seen": 6}


def callback_teacher_state(callback, path):
    return load_teacher_network(path, tiny_schema(), TEACHER_SPEC).state_dict()


def test_callback_rejects_a_teacher_with_other_tasks(teacher_ckpt):
    path, _ = teacher_ckpt
    callback = DistillationCallback(teacher_ckpt=path, teacher_network=TEACHER_SPEC)
    student = DistillationModule(TinyNetwork(tiny_schema(regression=True)), distillation="aux_head")
    # the teacher spec is built with the student's 3-task schema: its 2-task checkpoint does not fit
    with pytest.raises(ValueError, match="does not match"):
        callback.setup(_trainer(max_epochs=1), student, "fit")
    callback = DistillationCallback(teacher=LatticeModule(TinyNetwork(tiny_schema())))
    with pytest.raises(ValueError, match="tasks"):
        callback.setup(_trainer(max_epochs=1), student, "fit")


@pytest.mark.slow
def test_online_teacher_under_two_process_cpu_ddp(teacher_ckpt, tmp_path):
    path, _ = teacher_ckpt
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_ddp_worker.py")
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, worker, path, str(tmp_path)], env=env, cwd=str(tmp_path), capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    ids = [set(r["example_ids"]) for r in results]
    assert ids[0] and ids[1] and not ids[0] & ids[1]  # each rank scored its own rows
    assert ids[0] | ids[1] == set(range(128))
    for r in results:
        assert r["batches_with_teacher"] == r["teacher_calls"] == 4  # 8 batches / 2 ranks, every step
        assert r["max_diff"] == 0.0  # exactly this rank's frozen teacher on this rank's batch
        assert r["distill_losses"] and all(v > 0 for v in r["distill_losses"])
        assert not r["teacher_in_student"]
        assert r["adapter_clock"] == 127 * 100  # the newest event over both ranks, not just this rank's
    # after every step, both ranks' adapter clocks are the newest event either rank has trained on so far
    newest = [max(a, b) for a, b in zip(results[0]["step_newest"], results[1]["step_newest"])]
    want = [max(newest[: i + 1]) for i in range(len(newest))]
    assert results[0]["clocks"] == results[1]["clocks"] == want
    # DDP kept the students identical
    assert results[0]["param_sum"] == pytest.approx(results[1]["param_sum"], rel=1e-6, abs=1e-6)
    assert results[0]["param_abs_sum"] == pytest.approx(results[1]["param_abs_sum"], rel=1e-6)
