"""DistillationModule under a Lightning Trainer: every mode trains, logs its losses, and only the serving
head predicts."""
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from _distill import TinyNetwork, batches, make_batch, planted_rows, tiny_schema
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


def test_adapter_learning_rate_gets_its_own_parameter_group():
    net = TinyNetwork(tiny_schema())
    module = DistillationModule(net, adapter=True, adapter_lr=0.05,
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.001))
    opt = module.configure_optimizers()
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.05]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in module.adapter.parameters()}
    n_all = sum(len(g["params"]) for g in opt.param_groups)
    assert n_all == len([p for p in module.parameters() if p.requires_grad])
    plain = DistillationModule(TinyNetwork(tiny_schema()), adapter=True,
                               optimizer=lambda params: torch.optim.SGD(params, lr=0.001))
    assert len(plain.configure_optimizers().param_groups) == 1
    with pytest.raises(ValueError, match="adapter_lr"):
        DistillationModule(TinyNetwork(tiny_schema()), adapter=True, adapter_lr=0.0)


def _timed_rows(n, seed=0):
    rows = planted_rows(n, seed=seed)
    rows["timestamp"] = torch.randint(0, 30 * 86400, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return rows


def test_adapter_half_life_weights_rows_by_recency_from_the_newest_event():
    rows = _timed_rows(64)
    module = DistillationModule(TinyNetwork(tiny_schema()), adapter=True, adapter_half_life=86400.0)
    batch = make_batch(rows, slice(0, 32))
    w = module.adapter_row_weights(batch)
    newest = int(rows["timestamp"][:32].max())
    assert int(module.adapter_clock) == newest
    age = (newest - rows["timestamp"][:32]).double()
    assert torch.allclose(w.double(), 0.5 ** (age / 86400.0), rtol=1e-6)
    assert w.max().item() == 1.0
    # the clock never goes back: an older batch is weighed from the newest time seen so far
    old = make_batch({k: v[:4] for k, v in rows.items()} | {"timestamp": torch.zeros(4, dtype=torch.long)})
    assert torch.allclose(module.adapter_row_weights(old).double(), torch.full((4,), 0.5 ** (newest / 86400.0)).double())
    assert int(module.adapter_clock) == newest
    # checkpointed with the module (a resumed run counts age from the same clock)
    fresh = DistillationModule(TinyNetwork(tiny_schema()), adapter=True, adapter_half_life=86400.0)
    fresh.load_state_dict(module.state_dict())
    assert int(fresh.adapter_clock) == newest


def test_adapter_half_life_errors_are_clear():
    with pytest.raises(ValueError, match="needs adapter=True"):
        DistillationModule(TinyNetwork(tiny_schema()), adapter=False, adapter_half_life=3600.0)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="adapter_half_life must be"):
            DistillationModule(TinyNetwork(tiny_schema()), adapter=True, adapter_half_life=bad)
    module = DistillationModule(TinyNetwork(tiny_schema()), adapter=True, adapter_half_life=3600.0)
    with pytest.raises(ValueError, match="timestamp_column"):
        module.adapter_row_weights(make_batch(planted_rows(8)))  # no timestamps in the batch


def test_recency_weighted_adapter_learns_todays_calibration():
    """The teacher is right on old rows and 1.5 logits too low on the newest ones (a rate that rose):
    an adapter with a short half-life learns today's correction, a uniform one the window's average."""
    gen = torch.Generator().manual_seed(0)
    n, day = 6000, 86400
    ts = torch.randint(0, 20 * day, (n,), generator=gen)
    shift = 1.5 * (ts >= 18 * day).float()  # the last two days
    rows = _timed_rows(n)
    rows["timestamp"] = ts
    teacher = rows["true_logits"][:, :1].repeat(1, 2)
    rows["labels"] = (torch.rand(n, 2, generator=gen) < torch.sigmoid(teacher + shift[:, None])).float()
    found = {}
    for half_life in (None, 0.5 * day):
        torch.manual_seed(0)
        module = DistillationModule(TinyNetwork(tiny_schema()), distillation="aux_head", adapter=True,
                                    adapter_half_life=half_life)
        opt = torch.optim.Adam(module.adapter.parameters(), lr=0.02)
        module.train()
        for epoch in range(4):
            for i in range(0, n, 500):
                b = make_batch(rows, slice(i, i + 500))
                b.teacher_logits, b.teacher_mask = teacher[i:i + 500], torch.ones(b.batch_size, dtype=torch.bool)
                loss = module.distillation_losses(module(b), b)["adapter"]
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            found[half_life] = (module.adapter(teacher[:500]) - teacher[:500]).mean().item()
    assert found[0.5 * day] > 1.0, found  # close to today's +1.5
    assert found[None] < 0.5, found  # the 20-day average: about +0.15
