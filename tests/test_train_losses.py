import math

import pytest
import torch

from lattice.metrics import masked_multitask_loss


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
