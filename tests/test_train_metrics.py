"""MultiTaskMetrics: the torchmetrics wrapper, per (domain, task) and per task (the arithmetic is tested in
test_metrics.py)."""
import pytest
import torch

from lattice.metrics import binary_auc, log_loss
from lattice.train.metrics import MultiTaskMetrics


def test_multitask_metrics_per_domain_and_masking():
    torch.manual_seed(0)
    n = 200
    logits = torch.randn(n, 2)
    labels = (torch.rand(n, 2) < torch.sigmoid(logits)).float()
    mask = torch.rand(n, 2) < 0.8
    mask[:, 1] &= torch.arange(n) % 2 == 0  # task 1 only labeled in domain 0
    domain = torch.arange(n) % 2
    truth = torch.sigmoid(logits)
    metric = MultiTaskMetrics(["click", "like"], ["feed", "reels"])
    metric.update(logits[:120], labels[:120], mask[:120], domain[:120], torch.arange(120) % 7, truth[:120])
    metric.update(logits[120:], labels[120:], mask[120:], domain[120:], torch.arange(120, n) % 7, truth[120:])
    out = metric.compute()
    rows = mask[:, 0] & (domain == 1)
    assert out["reels/click/auc"] == pytest.approx(binary_auc(logits[rows, 0], labels[rows, 0]))
    assert out["click/count"] == float(mask[:, 0].sum())
    assert out["feed/like/oracle_auc"] == pytest.approx(out["feed/like/auc"])  # truth == sigmoid(logits)
    assert "reels/like/auc" not in out  # no labeled rows there
    rows = mask[:, 1]
    assert out["like/logloss"] == pytest.approx(log_loss(torch.sigmoid(logits[rows, 1]), labels[rows, 1]))


def test_multitask_metrics_regression_and_bad_shape():
    metric = MultiTaskMetrics(["watch_time"], ["d"], task_kinds=["regression"])
    metric.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [3.0]]), torch.ones(2, 1, dtype=torch.bool), torch.zeros(2))
    out = metric.compute()
    assert out["watch_time/mse"] == pytest.approx(0.5)
    assert out["d/watch_time/mae"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 tasks"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), torch.zeros(2))
