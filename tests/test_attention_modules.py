"""lattice.nn.attention: JaggedMultiheadAttention (projections, QK-norm, RoPE over per-sample positions),
PMA and InterleavedCrossAttention on jagged token streams: shapes, agreement with a padded per-sample
computation, the RoPE relative-position property, empty sequences, sample independence, gradient flow, and
the kernel/reference switch."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from lattice.nn.attention import (
    PMA,
    InterleavedCrossAttention,
    JaggedMultiheadAttention,
    RotaryEmbedding,
    positions_from_offsets,
)
from lattice.ops import use_backend


def offsets_of(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64)


def per_sample_attention(module, query, q_offsets, key, kv_offsets, causal=False):
    """The module's computation sample by sample with dense torch ops (no jagged op)."""
    H, Dh = module.num_heads, module.head_dim
    outs = []
    for b in range(q_offsets.numel() - 1):
        qs = query[q_offsets[b] : q_offsets[b + 1]]
        ks = key[kv_offsets[b] : kv_offsets[b + 1]]
        q = module.q_proj(qs).view(-1, H, Dh)
        k = module.k_proj(ks).view(-1, H, Dh)
        v = module.v_proj(ks).view(-1, H, Dh)
        if module.q_norm is not None:
            q, k = module.q_norm(q), module.k_norm(k)
        if module.rotary is not None:
            q = module.rotary(q, torch.arange(q.shape[0]))
            k = module.rotary(k, torch.arange(k.shape[0]))
        n, m = q.shape[0], k.shape[0]
        if m == 0:
            out = q.new_zeros(n, H, Dh)
        else:
            mask = None
            if causal:
                mask = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
            out = out.transpose(0, 1)
        outs.append(module.out_proj(out.reshape(n, H * Dh)))
    return torch.cat(outs)


def test_positions_from_offsets():
    offsets = offsets_of([3, 0, 1, 4])
    assert positions_from_offsets(offsets, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert positions_from_offsets(offsets_of([0, 0]), 0).numel() == 0


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_self_attention_matches_per_sample(qk_norm, rope, bias):
    torch.manual_seed(0)
    module = JaggedMultiheadAttention(32, 4, bias=bias, qk_norm=qk_norm, rope=rope)
    lengths = [5, 1, 12, 7]
    x, offsets = torch.randn(sum(lengths), 32), offsets_of(lengths)
    for causal in (False, True):
        out = module(x, offsets, causal=causal)
        assert out.shape == x.shape
        torch.testing.assert_close(out, per_sample_attention(module, x, offsets, x, offsets, causal), rtol=1e-5, atol=1e-5)


def test_cross_attention_with_kdim_and_empty_keys():
    torch.manual_seed(0)
    module = JaggedMultiheadAttention(16, 2, kdim=24, bias=False)
    q_lengths, kv_lengths = [3, 3, 3], [4, 0, 9]
    query, key = torch.randn(9, 16), torch.randn(13, 24)
    out = module(query, offsets_of(q_lengths), key, offsets_of(kv_lengths))
    assert out.shape == (9, 16)
    assert torch.equal(out[3:6], torch.zeros(3, 16))  # no keys and no bias: the projection of zero
    torch.testing.assert_close(
        out, per_sample_attention(module, query, offsets_of(q_lengths), key, offsets_of(kv_lengths)), rtol=1e-5, atol=1e-5
    )


def test_mismatched_offsets_are_rejected():
    module = JaggedMultiheadAttention(8, 2)
    with pytest.raises(ValueError, match="disagree"):
        module(torch.randn(3, 8), offsets_of([1, 2]), torch.randn(4, 8), offsets_of([4]))
    with pytest.raises(ValueError, match="key_offsets are required"):
        module(torch.randn(3, 8), offsets_of([1, 2]), torch.randn(4, 8))
    with pytest.raises(ValueError, match="divisible"):
        JaggedMultiheadAttention(10, 3)


def test_rope_is_relative():
    torch.manual_seed(0)
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    scores = []
    for shift in (0, 5, 137):
        qm = rope(q, torch.tensor([7 + shift]))
        kn = rope(k, torch.tensor([3 + shift]))
        scores.append((qm * kn).sum(-1))
    for s in scores[1:]:
        torch.testing.assert_close(s, scores[0], rtol=1e-4, atol=1e-4)
    # Position 0 is the identity, and norms are preserved.
    torch.testing.assert_close(rope(q, torch.tensor([0])), q)
    torch.testing.assert_close(rope(q, torch.tensor([11])).norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_positions_follow_each_sample():
    """With RoPE, a sample's output depends only on its own tokens: the same sequence placed after a
    different earlier sample gives the same result (positions restart at 0 in every sample)."""
    torch.manual_seed(0)
    module = JaggedMultiheadAttention(16, 2, rope=True, qk_norm=True)
    seq = torch.randn(6, 16)
    a = module(torch.cat([torch.randn(4, 16), seq]), offsets_of([4, 6]), causal=True)[4:]
    b = module(torch.cat([torch.randn(9, 16), seq]), offsets_of([9, 6]), causal=True)[9:]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Explicit positions shifted by a constant give the same attention (relative positions).
    offsets = offsets_of([6])
    pos = torch.arange(6)
    c = module(seq, offsets, causal=True, query_positions=pos + 100)
    torch.testing.assert_close(c, module(seq, offsets, causal=True, query_positions=pos), rtol=1e-4, atol=1e-4)


def test_pma_shapes_and_empty_sequences():
    torch.manual_seed(0)
    pma = PMA(16, 2, num_seeds=3)
    lengths = [4, 0, 7, 0]
    values = torch.randn(sum(lengths), 16, requires_grad=True)
    out = pma(values, offsets_of(lengths))
    assert out.shape == (4, 3, 16)
    assert torch.isfinite(out).all()
    # An empty sequence pools to the learned seeds (the residual; bias-free projections give zero update).
    torch.testing.assert_close(out[1].detach(), pma.seeds.detach())
    torch.testing.assert_close(out[1], out[3])
    out.sum().backward()
    assert torch.isfinite(values.grad).all()
    assert pma.seeds.grad is not None and torch.isfinite(pma.seeds.grad).all()
    for p in pma.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_pma_all_empty():
    pma = PMA(8, 2, num_seeds=2)
    out = pma(torch.zeros(0, 8), offsets_of([0, 0, 0]))
    assert out.shape == (3, 2, 8) and torch.isfinite(out).all()


def test_interleaved_cross_attention():
    torch.manual_seed(0)
    layer = InterleavedCrossAttention(16, 4, qk_norm=True)
    lengths = [5, 0, 9]
    summary = torch.randn(3, 2, 16, requires_grad=True)
    sequence = torch.randn(sum(lengths), 16, requires_grad=True)
    offsets = offsets_of(lengths)
    new_summary, new_sequence = layer(summary, sequence, offsets)
    assert new_summary.shape == summary.shape and new_sequence.shape == sequence.shape
    assert torch.isfinite(new_summary).all() and torch.isfinite(new_sequence).all()
    # Sample 1 has no sequence: its summary update is the projection of zero (no bias).
    assert torch.equal(new_summary[1], torch.zeros(2, 16))
    # Matches the two directions computed sample by sample.
    flat = summary.reshape(6, 16)
    dense = offsets_of([2, 2, 2])
    want_sum = per_sample_attention(layer.summary_to_sequence, flat, dense, sequence, offsets).view(3, 2, 16)
    want_seq = per_sample_attention(layer.sequence_to_summary, sequence, offsets, flat, dense)
    torch.testing.assert_close(new_summary, want_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_sequence, want_seq, rtol=1e-5, atol=1e-5)
    (new_summary.square().sum() + new_sequence.square().sum()).backward()
    assert torch.isfinite(summary.grad).all() and torch.isfinite(sequence.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_samples_are_independent():
    torch.manual_seed(0)
    layer = InterleavedCrossAttention(16, 2)
    lengths = [4, 6]
    summary, sequence, offsets = torch.randn(2, 3, 16), torch.randn(10, 16), offsets_of(lengths)
    s1, q1 = layer(summary, sequence, offsets)
    sequence2 = sequence.clone()
    sequence2[4:] += 1.0  # perturb sample 1 only
    summary2 = summary.clone()
    summary2[1] -= 1.0
    s2, q2 = layer(summary2, sequence2, offsets)
    torch.testing.assert_close(s1[0], s2[0])
    torch.testing.assert_close(q1[:4], q2[:4])
    assert not torch.allclose(s1[1], s2[1])


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_and_reference_backends_agree(causal):
    torch.manual_seed(0)
    module = JaggedMultiheadAttention(32, 4, rope=True, qk_norm=True)
    lengths = [0, 9, 30, 2]
    x = torch.randn(sum(lengths), 32, requires_grad=True)
    offsets = offsets_of(lengths)
    out = module(x, offsets, causal=causal)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    with use_backend("reference"):
        ref = module(x, offsets, causal=causal)
        (gref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gref, rtol=1e-4, atol=1e-4)


def test_bf16_module():
    torch.manual_seed(0)
    module = JaggedMultiheadAttention(32, 2, rope=True, qk_norm=True)
    lengths = [3, 17]
    x = torch.randn(20, 32)
    offsets = offsets_of(lengths)
    want = module(x, offsets, causal=True)
    got = module.to(torch.bfloat16)(x.bfloat16(), offsets, causal=True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=5e-2, atol=5e-2)
