"""lattice.metrics: AUC and group AUC against the pairwise definition, LogLoss / NE / calibration on known
values, the masked per-task losses (the training loss included) and AUCs, and that the module stays at the
bottom (torch only)."""
import ast
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lattice import metrics
from lattice.metrics import (
    binary_auc,
    calibration,
    group_auc,
    log_loss,
    masked_auc,
    masked_multitask_loss,
    masked_task_losses,
    masked_task_means,
    masked_task_sums,
    normalized_entropy,
    regression_flags,
)

from _reference_metrics import pairwise_auc

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


def test_auc_takes_arrays_and_bool_labels_and_names_a_length_mismatch():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=300)
    labels = rng.random(300) < 1 / (1 + np.exp(-scores))
    want = pairwise_auc(scores, labels)
    assert binary_auc(scores, labels) == pytest.approx(want, abs=1e-12)
    assert binary_auc(torch.from_numpy(scores).float(), torch.from_numpy(labels)) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="300 scores but 299 labels"):
        binary_auc(scores, labels[:-1])


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
    assert math.isnan(log_loss(torch.zeros(0), torch.zeros(0)))
    assert normalized_entropy(p.numpy(), y.numpy()) == pytest.approx(want_ll / base)


def test_masked_metrics():
    logits = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [0.5, 5.0], [0.5, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False], [True, False]])
    ll = masked_task_means(logits, labels, mask)
    assert ll.dtype == torch.float64
    y, x = labels[:, 0].double(), logits[:, 0].double()
    ref0 = -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x))).mean()
    assert math.isclose(float(ll[0]), float(ref0), rel_tol=1e-12)
    ref1 = -(math.log(1 - 0.5) + math.log(torch.sigmoid(torch.tensor(1.0)).item())) / 2
    assert math.isclose(float(ll[1]), ref1, rel_tol=1e-6)
    auc = masked_auc(logits, labels, mask)
    # task 0: positives 2.0, 0.5; negatives -1.0, 0.5 -> pairs: (2>-1),(2>.5),(.5>-1),(.5=.5 -> half) = 3.5/4
    assert math.isclose(float(auc[0]), 3.5 / 4)
    assert math.isclose(float(auc[1]), 1.0)
    reg = masked_task_means(logits, labels, mask, regression=torch.tensor([False, True]))
    assert math.isclose(float(reg[1]), ((0 - 0) ** 2 + (1 - 1) ** 2) / 2)
    assert math.isnan(float(masked_auc(logits, labels, mask, torch.tensor([False, True]))[1]))
    empty = masked_task_means(logits, labels, torch.zeros_like(mask))
    assert torch.isnan(empty).all()


def test_masked_task_losses_keep_unlabelled_cells_at_zero_and_the_dtype():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]])  # garbage where unlabelled
    mask = torch.tensor([[True, False], [False, True]])
    per = masked_task_losses(logits, labels, mask, regression_flags(["binary", "regression"]))
    assert per.dtype == torch.float64
    assert per.flatten().tolist() == pytest.approx([math.log(2.0), 0.0, 0.0, 16.0])
    assert masked_task_losses(logits.half(), labels, mask).dtype == torch.float32
    sums, counts = masked_task_sums(logits.float(), labels, mask, ["binary", "regression"])
    assert sums.tolist() == pytest.approx([math.log(2.0), 16.0]) and counts.tolist() == [1.0, 1.0]
    assert regression_flags(["binary", "regression"]).tolist() == [False, True]


def test_masked_loss_matches_hand_computation_and_ignores_missing_labels():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.5], [0.0, 2.0], [123.0, 1.0]])  # 123 is masked garbage
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    total, per_task = masked_multitask_loss(logits, labels, mask, ["binary", "regression"], [1.0, 0.5])
    bce0 = math.log(2.0)  # logit 0, label 1
    bce1 = math.log1p(math.exp(2.0))  # logit 2, label 0
    want0 = (bce0 + bce1) / 2
    want1 = ((1.0 - 0.5) ** 2 + (3.0 - 1.0) ** 2) / 2
    assert per_task.tolist() == pytest.approx([want0, want1])
    assert total.item() == pytest.approx(want0 + 0.5 * want1)
    total.backward()
    assert logits.grad[2, 0] == 0 and logits.grad[1, 1] == 0  # masked entries get no gradient


def test_task_without_labels_contributes_zero_without_nan():
    logits = torch.randn(4, 2, requires_grad=True)
    labels = torch.full((4, 2), float("nan"))
    mask = torch.zeros(4, 2, dtype=torch.bool)
    mask[:, 0] = True
    labels[:, 0] = 1.0
    total, per_task = masked_multitask_loss(logits, labels, mask, ["binary", "binary"])
    assert per_task[1] == 0 and torch.isfinite(total)
    total.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[:, 1] == 0).all()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same"):
        masked_multitask_loss(torch.zeros(2, 2), torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool), ["binary"] * 2)
    with pytest.raises(ValueError, match="task kinds"):
        masked_multitask_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), ["binary"])


def test_row_weights_scale_each_row_and_keep_the_labeled_count():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.5], [0.0, 2.0], [123.0, 1.0]])
    mask = torch.tensor([[True, True], [True, False], [False, True]])
    w = torch.tensor([0.5, 0.25, 4.0])
    total, per_task = masked_multitask_loss(logits, labels, mask, ["binary", "regression"], row_weights=w)
    want0 = (0.5 * math.log(2.0) + 0.25 * math.log1p(math.exp(2.0))) / 2  # two labeled rows, unweighted count
    want1 = (0.5 * (1.0 - 0.5) ** 2 + 4.0 * (3.0 - 1.0) ** 2) / 2
    assert per_task.tolist() == pytest.approx([want0, want1])
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[2, 0] == 0  # masked entry: no gradient
    ones, _ = masked_multitask_loss(logits, labels, mask, ["binary", "regression"], row_weights=torch.ones(3))
    plain, _ = masked_multitask_loss(logits, labels, mask, ["binary", "regression"])
    assert ones.item() == pytest.approx(plain.item())
    with pytest.raises(ValueError, match="row_weights must be \\[B=3\\]"):
        masked_multitask_loss(logits, labels, mask, ["binary", "regression"], row_weights=torch.ones(2))


def test_the_module_imports_torch_only():
    tree = ast.parse(open(metrics.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "typing", "torch"}, roots
    assert os.path.basename(os.path.dirname(metrics.__file__)) == "lattice"
