"""Norms, per-domain linears, fusion blocks (Wukong/DHEN), the extended context store."""
import pytest
import torch
import torch.nn.functional as F

from lattice.nn.context import ExtendedContextStore
from lattice.nn.fusion import CrossNetBlock, DotProductBlock, FMBlock, FusionBlock, LinearCompressBlock
from lattice.nn.linear import MLP, DomainLinear, resolve_domain_groups
from lattice.nn.norms import RMSNorm, RunningStandardize, SwishRMSNorm, make_norm
from lattice.nn.processors import DenseProcessor

pytestmark = pytest.mark.usefixtures("single_thread")


def _all_grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def _assert_every_param_has_grad(module):
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing}"
    zero = [n for n, p in module.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, f"zero gradient for {zero}"


# ---------------------------------------------------------------------------------------------- norms
def test_rmsnorm_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert RMSNorm(16, elementwise_affine=False).weight is None


def test_swish_rmsnorm_is_silu_of_rmsnorm():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    s = SwishRMSNorm(8)
    y = RMSNorm(8)(x)
    torch.testing.assert_close(s(x), y * torch.sigmoid(y))


def test_norm_keeps_low_precision_dtype():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    for kind in ("rms", "swish_rms"):
        assert make_norm(kind, 8)(x).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown norm"):
        make_norm("batch", 8)


def _batches(seed=0, num=5, features=3):
    g = torch.Generator().manual_seed(seed)
    scale, shift = torch.tensor([1.0, 5.0, 0.01])[:features], torch.tensor([3.0, -2.0, 100.0])[:features]
    out = []
    for i in range(num):
        x = torch.randn(7 + 11 * i, features, generator=g) * scale + shift
        mask = torch.rand(x.shape, generator=g) < 0.7
        x = torch.where(mask, x, torch.full_like(x, 1e6))  # absent entries hold garbage; it must not count
        out.append((x, mask))
    return out


def test_running_standardize_statistics_equal_those_of_all_present_values_so_far():
    norm = RunningStandardize(3)
    batches = _batches()
    for x, mask in batches:
        y = norm(x, mask)
    xs, masks = torch.cat([x for x, _ in batches]), torch.cat([m for _, m in batches])
    for f in range(3):
        present = xs[masks[:, f], f].double()
        assert int(norm.count[f]) == present.numel()
        torch.testing.assert_close(norm.mean[f], present.mean(), rtol=0, atol=1e-9)
        torch.testing.assert_close(norm.var[f], present.var(unbiased=False), rtol=1e-9, atol=1e-12)
    # the last batch is standardized with the statistics that include it
    expected = (x.double() - norm.mean) / torch.sqrt(norm.var + norm.eps)
    torch.testing.assert_close(y[mask], expected.float()[mask])


def test_running_standardize_eval_is_fixed_and_state_resumes_exactly():
    batches = _batches(seed=1)
    a = RunningStandardize(3)
    for x, mask in batches[:3]:
        a(x, mask)
    b = RunningStandardize(3)
    b.load_state_dict(a.state_dict())
    for x, mask in batches[3:]:
        torch.testing.assert_close(a(x, mask), b(x, mask))
    assert torch.equal(a.count, b.count) and torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    a.eval()
    before = a.state_dict()
    a(*batches[0])
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items()), "eval mode must not update"
    a.to(torch.bfloat16)
    assert a.count.dtype == torch.int64 and torch.equal(a.count, b.count)  # the count survives a dtype cast


def test_running_standardize_unseen_feature_passes_through_and_errors():
    norm = RunningStandardize(2)
    x = torch.tensor([[1.0, 4.0], [3.0, 8.0]])
    y = norm(x, torch.tensor([[True, False], [True, False]]))
    torch.testing.assert_close(y[:, 1], x[:, 1] / (1 + norm.eps) ** 0.5)  # no value seen: mean 0, var 1
    torch.testing.assert_close(y[:, 0], torch.tensor([-1.0, 1.0]) / (1 + norm.eps) ** 0.5)
    assert int(norm.count[1]) == 0
    with pytest.raises(ValueError, match=r"must be \[B, 2\]"):
        norm(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_features"):
        RunningStandardize(0)


@pytest.mark.parametrize("grouped", [None, 2])
def test_dense_processor_standardizes_before_tokenizing(grouped):
    torch.manual_seed(0)
    plain = DenseProcessor(3, 8, grouped)
    torch.manual_seed(0)
    std = DenseProcessor(3, 8, grouped, standardize=True)
    x, mask = _batches(seed=2)[1]
    out = std(x, mask)
    z = (x.double() - std.standardize.mean) / torch.sqrt(std.standardize.var + std.standardize.eps)
    torch.testing.assert_close(out, plain(z.float(), mask))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------- domain linear
def test_domain_linear_shared_is_plain_linear():
    torch.manual_seed(0)
    lin = DomainLinear(6, 4, bias=True)
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight[0], lin.bias[0]))
    assert not lin.untied


@pytest.mark.parametrize("dispatch", ["grouped", "dense", "gather"])
@pytest.mark.parametrize("shape", [(7, 6), (7, 3, 6)])
def test_domain_linear_uses_each_samples_group(dispatch, shape):
    torch.manual_seed(0)
    lin = DomainLinear(6, 4, num_domains=4, bias=True, domain_groups=[0, 1, 1, 2], dispatch=dispatch)
    x = torch.randn(*shape)
    domain = torch.tensor([0, 3, 1, 2, 0, 3, 3])
    y = lin(x, domain)
    groups = torch.tensor([0, 1, 1, 2])[domain]
    for b in range(shape[0]):
        g = int(groups[b])
        torch.testing.assert_close(y[b], F.linear(x[b], lin.weight[g], lin.bias[g]))


def test_domain_linear_dispatch_modes_agree_with_grads():
    torch.manual_seed(0)
    x = torch.randn(9, 2, 5)
    domain = torch.randint(0, 3, (9,))
    outs, grads = [], []
    base = DomainLinear(5, 3, num_domains=3, bias=True)
    for mode in ("grouped", "dense", "gather"):
        lin = DomainLinear(5, 3, num_domains=3, bias=True, dispatch=mode)
        lin.load_state_dict(base.state_dict())
        xx = x.clone().requires_grad_()
        y = lin(xx, domain)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        outs.append(y)
        grads.append((xx.grad, lin.weight.grad, lin.bias.grad))
    for o, g in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0])
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b)


def test_domain_linear_other_domain_weights_do_not_leak():
    torch.manual_seed(0)
    for mode in ("grouped", "dense", "gather"):
        lin = DomainLinear(5, 3, num_domains=3, dispatch=mode)
        x = torch.randn(6, 5)
        domain = torch.tensor([0, 1, 2, 0, 1, 2])
        before = lin(x, domain)
        with torch.no_grad():
            lin.weight[1].add_(10.0)
        after = lin(x, domain)
        keep = domain != 1
        torch.testing.assert_close(after[keep], before[keep])
        assert not torch.allclose(after[~keep], before[~keep])


def test_domain_linear_errors():
    lin = DomainLinear(5, 3, num_domains=2)
    with pytest.raises(ValueError, match="domain tensor"):
        lin(torch.randn(2, 5))
    with pytest.raises(ValueError, match="domain must be"):
        lin(torch.randn(2, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="entries"):
        resolve_domain_groups(3, [0, 1])
    with pytest.raises(ValueError, match="without gaps"):
        resolve_domain_groups(2, [0, 2])


def test_mlp_shapes_and_untied_grads():
    torch.manual_seed(0)
    mlp = MLP(8, [16, 12], 4, norm="rms", num_domains=2, bias=True)
    x = torch.randn(10, 8)
    domain = torch.tensor([0, 1] * 5)
    y = mlp(x, domain)
    assert y.shape == (10, 4)
    y.square().sum().backward()
    _assert_every_param_has_grad(mlp)
    assert mlp.flops() == 2 * (8 * 16 + 16 * 12 + 12 * 4)


# ----------------------------------------------------------------------------------------- fusion
def test_fm_block_optimized_form_equals_naive():
    torch.manual_seed(0)
    fm = FMBlock(num_tokens=6, dim=4, out_tokens=3, rank=2, hidden_dims=[8], norm="none")
    x = torch.randn(5, 6, 4)
    y_weight = fm.proj.weight[0].T  # [n, k]
    naive = torch.bmm(torch.bmm(x, x.transpose(1, 2)), y_weight.expand(5, -1, -1))  # (X Xᵀ) Y
    expected = fm.mlp(naive.reshape(5, -1)).view(5, 3, 4)
    torch.testing.assert_close(fm(x), expected)


def test_lcb_and_dot_blocks():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4)
    lcb = LinearCompressBlock(5, 4, 2)
    torch.testing.assert_close(lcb(x), torch.einsum("on,bnd->bod", lcb.mix.weight[0], x))
    dot = DotProductBlock(5, 4, 2)
    gram = torch.bmm(x, x.transpose(1, 2))
    iu = torch.triu_indices(5, 5, offset=1)
    pairs = gram[:, iu[0], iu[1]]
    torch.testing.assert_close(dot(x), dot.out(pairs).view(3, 2, 4))


def test_crossnet_formula():
    torch.manual_seed(0)
    block = CrossNetBlock(3, 4, 3, num_layers=2, rank=None, bias=True)
    with torch.no_grad():
        block.compress.weight[0].copy_(torch.eye(3))
        block.compress.bias.zero_()
    x = torch.randn(2, 3, 4)
    x0 = x.reshape(2, -1)
    xl = x0
    for up in block.up:
        xl = x0 * F.linear(xl, up.weight[0], up.bias[0]) + xl
    torch.testing.assert_close(block(x), xl.view(2, 3, 4))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(fm_tokens=4, lcb_tokens=4),  # Wukong, n == m: identity residual
        dict(fm_tokens=3, lcb_tokens=2, dot_tokens=2, dcn_tokens=1, fm_hidden_dims=[16]),  # DHEN ensemble
        dict(fm_tokens=0, lcb_tokens=5, num_domains=3),
    ],
)
def test_fusion_block_shapes_and_grads(cfg):
    torch.manual_seed(0)
    block = FusionBlock(num_tokens=8, dim=6, **cfg)
    x = torch.randn(9, 8, 6, requires_grad=True)
    domain = torch.arange(9) % 3
    y = block(x, domain)
    assert y.shape == (9, block.out_tokens, 6)
    assert y.dtype == torch.float32
    y.square().sum().backward()
    _assert_every_param_has_grad(block)
    assert block.flops() > 0


def test_fusion_block_needs_a_module():
    with pytest.raises(ValueError, match="at least one module"):
        FusionBlock(4, 4, fm_tokens=0, lcb_tokens=0)


# ---------------------------------------------------------------------------------------------- ECS
def test_ecs_starts_as_zero_and_learns():
    torch.manual_seed(0)
    ecs = ExtendedContextStore(dim=4, write_tokens=[5, 3, 3], read_tokens=[5, 3, 3])
    context = [torch.randn(2, 5, 4), torch.randn(2, 3, 4)]
    out = ecs.read(2, context)
    assert out.shape == (2, 3, 4)
    assert out.abs().sum() == 0
    out.sum().backward()
    assert ecs.readers[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reads 2"):
        ecs.read(2, context[:1])
    with pytest.raises(IndexError):
        ecs.read(0, context)
