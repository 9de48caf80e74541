"""Attention modules over jagged streams: JaggedMultiheadAttention, PMA, InterleavedCrossAttention."""
import pytest
import torch
import torch.nn.functional as F

from lattice.nn.attention import PMA, InterleavedCrossAttention, JaggedMultiheadAttention, apply_rope

pytestmark = pytest.mark.usefixtures("single_thread")


def _offsets(lengths):
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.tensor(lengths), 0)])


def _reference(mha, query, q_off, key, k_off, causal=False, qpos=None, kpos=None):
    """Sample-by-sample SDPA with the module's own projections."""
    out = torch.zeros(query.shape[0], mha.embed_dim)
    H, Dh = mha.num_heads, mha.head_dim
    for b in range(q_off.numel() - 1):
        qs, qe, ks, ke = int(q_off[b]), int(q_off[b + 1]), int(k_off[b]), int(k_off[b + 1])
        if qe == qs or ke == ks:
            out[qs:qe] = mha.out_proj(torch.zeros(qe - qs, mha.embed_dim))
            continue
        q = mha.q_proj(query[qs:qe]).view(-1, H, Dh)
        k = mha.k_proj(key[ks:ke]).view(-1, H, Dh)
        v = mha.v_proj(key[ks:ke]).view(-1, H, Dh)
        if mha.q_norm is not None:
            q, k = mha.q_norm(q), mha.k_norm(k)
        if mha.rope:
            q = apply_rope(q, torch.arange(qe - qs) if qpos is None else qpos[qs:qe])
            k = apply_rope(k, torch.arange(ke - ks) if kpos is None else kpos[ks:ke])
        mask = None
        if causal:
            i = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
            mask = torch.arange(ke - ks)[None] <= i
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        out[qs:qe] = mha.out_proj(o.transpose(0, 1).reshape(-1, mha.embed_dim).nan_to_num())
    return out


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_reference(qk_norm, rope, causal):
    torch.manual_seed(0)
    mha = JaggedMultiheadAttention(16, 4, qk_norm=qk_norm, rope=rope, bias=True)
    lengths = [3, 0, 5, 1]
    x = torch.randn(sum(lengths), 16)
    off = _offsets(lengths)
    out = mha(x, off, causal=causal)
    torch.testing.assert_close(out, _reference(mha, x, off, x, off, causal), rtol=1e-4, atol=1e-5)


def test_cross_attention_and_empty_keys():
    torch.manual_seed(0)
    mha = JaggedMultiheadAttention(8, 2, kdim=6)
    q, q_off = torch.randn(6, 8, requires_grad=True), _offsets([2, 2, 2])
    k, k_off = torch.randn(4, 6, requires_grad=True), _offsets([3, 0, 1])
    out = mha(q, q_off, k, k_off)
    torch.testing.assert_close(out, _reference(mha, q, q_off, k, k_off), rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert q.grad[2:4].abs().sum() == 0  # the sample without keys
    with pytest.raises(ValueError, match="key_offsets"):
        mha(q, q_off, k)


def test_rope_scores_depend_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    s = lambda a, b: (apply_rope(q, torch.tensor([a])) * apply_rope(k, torch.tensor([b]))).sum(-1)  # noqa: E731
    torch.testing.assert_close(s(3, 1), s(10, 8))
    assert not torch.allclose(s(3, 1), s(3, 2))


def test_pma_and_interleaved_cross_attention():
    torch.manual_seed(0)
    lengths = [4, 0, 2]
    x = torch.randn(6, 8, requires_grad=True)
    off = _offsets(lengths)
    pma = PMA(8, 2, num_seeds=3)
    pooled = pma(x, off)
    assert pooled.shape == (3, 3, 8)
    # the sample without tokens pools to the output projection of zeros (its bias; none here)
    torch.testing.assert_close(pooled[1], pma.seeds)  # empty sample: the seeds (residual), no NaN
    ica = InterleavedCrossAttention(8, 2, qk_norm=True)
    summary = torch.randn(3, 2, 8, requires_grad=True)
    new_summary, new_seq = ica(summary, x, off)
    assert new_summary.shape == (3, 2, 8) and new_seq.shape == (6, 8)
    assert new_summary[1].abs().sum() == 0
    (new_summary.sum() + new_seq.sum() + pooled.sum()).backward()
    for p in [*pma.parameters(), *ica.parameters(), x, summary]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    # per-sample isolation: changing sample 0's tokens leaves sample 2 alone
    x2 = x.detach().clone()
    x2[:4] += 1.0
    a, b = ica(summary, x2, off)
    torch.testing.assert_close(a[2], new_summary[2])
    torch.testing.assert_close(b[4:], new_seq[4:])


def test_reference_backend_agrees():
    import lattice.ops as ops

    torch.manual_seed(0)
    mha = JaggedMultiheadAttention(8, 2, rope=True, qk_norm=True)
    x, off = torch.randn(7, 8), _offsets([3, 4])
    out = mha(x, off, causal=True)
    with ops.use_backend("reference"):
        ref = mha(x, off, causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
