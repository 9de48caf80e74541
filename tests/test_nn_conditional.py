"""Conditional tasks (ESMM): the composed logit is the logit of the product of probabilities, stays finite
and differentiable at any scale, composes chains in order, reaches every network, and refuses bad
declarations."""
from types import SimpleNamespace

import pytest
import torch

from _models import make_schema, random_batch
from lattice.models import DLRM, InterFormer, LatticeNetwork, LogisticRegression, SharedBottom
from lattice.nn.conditional import ConditionalTasks, compose_logits

pytestmark = pytest.mark.usefixtures("single_thread")

GRID = torch.tensor([-80.0, -20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 20.0, 80.0], dtype=torch.float64)


def test_compose_is_the_logit_of_the_product():
    a, b = torch.meshgrid(GRID, GRID, indexing="ij")
    z = compose_logits(a, b)
    assert torch.isfinite(z).all()
    want = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(torch.sigmoid(z), want.clamp(max=1 - 1e-6), rtol=1e-6, atol=1e-12)
    # it never exceeds either factor's logit (the child cannot be likelier than its parent)
    assert (z <= torch.minimum(a, b) + 1e-9).all()


def test_compose_gradients_are_finite_and_exact():
    a, b = torch.meshgrid(GRID, GRID, indexing="ij")
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    compose_logits(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(compose_logits, (x * 3, y * 3))


def _tasks(*specs):
    return [SimpleNamespace(name=n, kind=k) for n, k in specs]


def test_chains_compose_in_order_whatever_the_declaration_order():
    tasks = _tasks(("impression_click", "binary"), ("add_to_cart", "binary"), ("purchase", "binary"))
    cond = ConditionalTasks(tasks, {"purchase": "add_to_cart", "add_to_cart": "impression_click"})
    logits = torch.randn(5, 3, dtype=torch.float64)
    served, trained, _ = cond(logits, logits, {})
    p = torch.sigmoid(logits)
    torch.testing.assert_close(torch.sigmoid(served[:, 1]), p[:, 0] * p[:, 1])
    torch.testing.assert_close(torch.sigmoid(served[:, 2]), p[:, 0] * p[:, 1] * p[:, 2])
    torch.testing.assert_close(served, trained)
    torch.testing.assert_close(served[:, 0], logits[:, 0])


@pytest.mark.parametrize(
    "parents, match",
    [
        ({"conversion": "nope"}, "parent 'nope' is not a task"),
        ({"nope": "click"}, "child 'nope' is not a task"),
        ({"watch_time": "click"}, "child 'watch_time' is a regression task"),
        ({"conversion": "watch_time"}, "parent 'watch_time' is a regression task"),
        ({"click": "click"}, "its own parent"),
        ({"click": "conversion", "conversion": "click"}, "cycle: click -> conversion -> click"),
    ],
)
def test_bad_declarations_are_refused(parents, match):
    with pytest.raises(ValueError, match=match):
        ConditionalTasks(make_schema().tasks, parents)


@pytest.mark.parametrize("cls", [LatticeNetwork, InterFormer, SharedBottom, DLRM, LogisticRegression])
def test_every_network_composes_served_trained_and_window_logits(cls):
    schema = make_schema()
    small = dict(dim=8) if cls is not LatticeNetwork else dict(dim=16, num_layers=1)
    torch.manual_seed(0)
    plain = cls(schema, **small)
    torch.manual_seed(0)
    model = cls(schema, task_parents={"conversion": "click"}, **small)
    assert model.state_dict().keys() == plain.state_dict().keys()  # no parameters of its own
    batch = random_batch(schema, 12)
    out, ref = model(batch), plain(batch)
    click, conv, watch = (schema.task_names.index(n) for n in ("click", "conversion", "watch_time"))
    p_click = torch.sigmoid(ref.logits[:, click])
    torch.testing.assert_close(torch.sigmoid(out.logits[:, conv]), p_click * torch.sigmoid(ref.logits[:, conv]))
    torch.testing.assert_close(
        torch.sigmoid(out.train_logits[:, conv]), p_click * torch.sigmoid(ref.train_logits[:, conv]))
    torch.testing.assert_close(
        torch.sigmoid(out.window_logits["conversion"]),
        p_click[:, None] * torch.sigmoid(ref.window_logits["conversion"]))
    for t in (click, watch):  # the parent and the regression task are untouched
        torch.testing.assert_close(out.logits[:, t], ref.logits[:, t])
