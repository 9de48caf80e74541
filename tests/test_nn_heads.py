"""Multi-task heads and Lattice Zipper routing."""
from types import SimpleNamespace as NS

import pytest
import torch

from lattice.nn.heads import MultiTaskHeads

pytestmark = pytest.mark.usefixtures("single_thread")


def _tasks():
    windows = [NS(name="1h", seconds=3600.0), NS(name="7d", seconds=604800.0), NS(name="1d", seconds=86400.0)]
    return [NS(name="click", windows=None), NS(name="conversion", windows=windows), NS(name="watch", windows=[])]


def test_shapes_and_serving_uses_longest_window():
    torch.manual_seed(0)
    heads = MultiTaskHeads(8, _tasks(), hidden_dims=[16])
    assert heads.num_heads == 5
    x = torch.randn(6, 8)
    out = heads(x)
    assert out.logits.shape == (6, 3) and out.train_logits.shape == (6, 3)
    win = out.window_logits["conversion"]
    assert win.shape == (6, 3)
    torch.testing.assert_close(out.logits[:, 1], win[:, 1])  # "7d" is the longest
    torch.testing.assert_close(out.train_logits, out.logits)


def test_per_task_inputs():
    heads = MultiTaskHeads(4, _tasks(), hidden_dims=[])
    x = torch.randn(3, 3, 4)
    out = heads(x)
    # task t's heads see only x[:, t]
    x2 = x.clone()
    x2[:, 0] += 1.0
    out2 = heads(x2)
    torch.testing.assert_close(out.logits[:, 1:], out2.logits[:, 1:])
    assert not torch.allclose(out.logits[:, 0], out2.logits[:, 0])
    with pytest.raises(ValueError, match="heads take"):
        heads(torch.randn(3, 2, 4))


def test_zipper_routing_reaches_only_assigned_window_head():
    torch.manual_seed(0)
    heads = MultiTaskHeads(8, _tasks(), hidden_dims=[16])
    x = torch.randn(4, 8)
    label_window = torch.tensor([[-1, 0, -1], [-1, 2, -1], [-1, 0, -1], [-1, -1, -1]])
    out = heads(x, label_window)
    win = out.window_logits["conversion"]
    torch.testing.assert_close(out.train_logits[:, 1], torch.stack([win[0, 0], win[1, 2], win[2, 0], win[3, 1]]))
    # A loss on the conversion task of sample 0 only: gradient reaches head 1 (window 0) and no other.
    out.train_logits[0, 1].backward()
    w_last = heads.weights[-1].grad[0]  # [heads, hidden, 1]
    per_head = w_last.abs().sum(dim=(1, 2))
    assert per_head[1] > 0
    assert torch.all(per_head[[0, 2, 3, 4]] == 0)


def test_zipper_bad_window_is_an_error():
    heads = MultiTaskHeads(8, _tasks())
    with pytest.raises(ValueError, match="has 3 windows"):
        heads(torch.randn(2, 8), torch.tensor([[-1, 3, -1], [-1, 0, -1]]))
    with pytest.raises(ValueError, match="label_window must be"):
        heads(torch.randn(2, 8), torch.zeros(2, 2, dtype=torch.long))


def test_per_domain_heads_route_by_domain():
    torch.manual_seed(0)
    heads = MultiTaskHeads(8, _tasks(), hidden_dims=[16], num_domains=3)
    x = torch.randn(6, 8)
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    before = heads(x, domain=domain).logits
    with torch.no_grad():
        heads.weights[0][2].add_(1.0)
    after = heads(x, domain=domain).logits
    keep = domain != 2
    torch.testing.assert_close(after[keep], before[keep])
    assert not torch.allclose(after[~keep], before[~keep])
    after.sum().backward()
    assert all(p.grad is not None for p in heads.parameters())


@pytest.mark.parametrize("domains", [1, 3])
def test_serving_hidden_is_what_each_serving_output_layer_reads(domains):
    torch.manual_seed(0)
    heads = MultiTaskHeads(8, _tasks(), hidden_dims=[16, 6], num_domains=domains)
    x, domain = torch.randn(5, 8), torch.tensor([0, 2, 1, 0, 2]) % domains
    out = heads(x, domain=domain)
    assert out.serving_hidden.shape == (5, 3, 6)
    group = heads.group_of_domain[domain]
    w = heads.weights[-1][group][:, heads.serving_head]  # [B, T, 6, 1]
    b = heads.biases[-1][group][:, heads.serving_head]  # [B, T, 1]
    want = torch.einsum("bti,btio->bto", out.serving_hidden, w) + b
    torch.testing.assert_close(out.logits, want.squeeze(-1))
    assert MultiTaskHeads(8, _tasks(), hidden_dims=[])(x).serving_hidden is None
