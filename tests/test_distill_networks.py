"""The student pieces on the real lattice networks (skipped until lattice.models is merged): the KTAP teacher
token through :class:`TeacherTokenNetwork` (a network built with ``num_extra_tokens``), and the serving
(Zipper) heads untouched by the distillation path."""
import pytest
import torch

models = pytest.importorskip("lattice.models")
if not hasattr(models, "LatticeNetwork"):
    pytest.skip("lattice.models has no networks on this branch yet", allow_module_level=True)

from lattice.data import LatticeDataModule  # noqa: E402
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain  # noqa: E402
from lattice.distill import (  # noqa: E402
    DistillationModule,
    TeacherEmbeddingCache,
    TeacherTokenNetwork,
)

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

NETWORKS = ["LatticeNetwork", "InterFormer", "DLRM", "MMoE"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = SyntheticConfig(
        seed=5, num_users=120, num_items=90, num_clusters=4, max_sequence_length=6, mean_sequence_length=3.0,
        domains=[SyntheticDomain("a", 300), SyntheticDomain("b", 200, tasks=["click", "like"])], row_group_size=128,
    )
    dm = LatticeDataModule(synthetic=cfg, cache_dir=str(tmp_path_factory.mktemp("world")), batch_size=48)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return dm.schema, batch


def _with_teacher(batch, schema, dim=None):
    B, T = batch.batch_size, len(schema.tasks)
    batch.teacher_logits = torch.randn(B, T)
    batch.teacher_mask = torch.ones(B, dtype=torch.bool)
    batch.teacher_mask[:3] = False
    if dim:
        batch.teacher_embedding = torch.randn(B, dim)
    return batch


@pytest.mark.parametrize("name", NETWORKS)
def test_teacher_token_network_trains_with_the_token(world, name):
    schema, batch = world
    torch.manual_seed(0)
    net = TeacherTokenNetwork(schema, network_class=f"lattice.models.{name}", network_args={"dim": 8})
    plain = getattr(models, name)(schema, dim=8)
    assert net.network.num_tokens == plain.num_tokens + 1 and net.processor.num_tokens == plain.processor.num_tokens
    assert set(net.network.state_dict()) == set(plain.state_dict())  # same parameter names, a wider first layer
    module = DistillationModule(net, distillation="aux_head", adapter=True, teacher_embedding_dim=6,
                                cache=TeacherEmbeddingCache(6, ttl=5), sparse_optimizer="none",
                                optimizer=torch.optim.Adagrad)
    module.train()
    batch = _with_teacher(batch, schema, dim=6)
    module(batch)  # fills the cache
    out = module(batch)
    assert out.teacher_hit.sum() == batch.batch_size - 3  # rows the teacher scored are now cached
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert module.teacher_token.proj.weight.grad.abs().sum() > 0
    assert module.aux_head.weights[0].grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        pred = module.predict_step(batch, 0)
    assert pred["logits"].shape == (batch.batch_size, len(schema.tasks))


def test_teacher_token_network_checks_its_input(world):
    schema, batch = world
    with pytest.raises(TypeError, match="network_class"):
        TeacherTokenNetwork(schema, network_class="torch.nn.Linear")
    with pytest.raises(ValueError, match="cannot import network_class"):
        TeacherTokenNetwork(schema, network_class="lattice.models.NoSuchNetwork")
    with pytest.raises(ValueError, match="num_extra_tokens"):
        TeacherTokenNetwork(schema, network_args={"dim": 8, "num_extra_tokens": 2})
    net = TeacherTokenNetwork(schema, network_args={"dim": 8}, num_tokens=2)
    with pytest.raises(ValueError, match="num_extra_tokens=2 but got none"):
        net(batch)
    with pytest.raises(ValueError, match=r"extra_tokens must be \[B=48, num_extra_tokens=2, d=8\]"):
        net(batch, extra_tokens=torch.zeros(48, 1, 8))
    assert net(batch, extra_tokens=torch.zeros(48, 2, 8)).logits.shape == (48, len(schema.tasks))


@pytest.mark.parametrize("name", ["LatticeNetwork", "MMoE"])
def test_aux_head_on_the_serving_heads_hidden_layer(world, name):
    """aux_input='head_hidden': the teacher's gradient reaches the serving heads' hidden layers (and the
    trunk) but never their output layers, which learn from the labels alone."""
    schema, batch = world
    torch.manual_seed(0)
    batch = _with_teacher(batch, schema)
    module = DistillationModule(getattr(models, name)(schema, dim=8, head_hidden_dims=[12]), distillation="aux_head",
                                aux_input="head_hidden", aux_hidden_dims=[], sparse_optimizer="none",
                                optimizer=torch.optim.Adagrad)
    assert module.aux_head.in_dim == 12
    module.train()
    out = module(batch)
    assert out.distill_logits.shape == (batch.batch_size, len(schema.tasks))
    module.zero_grad(set_to_none=True)
    module.distillation_losses(out, batch)["distill"].backward()
    heads = module.network.heads
    hidden_w, output_w = heads.weights[0].grad, heads.weights[-1].grad
    assert hidden_w is not None and bool((hidden_w != 0).any())
    assert output_w is None or bool((output_w == 0).all())
    # only the serving (longest-window) heads' hidden layers are shared: shorter windows get nothing
    served = set(heads.serving_head.tolist())
    for h in range(heads.num_heads):
        assert bool((hidden_w[:, h] != 0).any()) == (h in served), h
    # the serving path is unchanged by the branch: eval logits equal the network's own
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(batch).logits, module.network(batch).logits)
    # gradient scale 0 at the branch: the serving heads (hidden layers included) and the trunk get nothing
    module = DistillationModule(getattr(models, name)(schema, dim=8, head_hidden_dims=[12]), distillation="aux_head",
                                aux_input="head_hidden", aux_hidden_dims=[], grad_scale=0.0, sparse_optimizer="none",
                                optimizer=torch.optim.Adagrad)
    module.train()
    module.distillation_losses(module(batch), batch)["distill"].backward()
    network_grads = [p.grad for n, p in module.named_parameters() if n.startswith("network.")]
    assert all(g is None or bool(((g.to_dense() if g.is_sparse else g) == 0).all()) for g in network_grads)
    assert module.aux_head.weights[0].grad is not None


def test_aux_head_on_the_head_hidden_layer_needs_one(world):
    schema, _ = world
    with pytest.raises(ValueError, match="heads have none"):
        DistillationModule(models.LatticeNetwork(schema, dim=8, head_hidden_dims=[]), distillation="aux_head",
                           aux_input="head_hidden")
    with pytest.raises(ValueError, match="aux_input must be"):
        DistillationModule(models.LatticeNetwork(schema, dim=8), distillation="aux_head", aux_input="heads")


@pytest.mark.parametrize("name", ["LatticeNetwork", "MMoE"])
def test_zipper_serving_heads_untouched_by_the_distillation_path(world, name):
    schema, batch = world
    torch.manual_seed(0)
    batch = _with_teacher(batch, schema)
    for scale in (0.0, 1.0):
        module = DistillationModule(getattr(models, name)(schema, dim=8), distillation="aux_head", grad_scale=scale,
                                    sparse_optimizer="none", optimizer=torch.optim.Adagrad)
        module.train()
        out = module(batch)
        module.zero_grad(set_to_none=True)
        module.distillation_losses(out, batch)["distill"].backward()
        heads = [p.grad for n, p in module.named_parameters() if n.startswith("network.heads.")]
        assert heads and all(g is None or bool((g == 0).all()) for g in heads)
        trunk = [p.grad for n, p in module.named_parameters()
                 if n.startswith("network.") and not n.startswith("network.heads.")]
        touched = any(g is not None and bool(((g.to_dense() if g.is_sparse else g) != 0).any()) for g in trunk)
        assert touched == (scale > 0)


def test_token_slot_networks_pickle(world):
    import pickle

    schema, batch = world
    net = TeacherTokenNetwork(schema, network_args={"dim": 8})
    clone = pickle.loads(pickle.dumps(net))
    assert type(clone.network) is type(net.network)
    for a, b in zip(net.state_dict().values(), clone.state_dict().values()):
        assert torch.equal(a, b)
    assert type(clone.network) is models.LatticeNetwork and clone.network.num_extra_tokens == 1


def test_online_teacher_from_a_lattice_network_checkpoint_with_fused_optimizer_state(world, tmp_path):
    """The teacher trained with the fused row-wise Adagrad: its checkpoint carries optimizer buffers a
    frozen teacher neither needs nor has."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from lattice.distill import load_teacher_network
    from lattice.train.module import LatticeModule

    schema, batch = world
    torch.manual_seed(0)
    spec = {"class_path": "lattice.models.LatticeNetwork", "init_args": {"dim": 8, "num_layers": 1}}
    teacher = LatticeModule(models.LatticeNetwork(schema, dim=8, num_layers=1), sparse_optimizer="rowwise_adagrad")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(teacher, DataLoader([batch, batch], batch_size=None))
    path = str(tmp_path / "teacher.ckpt")
    trainer.save_checkpoint(path)
    assert any("optimizer_state" in k for k in torch.load(path, weights_only=False)["state_dict"])
    loaded = load_teacher_network(path, schema, spec).eval()
    teacher.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(batch).logits, teacher.network(batch).logits, atol=1e-6)
