"""Auxiliary head, gradient scaling, student adapter; the serving head never learns from the teacher."""
import pytest
import torch

from _distill import TinyNetwork, make_batch, planted_rows, tiny_schema
from lattice.distill import DistillationHead, DistillationModule, GradScale, StudentAdapter, grad_scale

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def test_grad_scale_forward_identity_backward_scaled():
    x = torch.randn(4, 3, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    (y * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.5))
    assert grad_scale(x, 1.0) is x
    cut = grad_scale(x, 0.0)
    assert not cut.requires_grad  # graph cut: no gradient, no backward work
    with pytest.raises(ValueError, match="scale"):
        grad_scale(x, -1.0)
    with pytest.raises(ValueError, match="scale"):
        grad_scale(x, float("nan"))


def test_grad_scale_function_zero_gives_exact_zeros_even_for_inf_gradients():
    x = torch.randn(3, requires_grad=True)
    y = GradScale.apply(x, 0.0)
    y.backward(torch.tensor([float("inf"), float("nan"), 1.0]))
    assert torch.equal(x.grad, torch.zeros(3))


def test_distillation_head_shapes_and_task_independence():
    head = DistillationHead(6, 3, hidden_dims=(5,))
    x = torch.randn(7, 6)
    out = head(x)
    assert out.shape == (7, 3)
    per_task = head(x.unsqueeze(1).expand(-1, 3, -1).contiguous())
    assert torch.allclose(out, per_task, atol=1e-6)
    with torch.no_grad():
        head.weights[0][2].add_(1.0)  # change task 2's MLP only
    changed = head(x)
    assert torch.equal(changed[:, :2], out[:, :2]) and not torch.equal(changed[:, 2], out[:, 2])
    with pytest.raises(ValueError, match="takes"):
        head(torch.randn(7, 5))
    linear = DistillationHead(6, 2, hidden_dims=())
    assert linear(x).shape == (7, 2) and linear.flops() == 2 * 6 * 2


def test_student_adapter_starts_as_identity_and_reads_nan_as_zero():
    adapter = StudentAdapter(3, hidden_dims=(8,))
    teacher = torch.randn(5, 3)
    assert torch.equal(adapter(teacher), teacher)
    teacher[0, 1] = float("nan")
    out = adapter(teacher)
    assert torch.isfinite(out).all() and out[0, 1] == 0


def test_student_adapter_learns_to_correct_a_biased_teacher():
    torch.manual_seed(0)
    rows = planted_rows(4000, seed=1)
    biased = rows["true_logits"] * 0.4 + 1.5  # stale: compressed and shifted
    adapter = StudentAdapter(2, hidden_dims=(8,))
    opt = torch.optim.Adam(adapter.parameters(), lr=0.05)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(adapter(biased), rows["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    err_before = (torch.sigmoid(biased) - rows["true_probs"]).abs().mean()
    err_after = (torch.sigmoid(adapter(biased)) - rows["true_probs"]).abs().mean()
    assert err_after < 0.5 * err_before


# ---- the serving head is untouched by the distillation path ----------------------------------------

def _student(distillation="aux_head", scale=1.0, **kw):
    torch.manual_seed(0)
    schema = tiny_schema()
    return DistillationModule(TinyNetwork(schema), distillation=distillation, grad_scale=scale, **kw)


def _teacher_batch(n=32):
    rows = planted_rows(n, seed=3)
    batch = make_batch(rows)
    batch.teacher_logits = rows["true_logits"] + 0.3
    batch.teacher_mask = torch.ones(n, dtype=torch.bool)
    return batch


def _grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


def _is_zero(g):
    return g is None or bool((g == 0).all())


@pytest.mark.parametrize("adapter", [False, True])
def test_serving_head_gets_exactly_zero_gradient_from_distillation(adapter):
    batch = _teacher_batch()
    for scale in (0.0, 0.5, 1.0):
        module = _student(scale=scale, adapter=adapter)
        module.train()
        out = module(batch)
        grads = _grads(module, module.distillation_losses(out, batch)["distill"])
        heads = {n: g for n, g in grads.items() if n.startswith("network.heads.")}
        backbone = {n: g for n, g in grads.items() if n.startswith("network.") and n not in heads}
        aux = {n: g for n, g in grads.items() if n.startswith("aux_head.")}
        assert heads and all(_is_zero(g) for g in heads.values()), f"serving head touched at scale {scale}"
        assert any(not _is_zero(g) for g in aux.values())
        if scale == 0.0:
            assert all(g is None for g in backbone.values())  # the graph is cut at the backbone
        else:
            assert any(not _is_zero(g) for g in backbone.values())
        if adapter:  # the adapter learns from labels only, never from the distillation loss
            assert all(_is_zero(g) for n, g in grads.items() if n.startswith("adapter."))


def test_backbone_gradient_from_distillation_scales_linearly():
    batch = _teacher_batch()
    grads = {}
    for scale in (0.5, 1.0):
        module = _student(scale=scale)
        module.train()
        out = module(batch)
        grads[scale] = _grads(module, module.distillation_losses(out, batch)["distill"])
    name = "network.trunk.0.weight"
    assert torch.allclose(grads[0.5][name], 0.5 * grads[1.0][name], rtol=1e-5, atol=1e-7)
    assert torch.equal(grads[0.5]["aux_head.weights.0"], grads[1.0]["aux_head.weights.0"])


def _training_loss(module, batch):
    module.train()
    return module.training_step(batch, 0)


def test_training_step_serving_head_gradient_equals_label_only_gradient():
    """The whole training loss (labels + distillation + adapter) gives the serving head exactly the
    gradient of the label loss alone; with grad_scale 0 the backbone's too."""
    batch = _teacher_batch()
    for scale in (0.0, 1.0):
        student = _student(scale=scale, adapter=True)
        baseline = _student(distillation="none")
        baseline.load_state_dict(student.state_dict(), strict=False)
        g_student = _grads(student, _training_loss(student, batch))
        g_base = _grads(baseline, _training_loss(baseline, batch))
        for name, g in g_base.items():
            if name.startswith("network.heads.") or scale == 0.0:
                assert torch.equal(g_student[name], g), name
        if scale == 1.0:
            assert not torch.equal(g_student["network.trunk.0.weight"], g_base["network.trunk.0.weight"])


def test_soft_label_mode_trains_the_serving_head_and_scale_zero_stops_it():
    batch = _teacher_batch()
    module = _student(distillation="soft_label", scale=1.0)
    module.train()
    grads = _grads(module, module.distillation_losses(module(batch), batch)["distill"])
    assert not _is_zero(grads["network.heads.linear.weight"])
    assert module.aux_head is None
    module = _student(distillation="soft_label", scale=0.0)
    module.train()
    loss = module.distillation_losses(module(batch), batch)["distill"]
    assert not loss.requires_grad  # nothing of the student learns from the teacher


def test_aux_head_only_runs_in_training_and_predict_uses_the_serving_head():
    batch = _teacher_batch(8)
    module = _student()
    module.eval()
    with torch.no_grad():
        out = module(batch)
        pred = module.predict_step(batch, 0)
        direct = module.network(batch)
    assert out.distill_logits is None
    assert torch.equal(pred["logits"], direct.logits)
    module.train()
    assert module(batch).distill_logits.shape == (8, 2)
