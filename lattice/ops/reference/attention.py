"""Pure-torch reference for :func:`lattice.ops.jagged_attention`: pad, mask, softmax.

Materializes the padded ``[B, H, Lq, Lk]`` score tensor, so it is only meant for tests, benchmarks and
the ``LATTICE_OPS=reference`` switch. It is differentiable through ordinary autograd.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["jagged_attention_reference", "pad_jagged", "unpad_jagged"]


def pad_jagged(values: Tensor, offsets: Tensor, max_len: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Jagged rows ``values [N, ...]`` with ``offsets [B+1]`` to ``padded [B, L, ...]`` (zeros after each
    sample's rows) and ``valid [B, L]`` (bool). ``L`` is the longest sample unless ``max_len`` is given."""
    offsets = offsets.to(device=values.device, dtype=torch.long)
    lengths = offsets[1:] - offsets[:-1]
    if max_len is None:
        max_len = int(lengths.max().item()) if lengths.numel() > 0 else 0
    pos = torch.arange(max_len, device=values.device)
    valid = pos[None, :] < lengths[:, None]
    # Index N (one past the end) points at an appended zero row.
    index = torch.where(valid, offsets[:-1, None] + pos[None, :], values.shape[0])
    extended = torch.cat([values, values.new_zeros((1,) + values.shape[1:])], dim=0)
    return extended[index], valid


def unpad_jagged(padded: Tensor, valid: Tensor) -> Tensor:
    """Inverse of :func:`pad_jagged`: ``padded [B, L, ...]`` and ``valid [B, L]`` to ``[N, ...]``."""
    return padded[valid]


def jagged_attention_reference(
    q: Tensor,
    q_offsets: Tensor,
    k: Tensor,
    v: Tensor,
    kv_offsets: Tensor,
    scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Reference jagged attention with the op's semantics.

    Args:
        q: ``[Nq, H, Dh]`` queries; sample b owns rows ``q_offsets[b]:q_offsets[b+1]``.
        q_offsets: ``[B+1]`` int offsets.
        k, v: ``[Nk, H, Dh]`` keys and values, split by ``kv_offsets [B+1]``.
        scale: score multiplier, default ``Dh ** -0.5``.
        causal: query i of n attends keys ``j <= i + (m - n)`` (last query aligned with the last key).

    Returns:
        ``out [Nq, H, Dh]`` in q's dtype and ``lse [Nq, H]`` float32 (natural log of the softmax
        normalizer). A query that sees no key gets ``out = 0`` and ``lse = -inf``. Computed in float32
        (float64 for float64 inputs).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_offsets = q_offsets.to(device=q.device, dtype=torch.long)
    kv_offsets = kv_offsets.to(device=q.device, dtype=torch.long)
    qp, q_valid = pad_jagged(q.to(compute), q_offsets)  # [B, Lq, H, Dh]
    kp, k_valid = pad_jagged(k.to(compute), kv_offsets)
    vp, _ = pad_jagged(v.to(compute), kv_offsets, max_len=kp.shape[1])
    qp, kp, vp = (t.permute(0, 2, 1, 3) for t in (qp, kp, vp))  # [B, H, L, Dh]

    scores = torch.matmul(qp, kp.transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    mask = k_valid[:, None, None, :]  # [B, 1, 1, Lk]
    if causal:
        q_len = q_offsets[1:] - q_offsets[:-1]
        k_len = kv_offsets[1:] - kv_offsets[:-1]
        i = torch.arange(qp.shape[2], device=q.device)
        j = torch.arange(kp.shape[2], device=q.device)
        shift = (k_len - q_len)[:, None, None]
        mask = mask & (j[None, None, :] <= i[None, :, None] + shift)[:, None]
    mask = mask.expand(scores.shape)
    has_key = mask.any(dim=-1, keepdim=True)
    # Rows without a visible key are computed on zeros and then zeroed, so autograd sees no inf - inf.
    scores = torch.where(has_key, scores.masked_fill(~mask, float("-inf")), torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse) * has_key
    out = torch.matmul(probs, vp)  # [B, H, Lq, Dh]
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf"))).squeeze(-1)  # [B, H, Lq]

    out = unpad_jagged(out.permute(0, 2, 1, 3), q_valid)
    lse = unpad_jagged(lse.permute(0, 2, 1), q_valid)
    return out.to(q.dtype), lse.to(torch.float32)
