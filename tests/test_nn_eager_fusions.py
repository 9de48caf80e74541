"""The eager-mode restructurings of issue 28 compute what the plain formulas compute, gradients included:
the RMSNorm autograd.Function, the swapped-halves RoPE with signed tables, and the attention's one QKV matmul
with q and k normalized and rotated in one pass."""
import pytest
import torch
import torch.nn.functional as F

from lattice.nn.attention import JaggedMultiheadAttention, apply_rope, rope_table
from lattice.nn.norms import RMSNorm, SwishRMSNorm, rms_norm
from lattice.ops.attention import jagged_attention

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("weight_shape", [None, (8,), (3, 8)], ids=["no_weight", "per_channel", "per_head"])
def test_rms_norm_function_gradcheck(weight_shape):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = None if weight_shape is None else torch.rand(*weight_shape, dtype=torch.float64, requires_grad=True)
    inputs = (x,) if w is None else (x, w)
    assert torch.autograd.gradcheck(lambda *a: rms_norm(a[0], a[1] if len(a) > 1 else None, 1e-6), inputs)


def test_rms_norm_matches_the_composite_formula_and_keeps_bf16():
    torch.manual_seed(0)
    x = torch.randn(7, 2, 16, requires_grad=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    out = norm(x)
    ref = F.rms_norm(x, (16,), norm.weight, norm.eps)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, norm.weight], g)
    want = torch.autograd.grad(ref, [x, norm.weight], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    assert SwishRMSNorm(16)(xb).dtype == torch.bfloat16


@pytest.mark.parametrize("head_dim", [8, 7])
def test_swapped_halves_rope_equals_the_pairwise_rotation(head_dim):
    torch.manual_seed(0)
    x = torch.randn(6, 2, head_dim, dtype=torch.float64)
    pos = torch.tensor([0, 3, 1, 9, 2, 5])
    half = head_dim // 2
    angle = pos.double().unsqueeze(-1) * 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angle.cos().unsqueeze(1), angle.sin().unsqueeze(1)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    want = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]], dim=-1)
    torch.testing.assert_close(apply_rope(x.float(), pos).double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(x.float(), table=rope_table(pos, head_dim)).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_self_attention_gradients_match_separate_projections(bias):
    """The module's one-matmul, joint-norm, joint-RoPE path against q/k/v projected, normed and rotated apart."""
    torch.manual_seed(0)
    mha = JaggedMultiheadAttention(16, 2, bias=bias, qk_norm=True, rope=True)
    with torch.no_grad():
        mha.q_norm.weight.uniform_(0.5, 1.5), mha.k_norm.weight.uniform_(0.5, 1.5)
    lengths = torch.tensor([3, 0, 5, 2])
    off = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    x = torch.randn(int(off[-1]), 16, requires_grad=True)
    pos = torch.cat([torch.arange(n) for n in lengths.tolist()])

    def separate():
        heads = lambda t: t.view(t.shape[0], 2, 8)  # noqa: E731
        q = F.rms_norm(heads(mha.q_proj(x)), (8,), mha.q_norm.weight, mha.q_norm.eps)
        k = F.rms_norm(heads(mha.k_proj(x)), (8,), mha.k_norm.weight, mha.k_norm.eps)
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        out, _ = jagged_attention(q.contiguous(), off, k.contiguous(), heads(mha.v_proj(x)).contiguous(), off,
                                  8**-0.5, False)
        return mha.out_proj(out.reshape(-1, 16))

    params = [x, *mha.parameters()]
    g = torch.randn(x.shape[0], 16)
    got = torch.autograd.grad(mha(x, off, query_positions=pos), params, g)
    want = torch.autograd.grad(separate(), params, g)
    for (name, _), a, b in zip([("x", x), *mha.named_parameters()], got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
