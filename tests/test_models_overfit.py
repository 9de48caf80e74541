"""Every network can overfit a tiny planted dataset: its training loss falls well below the loss of the best
constant predictor (the label entropy / variance)."""
import pytest
import torch

from _models import label_entropy, make_schema, planted_batches
from lattice.models import DLRM, MMoE, PLE, InterFormer, LatticeNetwork, SharedBottom, Wukong
from lattice.metrics import masked_multitask_loss
from test_models_networks import SMALL

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 60


@pytest.mark.parametrize("cls", list(SMALL), ids=[c.__name__ for c in SMALL])
def test_overfits_planted_data(cls):
    torch.manual_seed(0)
    schema = make_schema(rows=40)
    batches = planted_batches(schema, num_batches=2, batch_size=48)
    # as LatticeModule trains: embeddings by the fused in-backward row-wise Adagrad, the rest by Adam
    fused = dict(fused_optimizer="rowwise_adagrad", lr=0.1)
    model = cls(schema, **SMALL[cls], embedding_kwargs=fused)
    kinds = [t.kind for t in schema.tasks]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    baseline = label_entropy(batches, schema)
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        loss, _ = masked_multitask_loss(model(batch).train_logits, batch.labels, batch.label_mask, kinds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = sum(
            float(masked_multitask_loss(model(b).train_logits, b.labels, b.label_mask, kinds)[0]) for b in batches
        ) / len(batches) / len(schema.tasks)
    assert final < 0.5 * baseline, f"{cls.__name__}: loss {final:.3f} vs constant predictor {baseline:.3f}"
