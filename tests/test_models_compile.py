"""torch.compile of every network runs without a graph break (``fullgraph=True``) and matches eager (forward and
gradients), the fused embedding optimizer included.

The default test compiles with ``aot_eager`` (Dynamo capture, AOTAutograd, the ops' fake kernels; about
a minute here). The inductor variant generates and compiles C++ for every graph and takes several
minutes on 2 busy cores: it runs with ``LATTICE_TEST_INDUCTOR=1``.
"""
import os

import pytest
import torch

from _models import make_schema, random_batch
from lattice.distill import TeacherTokenNetwork
from lattice.models import DLRM, PLE, InterFormer, LatticeNetwork, LogisticRegression, MMoE, SharedBottom, Wukong

pytestmark = pytest.mark.usefixtures("single_thread")

# Embeddings as in training (the fused in-backward optimizer), with lr 0 so both runs see the same weights.
SIZE = dict(dim=16, num_layers=2, num_heads=2, fm_tokens=4, lcb_tokens=4, fm_hidden_dims=[32], representation_dim=32,
            head_hidden_dims=[16], untied_layers=[1], embedding_kwargs=dict(fused_optimizer="sgd", lr=0.0))


def _model_and_batch():
    schema = make_schema()
    torch.manual_seed(0)
    model = LatticeNetwork(schema, **SIZE)
    return model, random_batch(schema, 12, seed=3)


_INDUCTOR = pytest.mark.skipif(
    os.environ.get("LATTICE_TEST_INDUCTOR") != "1", reason="inductor compile takes minutes; set LATTICE_TEST_INDUCTOR=1"
)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=[pytest.mark.slow, _INDUCTOR])])
def test_compiled_lattice_network_matches_eager(backend):
    torch._dynamo.reset()
    model, batch = _model_and_batch()
    eager = model(batch)
    eager.train_logits.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    out = compiled(batch)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.train_logits, eager.train_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.representation, eager.representation, rtol=1e-4, atol=1e-5)
    out.train_logits.sum().backward()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-3, atol=1e-5, msg=name)


SMALL = dict(dim=8, head_hidden_dims=[8], embedding_kwargs=dict(fused_optimizer="sgd", lr=0.0))
NETWORKS = {
    "InterFormer": lambda schema: InterFormer(schema, **SMALL, num_layers=1, num_heads=2),
    "SharedBottom": lambda schema: SharedBottom(schema, **SMALL),
    "MMoE": lambda schema: MMoE(schema, **SMALL),
    "PLE": lambda schema: PLE(schema, **SMALL),
    "DLRM": lambda schema: DLRM(schema, **SMALL),
    "Wukong": lambda schema: Wukong(schema, **SMALL),
    "LogisticRegression": lambda schema: LogisticRegression(
        schema, embedding_kwargs=dict(fused_optimizer="sgd", lr=0.0)),
    "student": lambda schema: TeacherTokenNetwork(
        schema, network_class="lattice.models.LatticeNetwork", network_args=dict(SMALL, num_layers=1, num_heads=2)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_network_compiles_without_graph_breaks_and_matches_eager(name):
    torch._dynamo.reset()
    schema = make_schema()
    torch.manual_seed(0)
    model = NETWORKS[name](schema)
    batch = random_batch(schema, 10, seed=4)
    args = (batch,)
    if name == "student":  # the KTAP teacher token, as DistillationModule passes it
        args = (batch, torch.randn(10, model.num_extra_tokens, model.dim))
    eager = model(*args)
    eager.train_logits.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert eager_grads
    model.zero_grad(set_to_none=True)

    out = torch.compile(model, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.train_logits, eager.train_logits, rtol=1e-4, atol=1e-5)
    out.train_logits.sum().backward()
    for n, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, grad, rtol=1e-3, atol=1e-5, msg=n)
