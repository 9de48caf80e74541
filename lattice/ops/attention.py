"""``lattice.ops.jagged_attention``: varlen (jagged) multi-head attention, flash-style.

One op serves every direction of an interleaved layer: summary tokens attending to each sample's
sequence (dense queries: ``q_offsets = n * arange(B + 1)``), the sequence attending to itself
(``causal=True``), and sequence tokens attending to the summary tokens. The kernels never form a padded
score tensor. See ``csrc/cpu/jagged_attention.cpp`` for the algorithm.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from lattice.ops._backend import use_reference
from lattice.ops.reference.attention import jagged_attention_reference

__all__ = ["jagged_attention"]


def jagged_attention(
    q: Tensor,
    q_offsets: Tensor,
    k: Tensor,
    v: Tensor,
    kv_offsets: Tensor,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Multi-head attention in which sample b's queries attend only to sample b's keys.

    Args:
        q: ``[Nq, H, Dh]`` queries; sample b owns rows ``q_offsets[b]:q_offsets[b+1]``.
        q_offsets: ``[B+1]`` offsets (int64; int32 is converted).
        k, v: ``[Nk, H, Dh]`` keys and values (q's dtype), split by ``kv_offsets [B+1]``.
        scale: score multiplier, default ``Dh ** -0.5``.
        causal: query i of a sample with n queries and m keys attends keys ``j <= i + (m - n)``, i.e.
            the last query is aligned with the last key (self-attention over a sequence).

    Returns:
        ``(out [Nq, H, Dh], lse [Nq, H])``: the attention output in q's dtype and the float32
        log-sum-exp of the scaled scores (not differentiable). A query that sees no key (an empty
        sequence) gets ``out = 0`` and ``lse = -inf``, with zero gradients and no NaN.

    float32, float64, bfloat16 and float16 inputs are supported; half types accumulate in float32.
    Honours the kernel/reference switch (:func:`lattice.ops.set_backend`).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q_offsets.dtype == torch.int32:
        q_offsets = q_offsets.long()
    if kv_offsets.dtype == torch.int32:
        kv_offsets = kv_offsets.long()
    if use_reference():
        return jagged_attention_reference(q, q_offsets, k, v, kv_offsets, scale, causal)
    return torch.ops.lattice.jagged_attention(q, q_offsets, k, v, kv_offsets, float(scale), bool(causal))


@torch.library.register_fake("lattice::jagged_attention")
def _jagged_attention_fake(q, q_offsets, k, v, kv_offsets, scale, causal):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D, got shape {tuple(q.shape)}")
    torch._check(k.shape == v.shape, lambda: f"k and v must have the same shape, got {tuple(k.shape)}, {tuple(v.shape)}")
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[0], q.shape[1]), dtype=torch.float32
    )


@torch.library.register_fake("lattice::jagged_attention_backward")
def _jagged_attention_backward_fake(grad_out, q, q_offsets, k, v, kv_offsets, out, lse, scale, causal):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, q_offsets, k, v, kv_offsets, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, q_offsets, k, v, kv_offsets, out, lse)
    ctx.scale = scale
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, q_offsets, k, v, kv_offsets, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v = torch.ops.lattice.jagged_attention_backward(
        grad_out, q, q_offsets, k, v, kv_offsets, out, lse, ctx.scale, ctx.causal
    )
    return grad_q, None, grad_k, grad_v, None, None, None


torch.library.register_autograd("lattice::jagged_attention", _backward, setup_context=_setup_context)
