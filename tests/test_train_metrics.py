import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice.train.metrics import (
    MultiTaskMetrics,
    binary_auc,
    calibration,
    group_auc,
    log_loss,
    normalized_entropy,
)


def pairwise_auc(scores, labels):
    """O(n^2) definition: P(score_pos > score_neg) + 0.5 P(tie)."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


scores_and_labels = st.integers(1, 60).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 6).map(float), min_size=n, max_size=n),  # few values -> many ties
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(scores_and_labels)
def test_auc_matches_pairwise_definition(data):
    scores, labels = data
    got = binary_auc(torch.tensor(scores), torch.tensor(labels))
    want = pairwise_auc(scores, labels)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(scores_and_labels, st.integers(1, 4), st.randoms(use_true_random=False))
def test_group_auc_is_impression_weighted_mean_of_group_aucs(data, n_groups, rnd):
    scores, labels = data
    groups = [rnd.randrange(n_groups) for _ in scores]
    total, weight = 0.0, 0
    for g in set(groups):
        s = [x for x, gg in zip(scores, groups) if gg == g]
        y = [x for x, gg in zip(labels, groups) if gg == g]
        a = pairwise_auc(s, y)
        if not math.isnan(a):
            total += a * len(s)
            weight += len(s)
    want = total / weight if weight else float("nan")
    got = group_auc(torch.tensor(scores), torch.tensor(labels), torch.tensor(groups))
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-12)


def test_logloss_ne_calibration_on_known_values():
    p = torch.tensor([0.9, 0.2, 0.6, 0.1])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    want_ll = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.9)) / 4
    assert log_loss(p, y) == pytest.approx(want_ll)
    base = -(0.5 * math.log(0.5) * 2)
    assert normalized_entropy(p, y) == pytest.approx(want_ll / base)
    assert calibration(p, y) == pytest.approx(1.8 / 2.0)
    assert math.isnan(calibration(p, torch.zeros(4)))
    assert math.isnan(normalized_entropy(p, torch.ones(4)))


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
