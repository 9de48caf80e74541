"""Attention modules over jagged token streams, all running on :func:`lattice.ops.jagged_attention`.

- :class:`JaggedMultiheadAttention`: projections (bias-free option), QK-norm, rotary position
  embeddings over per-sample positions, output projection; queries and keys are jagged (or dense, as the
  case ``offsets = n * arange(B + 1)``).
- :class:`PMA`: pooling by multi-head attention: learned seed queries attend over each sample's sequence.
- :class:`InterleavedCrossAttention`: one layer's two-way exchange between a few summary tokens per
  sample and that sample's sequence tokens.

Shapes: a jagged stream is ``values [N, d]`` with ``offsets [B + 1]`` (int64); sample b owns rows
``offsets[b]:offsets[b + 1]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from lattice.nn.norms import RMSNorm
from lattice.ops import jagged_attention

__all__ = ["RotaryEmbedding", "JaggedMultiheadAttention", "PMA", "InterleavedCrossAttention", "positions_from_offsets"]


def positions_from_offsets(offsets: Tensor, total: int) -> Tensor:
    """``[total]`` int64 position of every row within its sample (0 = oldest)."""
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def _dense_offsets(batch: int, n: int, device) -> Tensor:
    return torch.arange(batch + 1, device=device, dtype=torch.int64) * n


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) over the last dim of ``x [N, H, Dh]`` at integer ``positions [N]``.

    Rotates pairs ``(x[..., i], x[..., i + Dh/2])`` by ``position * base^(-2i/Dh)``; an odd last
    channel is left as is. Relative: ``<rope(q, m), rope(k, n)>`` depends only on ``m - n``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        half = head_dim // 2
        inv_freq = base ** (-torch.arange(half, dtype=torch.float32) / max(half, 1))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        half = self.head_dim // 2
        if half == 0:
            return x
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [N, half]
        cos = angles.cos()[:, None, :].to(x.dtype)
        sin = angles.sin()[:, None, :].to(x.dtype)
        x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


class JaggedMultiheadAttention(nn.Module):
    """Multi-head attention from a jagged query stream to a jagged key/value stream of the same samples.

    Args:
        embed_dim: query (and output) width d; must be divisible by ``num_heads``.
        num_heads: H.
        bias: biases in the four projections.
        qk_norm: RMS-normalize queries and keys per head before the dot product (stabilizes training).
        rope: rotary position embeddings on queries and keys (at their positions in their sample).
        kdim: width of the key/value stream (default ``embed_dim``).
        dropout: dropout on the output projection.

    ``forward(query [Nq, d], query_offsets [B+1], key [Nk, kdim] = query, key_offsets = query_offsets,
    causal=False, query_positions [Nq] = None, key_positions [Nk] = None) -> [Nq, d]``. Positions default to
    the index within the sample. A query whose sample has no keys gets the output projection of zero.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        bias: bool = False,
        qk_norm: bool = False,
        rope: bool = False,
        kdim: Optional[int] = None,
        dropout: float = 0.0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        kdim = kdim or embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(
        self,
        query: Tensor,
        query_offsets: Tensor,
        key: Optional[Tensor] = None,
        key_offsets: Optional[Tensor] = None,
        causal: bool = False,
        query_positions: Optional[Tensor] = None,
        key_positions: Optional[Tensor] = None,
    ) -> Tensor:
        if key is None:
            key, key_offsets = query, query_offsets
            if key_positions is None:
                key_positions = query_positions
        elif key_offsets is None:
            raise ValueError("key_offsets are required when a separate key stream is given")
        if query_offsets.numel() != key_offsets.numel():
            raise ValueError(
                f"query_offsets ({query_offsets.numel() - 1} samples) and key_offsets "
                f"({key_offsets.numel() - 1} samples) disagree"
            )
        H, Dh = self.num_heads, self.head_dim
        q = self.q_proj(query).view(-1, H, Dh)
        k = self.k_proj(key).view(-1, H, Dh)
        v = self.v_proj(key).view(-1, H, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            if query_positions is None:
                query_positions = positions_from_offsets(query_offsets, q.shape[0])
            if key_positions is None:
                key_positions = positions_from_offsets(key_offsets, k.shape[0])
            q, k = self.rotary(q, query_positions), self.rotary(k, key_positions)
        out, _ = jagged_attention(q.contiguous(), query_offsets, k.contiguous(), v.contiguous(), key_offsets,
                                  Dh ** -0.5, causal)
        return self.dropout(self.out_proj(out.reshape(-1, H * Dh)))


class PMA(nn.Module):
    """Pooling by multi-head attention: ``num_seeds`` learned queries attend over each sample's sequence.

    ``forward(values [N, d], offsets [B+1]) -> [B, num_seeds, d]``. A sample with an empty sequence gets
    the learned seeds themselves (the residual), never NaN.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_seeds: int, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_seeds = num_seeds
        self.seeds = nn.Parameter(torch.randn(num_seeds, embed_dim) * embed_dim**-0.5)
        self.attn = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)

    def forward(self, values: Tensor, offsets: Tensor) -> Tensor:
        batch = offsets.numel() - 1
        queries = self.seeds.unsqueeze(0).expand(batch, -1, -1).reshape(batch * self.num_seeds, -1)
        query_offsets = _dense_offsets(batch, self.num_seeds, values.device)
        pooled = self.attn(queries, query_offsets, values, offsets)
        return (queries + pooled).view(batch, self.num_seeds, -1)


class InterleavedCrossAttention(nn.Module):
    """The two-way exchange of one interleaved layer.

    ``forward(summary [B, n, d], sequence [N, d], offsets [B+1]) -> (summary_update [B, n, d],
    sequence_update [N, d])``: the summary tokens attend to their sample's sequence tokens (non-seq → seq)
    and the sequence tokens attend to their sample's summary tokens (seq → non-seq). Both attentions see the
    inputs as given (a simultaneous exchange); the updates are returned without the residual so the caller
    chooses its norm/residual arrangement (LatticeNetwork adds them to pre-norm inputs).
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.summary_to_sequence = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)
        self.sequence_to_summary = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)

    def forward(self, summary: Tensor, sequence: Tensor, offsets: Tensor) -> Tuple[Tensor, Tensor]:
        batch, n, d = summary.shape
        flat = summary.reshape(batch * n, d)
        summary_offsets = _dense_offsets(batch, n, summary.device)
        summary_update = self.summary_to_sequence(flat, summary_offsets, sequence, offsets).view(batch, n, d)
        sequence_update = self.sequence_to_summary(sequence, offsets, flat, summary_offsets)
        return summary_update, sequence_update
