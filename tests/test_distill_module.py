"""DistillationModule under a Lightning Trainer: every mode trains, logs its losses, and only the serving
head predicts."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from helpers_distill import TinyNetwork, batches, make_batch, planted_rows, tiny_schema
from lattice.distill import DistillationModule, TeacherEmbeddingCache

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def _with_teacher(batch_list, rows, offset, every=1, embedding_dim=None):
    """Attach teacher logits (true logits + offset) to every ``every``-th batch."""
    out, start = [], 0
    for i, b in enumerate(batch_list):
        n = b.batch_size
        if i % every == 0:
            b.teacher_logits = rows["true_logits"][start:start + n] + offset
            b.teacher_mask = torch.ones(n, dtype=torch.bool)
            b.teacher_mask[0] = False  # one row the teacher never scored
            if embedding_dim:
                b.teacher_embedding = torch.randn(n, embedding_dim)
        out.append(b)
        start += n
    return out


def _trainer(**kw):
    return pl.Trainer(
        max_epochs=kw.pop("max_epochs", 2), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(distillation="none"),
        dict(distillation="soft_label", temperature=2.0),
        dict(distillation="aux_head", grad_scale=0.5, label_scale=0.9),
        dict(distillation="aux_head", adapter=True, distill_labeled_only=True),
        dict(distillation="aux_head", teacher_embedding_dim=6, cache="ttl"),
    ],
    ids=["labels-only", "soft-label", "aux-head", "aux-adapter", "aux-ktap-cache"],
)
def test_every_mode_fits_and_logs(kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    emb_dim = kwargs.get("teacher_embedding_dim")
    if kwargs.pop("cache", None):
        kwargs["cache"] = TeacherEmbeddingCache(emb_dim, ttl=3)
    rows = planted_rows(256, seed=2, users=20)
    train = _with_teacher(batches(rows, 32), rows, offset=0.2, every=2, embedding_dim=emb_dim)
    val = batches(planted_rows(64, seed=5), 32)
    net = TinyNetwork(tiny_schema(), extra_tokens=1 if emb_dim else 0)
    module = DistillationModule(net, **kwargs)
    trainer = _trainer()
    trainer.fit(module, DataLoader(train, batch_size=None), DataLoader(val, batch_size=None))
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert "val/click/auc" in logged
    if kwargs["distillation"] != "none":
        assert "train/distill/loss" in logged and "train/distill/click/loss" in logged
        assert 0.0 <= float(logged["train/distill/coverage"]) <= 1.0
    else:
        assert "train/distill/loss" not in logged
    if kwargs.get("adapter"):
        assert "train/adapter/loss" in logged
    if emb_dim:
        assert "train/ktap/hit_rate" in logged and "train/ktap/cache_hit_rate" in logged
        assert kwargs["cache"].lookups > 0
    preds = trainer.predict(module, DataLoader(val, batch_size=None))
    module.eval()
    with torch.no_grad():
        served = module.network(val[0]) if not emb_dim else None
    if served is not None:
        assert torch.allclose(preds[0]["logits"], served.logits)
    assert preds[0]["logits"].shape == (32, 2)


def test_task_absent_from_a_domain_is_not_distilled():
    schema = tiny_schema(domain_tasks={1: ["click"]})  # domain 1 has no "conv" task
    module = DistillationModule(TinyNetwork(schema), distillation="aux_head")
    rows = planted_rows(8)
    batch = make_batch(rows)
    batch.domain = torch.tensor([1] * 8)
    batch.teacher_logits = torch.randn(8, 2)
    batch.teacher_mask = torch.ones(8, dtype=torch.bool)
    module.train()
    losses = module.distillation_losses(module(batch), batch)
    assert losses["distill_per_task"][1].item() == 0.0 and losses["distill_per_task"][0].item() > 0
    batch.teacher_logits = None  # no teacher at all: zero loss, still connected for DDP
    losses = module.distillation_losses(module(batch), batch)
    assert losses["distill"].item() == 0.0 and losses["distill"].requires_grad
    assert losses["coverage"].item() == 0.0


def test_hyperparameters_and_argument_errors():
    cache = TeacherEmbeddingCache(4)
    module = DistillationModule(TinyNetwork(tiny_schema(), extra_tokens=1), teacher_embedding_dim=4, cache=cache,
                                distill_weight=0.3)
    assert "cache" not in module.hparams and "network" not in module.hparams
    assert module.hparams["distill_weight"] == 0.3
    net = TinyNetwork(tiny_schema())
    with pytest.raises(ValueError, match="distillation"):
        DistillationModule(net, distillation="kd")
    with pytest.raises(ValueError, match="grad_scale"):
        DistillationModule(net, grad_scale=-0.1)
    with pytest.raises(ValueError, match="distill_task_weights"):
        DistillationModule(net, distill_task_weights={"nope": 1.0})
    with pytest.raises(ValueError, match="cache dim"):
        DistillationModule(net, teacher_embedding_dim=3, cache=cache)


@pytest.mark.parametrize("ktap", [False, True])
def test_serving_model_is_the_serving_head_only(ktap):
    torch.manual_seed(0)
    net = TinyNetwork(tiny_schema(), extra_tokens=1 if ktap else 0)
    module = DistillationModule(net, distillation="aux_head", adapter=True, teacher_embedding_dim=5 if ktap else None)
    serving = module.serving_model()
    names = {n for n, _ in serving.named_parameters()}
    assert not any(n.startswith(("aux_head", "adapter")) for n in names)
    assert {id(p) for p in serving.parameters()} <= {id(p) for p in module.parameters()}  # shared, not copied
    rows = planted_rows(6)
    batch = make_batch(rows)
    if ktap:
        batch.teacher_embedding = torch.randn(6, 5)
        batch.teacher_mask = torch.tensor([True, True, False, True, False, True])
    module.eval()
    with torch.no_grad():
        assert torch.allclose(serving(batch), module.predict_step(batch, 0)["logits"])
