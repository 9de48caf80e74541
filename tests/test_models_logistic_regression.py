"""LogisticRegression: a linear model over the shared processors' features (the quality benchmark's LR)."""
import copy

import pytest
import torch

from _models import make_schema, random_batch
from lattice.models import LatticeModel, LogisticRegression, ModelOutput

pytestmark = pytest.mark.usefixtures("single_thread")


def build(schema, **kwargs):
    torch.manual_seed(0)
    return LogisticRegression(schema, **{"dim": 8, **kwargs})


@pytest.mark.parametrize("untie_heads", [False, True])
def test_forward_and_gradients(untie_heads):
    schema = make_schema()
    model = build(schema, untie_heads=untie_heads)
    assert isinstance(model, LatticeModel)
    batch = random_batch(schema, 12)
    out = model(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (12, len(schema.tasks)) and torch.isfinite(out.logits).all()
    (out.train_logits * torch.randn_like(out.train_logits)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.processor.sequence.merge == "concat"  # MaskNet would not be linear
    assert model.heads.hidden_dims == []


def test_logits_are_affine_in_the_dense_features():
    schema = make_schema(num_sequences=0, zipper=False)
    model = build(schema).eval()
    batch = random_batch(schema, 16, seed=3)
    batch.dense_mask[:] = True
    step = torch.randn_like(batch.dense)

    def logits(scale):
        b = copy.copy(batch)
        b.dense = batch.dense + scale * step
        with torch.no_grad():
            return model(b).logits

    base, one, two = logits(0.0), logits(1.0), logits(2.0)
    binary = [i for i, t in enumerate(schema.tasks) if t.kind == "binary"]
    torch.testing.assert_close((two - base)[:, binary], 2 * (one - base)[:, binary], atol=1e-4, rtol=1e-4)


def test_untied_heads_route_by_domain():
    schema = make_schema()
    model = build(schema, untie_heads=True).eval()
    batch = random_batch(schema, 16, seed=1)
    with torch.no_grad():
        before = model(batch).logits
        group = model.heads.group_of_domain
        other = (group != group[batch.domain[0]]).nonzero().flatten()[0]
        for w in model.heads.weights:
            w[other].add_(1.0)
        after = model(batch).logits
    mine = group[batch.domain] != other
    torch.testing.assert_close(after[mine], before[mine])
    assert not torch.allclose(after[~mine], before[~mine])


def test_flops_are_the_heads_only():
    schema = make_schema()
    model = build(schema)
    assert model.trunk_flops(10.0) == 0.0
    assert model.flops_per_sample() == pytest.approx(
        model.processor.flops(model.default_sequence_length()) + model.heads.flops()
    )
