"""Distillation losses against hand computations."""
import math

import pytest
import torch

from lattice.distill.losses import distillation_loss, distillation_mask, teacher_targets


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit, target):
    p = sigmoid(logit)
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def test_teacher_targets_temperature_and_label_scale():
    teacher = torch.tensor([[2.0, 3.0], [-1.0, -0.5]])
    kinds = ["binary", "regression"]
    out = teacher_targets(teacher, kinds)
    assert out[0, 0].item() == pytest.approx(sigmoid(2.0))
    assert out[1, 0].item() == pytest.approx(sigmoid(-1.0))
    assert out[:, 1].tolist() == [3.0, -0.5]  # regression: the raw prediction
    out = teacher_targets(teacher, kinds, temperature=2.0, label_scale=0.5)
    assert out[0, 0].item() == pytest.approx(0.5 * sigmoid(1.0))
    assert out[1, 0].item() == pytest.approx(0.5 * sigmoid(-0.5))
    assert out[:, 1].tolist() == [1.5, -0.25]  # label scale applies, temperature does not
    # scaled probabilities are clamped into [0, 1]
    assert teacher_targets(torch.tensor([[5.0]]), ["binary"], label_scale=3.0).item() == 1.0


def test_loss_matches_hand_computation_with_every_mask():
    student = torch.tensor(
        [[0.0, 1.0], [math.log(3.0), 2.0], [1.0, -1.0], [0.5, 0.0]], requires_grad=True
    )
    teacher = torch.tensor([[0.0, 0.5], [-math.log(3.0), 1.0], [2.0, float("nan")], [9.0, 9.0]])
    teacher_mask = torch.tensor([True, True, True, False])  # row 3: the teacher never scored it
    present = torch.tensor([[True, True], [True, False], [True, True], [True, True]])  # row 1 lacks task 1
    total, per_task = distillation_loss(
        student, teacher, ["binary", "regression"], teacher_mask=teacher_mask, task_present=present,
        task_weights=[1.0, 0.25],
    )
    # task 0 covers rows 0, 1, 2
    want0 = (bce(0.0, 0.5) + bce(math.log(3.0), 0.25) + bce(1.0, sigmoid(2.0))) / 3
    # task 1 covers row 0 only (row 1 absent from the domain, row 2 non-finite teacher, row 3 not scored)
    want1 = (1.0 - 0.5) ** 2
    assert per_task.tolist() == pytest.approx([want0, want1])
    assert total.item() == pytest.approx(want0 + 0.25 * want1)
    # hand value of one term: p = 3/4 against target 1/4
    assert bce(math.log(3.0), 0.25) == pytest.approx(-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)))
    total.backward()
    g = student.grad
    # d BCE / d logit = (sigmoid(logit) - target) / rows
    assert g[1, 0].item() == pytest.approx((0.75 - 0.25) / 3)
    assert g[0, 1].item() == pytest.approx(0.25 * 2 * (1.0 - 0.5))
    assert g[3].abs().sum() == 0 and g[1, 1] == 0 and g[2, 1] == 0  # uncovered entries get nothing
    assert torch.isfinite(g).all()


def test_temperature_scales_both_sides_and_multiplies_by_t_squared():
    s, t, T = 1.5, -0.7, 2.0
    total, _ = distillation_loss(torch.tensor([[s]]), torch.tensor([[t]]), ["binary"], temperature=T)
    assert total.item() == pytest.approx(T * T * bce(s / T, sigmoid(t / T)))


def test_label_scale_and_explicit_targets():
    s, t = 0.3, 1.0
    total, _ = distillation_loss(torch.tensor([[s]]), torch.tensor([[t]]), ["binary"], label_scale=0.5)
    assert total.item() == pytest.approx(bce(s, 0.5 * sigmoid(t)))
    # explicit targets (e.g. the adapter's) replace the teacher's, the teacher logits still mask
    total, _ = distillation_loss(
        torch.tensor([[s], [s]]), torch.tensor([[t], [float("inf")]]), ["binary"], targets=torch.tensor([[0.9], [0.1]])
    )
    assert total.item() == pytest.approx(bce(s, 0.9))


def test_loss_equals_zero_at_the_teachers_own_logits_up_to_entropy():
    teacher = torch.randn(16, 3)
    total, per_task = distillation_loss(teacher.clone(), teacher, ["binary"] * 3)
    p = torch.sigmoid(teacher)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean(0)
    assert torch.allclose(per_task, entropy, atol=1e-6)


def test_nothing_covered_gives_zero_without_nan():
    student = torch.randn(3, 2, requires_grad=True)
    total, per_task = distillation_loss(student, torch.full((3, 2), float("nan")), ["binary", "regression"])
    assert total.item() == 0 and per_task.tolist() == [0.0, 0.0]
    total.backward()
    assert (student.grad == 0).all()


def test_mask_shapes_and_errors():
    teacher = torch.zeros(2, 3)
    assert distillation_mask(teacher, torch.tensor([True, False])).tolist() == [[True] * 3, [False] * 3]
    per_task = torch.tensor([[True, False, True], [False, True, True]])
    assert distillation_mask(teacher, per_task).tolist() == per_task.tolist()
    with pytest.raises(ValueError, match="teacher_mask"):
        distillation_mask(teacher, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="same"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 2), ["binary"] * 3)
    with pytest.raises(ValueError, match="temperature"):
        teacher_targets(teacher, ["binary"] * 3, temperature=0.0)
    with pytest.raises(ValueError, match="kinds"):
        teacher_targets(teacher, ["binary", "ranking", "binary"])
    with pytest.raises(ValueError, match="task_weights"):
        distillation_loss(torch.zeros(2, 3), teacher, ["binary"] * 3, task_weights=[1.0])
