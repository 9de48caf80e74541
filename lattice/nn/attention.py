"""Attention modules over jagged token streams, built on :func:`lattice.ops.jagged_attention`.

- :class:`JaggedMultiheadAttention` — multi-head attention where sample b's queries see only sample
  b's keys: self-attention over each sample's sequence, or cross-attention between two streams;
  bias-free option, QK-norm, rotary position embeddings (RoPE) over positions within the sample.
- :class:`PMA` — pooling by multi-head attention: learned seed queries attend to each sample's tokens.
- :class:`InterleavedCrossAttention` — the two-way exchange of one interleaved layer: summary tokens
  attend to the sequence, and the sequence attends to the summary tokens.

A stream is ``values [N, d]`` with ``offsets [B + 1]`` (int64): sample b owns rows
``offsets[b]:offsets[b+1]``. Nothing is padded; a sample without keys gets a zero attention output
(and zero gradients), never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lattice.nn.norms import RMSNorm, rms_norm
from lattice.ops.attention import jagged_attention_output

__all__ = ["rope_table", "apply_rope", "RotaryEmbedding", "positions_from_offsets", "JaggedMultiheadAttention", "PMA", "InterleavedCrossAttention"]


def _positions(offsets: Tensor, total: int) -> Tensor:
    lengths = offsets[1:] - offsets[:-1]
    starts = torch.repeat_interleave(offsets[:-1], lengths, output_size=total)
    return torch.arange(total, device=offsets.device) - starts


def positions_from_offsets(offsets: Tensor, total: int) -> Tensor:
    """``[total]`` int64 position of every row within its sample (0 = oldest)."""
    return _positions(offsets, total)


def rope_table(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``[N, 1, head_dim]`` float32, for :func:`apply_rope`: channel pair ``(i, i + Dh/2)`` of
    row n turns by ``positions[n] * base**(-2i/Dh)``. ``sin`` carries the rotation's sign (negative on the first
    half) and an odd last channel has ``cos = 1, sin = 0``, so ``apply_rope`` is ``x * cos + swap(x) * sin``. A
    model computes it once per stream and passes it to every self-attention over that stream (``rotary=``)."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / max(half, 1))
    angle = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [N, half]
    cos, sin = angle.cos(), angle.sin()
    parts_cos, parts_sin = [cos, cos], [-sin, sin]
    if head_dim % 2:
        parts_cos.append(torch.ones_like(cos[:, :1]))
        parts_sin.append(torch.zeros_like(sin[:, :1]))
    return torch.cat(parts_cos, -1).unsqueeze(1), torch.cat(parts_sin, -1).unsqueeze(1)


def _swap_halves(x: Tensor) -> Tensor:
    """``[x2, x1, (x_last)]`` of ``x = [x1, x2, (x_last)]`` along the last dim (halves of ``Dh // 2``)."""
    half = x.shape[-1] // 2
    return torch.cat([x[..., half : 2 * half], x[..., :half], x[..., 2 * half :]], dim=-1)


def apply_rope(
    x: Tensor, positions: Tensor | None = None, base: float = 10000.0, table: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Rotary position embedding: rotates channel pairs ``(i, i + Dh/2)`` of ``x [N, H, Dh]`` by
    ``positions[n] * base**(-2i/Dh)`` (or by a precomputed :func:`rope_table`). Scores of rotated q and
    k then depend on positions only through their difference. An odd last channel is left as is.

    Why the swapped-halves form: ``x * cos + swap(x) * sin`` is three element-wise kernels and a cat, against
    the pairwise form's six and a cat (and half as many autograd nodes); the tables carry the signs."""
    dh = x.shape[-1]
    if dh // 2 == 0:
        return x
    cos, sin = table if table is not None else rope_table(positions, dh, base)
    xf = x.float()
    return torch.addcmul(xf * cos, _swap_halves(xf), sin).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """:func:`apply_rope` as a module: ``forward(x [N, H, Dh], positions [N], table=None) -> [N, H, Dh]``."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, x: Tensor, positions: Tensor | None = None, table: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return apply_rope(x, positions, self.base, table)


class JaggedMultiheadAttention(nn.Module):
    """Multi-head attention over jagged streams.

    Args:
        embed_dim: d (query width and output width); must be divisible by ``num_heads``.
        num_heads: H.
        kdim: key/value input width (default d).
        bias: biases in the q/k/v/output projections.
        qk_norm: RMS-normalize every head's queries and keys (learned scale) before the scores.
        rope: rotate queries and keys by their positions within the sample (RoPE).
        rope_base: RoPE's base.

    ``forward(query [Nq, d], query_offsets [B+1], key=None, key_offsets=None, causal=False,
    query_positions=None, key_positions=None, rotary=None) -> [Nq, d]``. Without ``key`` it is
    self-attention (``key = query``). Positions default to the index within the sample (0 = first
    token); ``rotary`` is a precomputed :func:`rope_table` of the stream's positions (self-attention),
    which a model computes once for all its layers.
    ``causal`` aligns each sample's last query with its last key.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int | None = None,
        bias: bool = False,
        qk_norm: bool = False,
        rope: bool = False,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim or embed_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.rope = rope
        self.rope_base = rope_base
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rope else None

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)

    @staticmethod
    def _cat_bias(*projections: nn.Linear) -> Tensor | None:
        return None if projections[0].bias is None else torch.cat([p.bias for p in projections])

    def _qk_norm_weight(self) -> Tensor:
        """``[2H, Dh]``: the q norm's scale for the first H heads of a joint ``[N, 2H, Dh]``, the k norm's after."""
        H = self.num_heads
        return torch.cat([self.q_norm.weight.expand(H, -1), self.k_norm.weight.expand(H, -1)])

    def _rotate_apart(self, q, k, query_offsets, key_offsets, query_positions, key_positions):
        """RoPE of q and k by their own positions (cross-attention, or self-attention given distinct positions)."""
        if query_positions is None:
            query_positions = _positions(query_offsets, q.shape[0])
        if key_positions is None:
            key_positions = _positions(key_offsets, k.shape[0])
        return self.rotary(q, query_positions), self.rotary(k, key_positions)

    def forward(
        self,
        query: Tensor,
        query_offsets: Tensor,
        key: Tensor | None = None,
        key_offsets: Tensor | None = None,
        causal: bool = False,
        query_positions: Tensor | None = None,
        key_positions: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        self_attention = key is None
        if self_attention:
            key, key_offsets = query, query_offsets
            if key_positions is None:
                key_positions = query_positions
        elif key_offsets is None:
            raise ValueError("key_offsets are required when a separate key stream is given (cross-attention)")
        if query_offsets.numel() != key_offsets.numel():
            raise ValueError(
                f"query_offsets ({query_offsets.numel() - 1} samples) and key_offsets "
                f"({key_offsets.numel() - 1} samples) disagree"
            )
        H = self.num_heads
        if self_attention:
            # one [N, 3d] matmul for q, k and v instead of three [N, d] ones (and one in each backward)
            qkv = F.linear(query, torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                           self._cat_bias(self.q_proj, self.k_proj, self.v_proj))
            qkv = qkv.view(qkv.shape[0], 3 * H, self.head_dim)
            qk, v = qkv.split([2 * H, H], dim=1)  # split, not slices: its backward is one cat, no zero fill
            if self.q_norm is not None:  # q and k normalized in one pass, each head by its own scale
                qk = rms_norm(qk, self._qk_norm_weight(), self.q_norm.eps)
            if self.rope and rotary is None and key_positions is not query_positions:
                q, k = self._rotate_apart(*qk.split(H, dim=1), query_offsets, key_offsets, query_positions,
                                          key_positions)
            else:
                if self.rope:  # q and k rotated in one pass by one table
                    if rotary is None:
                        if query_positions is None:
                            query_positions = _positions(query_offsets, qk.shape[0])
                        rotary = rope_table(query_positions, self.head_dim, self.rope_base)
                    qk = self.rotary(qk, table=rotary)
                q, k = qk.split(H, dim=1)
        else:
            q = self._heads(self.q_proj(query))
            kv = F.linear(key, torch.cat([self.k_proj.weight, self.v_proj.weight]),
                          self._cat_bias(self.k_proj, self.v_proj))
            kv = kv.view(kv.shape[0], 2 * H, self.head_dim)
            k, v = kv.split(H, dim=1)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rope:
                q, k = self._rotate_apart(q, k, query_offsets, key_offsets, query_positions, key_positions)
        v = v.to(q.dtype)
        k = k.to(q.dtype)
        # On CUDA the backend (our kernel, varlen_attn, padded SDPA) is picked per call: lattice.ops.attention.
        out = jagged_attention_output(
            q.contiguous(), query_offsets.long(), k.contiguous(), v.contiguous(), key_offsets.long(),
            self.head_dim**-0.5, causal,
        )
        return self.out_proj(out.reshape(out.shape[0], self.embed_dim))

    def flops(self, n_q: float, n_kv: float) -> float:
        """Multiply-add FLOPs for ``n_q`` queries over ``n_kv`` keys of one sample."""
        d = self.embed_dim
        return 2.0 * d * (2 * n_q * d + 2 * n_kv * self.kdim) + 4.0 * n_q * n_kv * d


class PMA(nn.Module):
    """Pooling by multi-head attention: ``num_seeds`` learned queries attend to each sample's tokens.

    Shape: ``x [N, d]``, ``offsets [B + 1]`` -> ``[B, num_seeds, d]``. The seeds are a residual (as in the Set
    Transformer's PMA), so a sample without tokens pools to the learned seeds themselves, never NaN.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_seeds: int, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_seeds = num_seeds
        self.seeds = nn.Parameter(torch.randn(num_seeds, embed_dim) * embed_dim**-0.5)
        self.attn = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        B = offsets.numel() - 1
        queries = self.seeds.to(x.dtype).repeat(B, 1)
        q_offsets = torch.arange(B + 1, device=x.device, dtype=torch.long) * self.num_seeds
        return (queries + self.attn(queries, q_offsets, x, offsets)).view(B, self.num_seeds, -1)

    def flops(self, tokens: float) -> float:
        return self.attn.flops(self.num_seeds, tokens)


class InterleavedCrossAttention(nn.Module):
    """The two-way exchange between a few summary tokens and a sequence, per sample.

    ``summary [B, n, d]`` attends to the sample's sequence tokens (non-seq -> seq: e.g. the target item
    looking up related history), and every sequence token attends to the sample's ``n`` summary tokens
    (seq -> non-seq: personalizing the sequence). Returns the two attention outputs (the updates; the
    caller adds residuals): ``(summary_update [B, n, d], sequence_update [N, d])``. A sample with an
    empty sequence gets a zero summary update.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        self.summary_to_sequence = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)
        self.sequence_to_summary = JaggedMultiheadAttention(embed_dim, num_heads, bias=bias, qk_norm=qk_norm)

    def forward(self, summary: Tensor, sequence: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        B, n, d = summary.shape
        flat = summary.reshape(B * n, d)
        s_offsets = torch.arange(B + 1, device=summary.device, dtype=torch.long) * n
        new_summary = self.summary_to_sequence(flat, s_offsets, sequence, offsets).view(B, n, d)
        new_sequence = self.sequence_to_summary(sequence, offsets, flat, s_offsets)
        return new_summary, new_sequence

    def flops(self, summary_tokens: float, tokens: float) -> float:
        return self.summary_to_sequence.flops(summary_tokens, tokens) + self.sequence_to_summary.flops(
            tokens, summary_tokens
        )
