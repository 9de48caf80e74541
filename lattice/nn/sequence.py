"""Blocks over jagged sequence streams: token gathering (CLS / most-recent), jagged pooling, the
personalized FFN, the sequence summary (CLS + PMA + most-recent tokens, gated) and the Transformer block
with the two-way exchange used by LatticeNetwork.

A stream is a :class:`~lattice.nn.processors.JaggedTokens`: ``values [N, d]``, ``offsets [B + 1]``,
``positions [N]``. Nothing here loops over samples or pads to the longest sequence.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lattice.nn.attention import InterleavedCrossAttention, JaggedMultiheadAttention, PMA
from lattice.nn.linear import Dispatch, DomainLinear, make_activation
from lattice.nn.norms import make_norm
from lattice.nn.processors import JaggedTokens, ProcessedFeatures
from lattice.sparse import jagged_positions, jagged_row_ids

__all__ = [
    "prepend_tokens",
    "gather_first",
    "gather_recent",
    "jagged_mean",
    "tokens_with_sequence_mean",
    "row_ids",
    "SelfGate",
    "PersonalizedFFN",
    "SequenceSummary",
    "SequenceBlock",
    "attention_flops",
]


def row_ids(offsets: Tensor, total: int) -> Tensor:
    """``[total]`` sample index of every token of a stream with row starts ``offsets [B + 1]``."""
    return jagged_row_ids(offsets[1:] - offsets[:-1], total)


def prepend_tokens(stream: JaggedTokens, tokens: Tensor) -> JaggedTokens:
    """Puts ``tokens [B, c, d]`` in front of each sample's tokens: ``[c + L_b]`` tokens per sample."""
    B, c, d = tokens.shape
    n = stream.values.shape[0]
    lengths = stream.lengths
    new_offsets = torch.cat([stream.offsets.new_zeros(1), torch.cumsum(lengths + c, 0)])
    rows = row_ids(stream.offsets, n)
    dest_events = new_offsets[:-1][rows] + c + (torch.arange(n, device=tokens.device) - stream.offsets[:-1][rows])
    dest_cls = (new_offsets[:-1].unsqueeze(1) + torch.arange(c, device=tokens.device)).reshape(-1)
    total = n + B * c
    src = torch.cat([tokens.reshape(B * c, d).to(stream.values.dtype), stream.values])
    out = src.new_zeros(total, d).index_copy(0, torch.cat([dest_cls, dest_events]), src)
    return JaggedTokens(out, new_offsets, jagged_positions(new_offsets, total))


def gather_first(stream: JaggedTokens, count: int) -> Tensor:
    """The first ``count`` tokens of every sample (which must have at least that many): ``[B, count, d]``."""
    idx = stream.offsets[:-1].unsqueeze(1) + torch.arange(count, device=stream.offsets.device)
    return stream.values[idx]


def gather_recent(stream: JaggedTokens, count: int, pad: Tensor, skip_first: int = 0) -> Tensor:
    """The last ``count`` tokens of every sample, most recent first: ``[B, count, d]``.

    Slots a sample cannot fill (fewer than ``count`` tokens after its first ``skip_first``) take the
    matching row of ``pad [count, d]``.
    """
    B = stream.batch_size
    j = torch.arange(count, device=stream.offsets.device)
    idx = stream.offsets[1:].unsqueeze(1) - 1 - j  # [B, count]
    valid = j.unsqueeze(0) < (stream.lengths - skip_first).unsqueeze(1)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    got = stream.values[idx] if stream.values.shape[0] > 0 else pad.new_zeros(B, count, pad.shape[-1])
    return torch.where(valid.unsqueeze(-1), got, pad.unsqueeze(0).to(got.dtype))


def jagged_mean(stream: JaggedTokens) -> Tensor:
    """Mean of every sample's tokens ``[B, d]`` (zeros for an empty sample)."""
    B, n = stream.batch_size, stream.values.shape[0]
    rows = row_ids(stream.offsets, n)
    total = stream.values.new_zeros(B, stream.values.shape[-1]).index_add(0, rows, stream.values)
    return total / stream.lengths.clamp(min=1).unsqueeze(1).to(total.dtype)


def tokens_with_sequence_mean(features: ProcessedFeatures) -> Tensor:
    """``[B, n (+1), d]``: the non-sequence tokens and, when there is a sequence, its mean token (the
    flat input of the MLP baselines and the wide path)."""
    if features.sequence is None:
        return features.tokens
    return torch.cat([features.tokens, jagged_mean(features.sequence).unsqueeze(1)], dim=1)


def attention_flops(n_q: float, n_kv: float, dim: int, project_kv: bool = True) -> float:
    """Multiply-add FLOPs of one multi-head attention: q/o projections of ``n_q`` tokens, k/v
    projections of ``n_kv`` tokens, scores and weighted sum."""
    proj = 2.0 * dim * dim * (2 * n_q + (2 * n_kv if project_kv else 0))
    return proj + 4.0 * n_q * n_kv * dim


class SelfGate(nn.Module):
    """``x ⊙ sigmoid(W x)`` per token (InterFormer's gating of summaries). Shape ``[..., d]``."""

    def __init__(self, dim: int, num_domains: int = 1, domain_groups: Sequence[int] | None = None,
                 dispatch: Dispatch = "auto") -> None:
        super().__init__()
        self.dim = dim
        self.proj = DomainLinear(dim, dim, num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return x * torch.sigmoid(self.proj(x, domain))

    def flops(self, tokens: float) -> float:
        return self.proj.flops(tokens)


class PersonalizedFFN(nn.Module):
    """A token-wise FFN over a stream whose hidden units are gated per sample by a context vector
    (the non-sequence summary): ``s + W2(act(W1 norm(s)) ⊙ (1 + C ctx_b))``.

    ``C`` starts small, so the block starts close to a plain FFN and learns how each user's
    non-sequence features should reshape the processing of their behaviour sequence (InterFormer's PFFN, in a form
    that costs O(hidden) per sample instead of a generated d×d matrix).

    Shape: stream ``values [N, d]``, ``context [B, c]`` -> stream with ``values [N, d]``.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        hidden_dim: int,
        activation: str = "silu",
        bias: bool = False,
        norm: str = "rms",
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        untie = dict(num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)
        self.dim, self.hidden_dim, self.context_dim = dim, hidden_dim, context_dim
        self.norm = make_norm(norm, dim)
        self.up = DomainLinear(dim, hidden_dim, bias=bias, **untie)
        self.down = DomainLinear(hidden_dim, dim, bias=bias, **untie)
        self.context = DomainLinear(context_dim, hidden_dim, bias=False, **untie)
        with torch.no_grad():  # small, so the block starts close to a plain FFN
            self.context.weight.mul_(0.1)
        self.act = make_activation(activation)

    def forward(self, stream: JaggedTokens, context: Tensor, domain: Tensor | None = None) -> JaggedTokens:
        n = stream.values.shape[0]
        rows = row_ids(stream.offsets, n)
        tok_domain = None if domain is None else domain[rows]
        gate = 1.0 + self.context(context, domain)  # [B, hidden]
        h = self.act(self.up(self.norm(stream.values), tok_domain)) * gate[rows]
        return stream.replace(stream.values + self.down(h, tok_domain))

    def flops(self, tokens: float) -> float:
        return self.up.flops(tokens) + self.down.flops(tokens) + self.context.flops()


class SequenceSummary(nn.Module):
    """Summary tokens of a stream whose first ``num_cls`` tokens per sample are CLS tokens:
    ``gate(concat(CLS [B, c], PMA [B, p], most-recent [B, r]))`` -> ``[B, c + p + r, d]``.

    Args:
        dim, num_heads: attention width and heads of the PMA.
        num_cls, num_pma, num_recent: tokens of each kind (0 = none).
        gate: apply a :class:`SelfGate` to the summary (InterFormer's gated summaries).
        qk_norm, bias: for the PMA attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_cls: int = 4,
        num_pma: int = 2,
        num_recent: int = 2,
        gate: bool = True,
        qk_norm: bool = True,
        bias: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.num_cls, self.num_pma, self.num_recent = dim, num_cls, num_pma, num_recent
        if self.num_tokens == 0:
            raise ValueError("SequenceSummary needs at least one CLS, PMA or recent token")
        self.pma = PMA(dim, num_heads, num_pma, bias=bias, qk_norm=qk_norm) if num_pma > 0 else None
        self.recent_pad = nn.Parameter(torch.randn(num_recent, dim) * 0.02) if num_recent > 0 else None
        self.gate = SelfGate(dim, num_domains, domain_groups) if gate else None

    @property
    def num_tokens(self) -> int:
        return self.num_cls + self.num_pma + self.num_recent

    def forward(self, stream: JaggedTokens, domain: Tensor | None = None) -> Tensor:
        parts = []
        if self.num_cls > 0:
            parts.append(gather_first(stream, self.num_cls))
        if self.pma is not None:
            parts.append(self.pma(stream.values, stream.offsets))
        if self.recent_pad is not None:
            parts.append(gather_recent(stream, self.num_recent, self.recent_pad, skip_first=self.num_cls))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out if self.gate is None else self.gate(out, domain)

    def flops(self, tokens: float) -> float:
        total = 0.0
        if self.pma is not None:
            total += attention_flops(self.num_pma, tokens, self.dim)
        if self.gate is not None:
            total += self.gate.flops(self.num_tokens)
        return total


class SequenceBlock(nn.Module):
    """One LatticeNetwork/InterFormer sequence layer over a stream and a few non-sequence summary tokens.

    1. self-attention over each sample's stream (pre-norm, residual): jagged, RoPE positions, QK-norm;
    2. optional two-way exchange (:class:`~lattice.nn.attention.InterleavedCrossAttention`): the summary
       tokens attend to the stream and the stream attends to the summary tokens (both residual);
    3. :class:`PersonalizedFFN` conditioned on the (flattened) summary tokens.

    Args:
        dim, num_heads: width and heads. context_tokens: k, the summary tokens per sample.
        ffn_hidden_dim: hidden width of the FFN. exchange: run step 2.
        rope, qk_norm, bias: attention options. norm: pre-norm kind. activation: FFN activation.
        causal: causal self-attention (each event sees only older events and the CLS tokens before it).
        ffn_first: run the personalized FFN before the attention (InterFormer's ``MHA(PFFN(X_sum, S))``).
        exchange_scale: initial value of a learned per-channel scale (LayerScale) on the stream's update
            from the exchange; ``None`` for an unscaled update.
        num_domains, domain_groups: per-domain untying of the FFN.

    Shape: ``(stream [N, d], summary [B, k, d]) -> (stream [N, d], summary [B, k, d])``; ``rotary``: a
    precomputed :func:`~lattice.nn.attention.rope_table` of the stream's positions.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_tokens: int,
        ffn_hidden_dim: int,
        exchange: bool = True,
        rope: bool = True,
        qk_norm: bool = True,
        bias: bool = False,
        norm: str = "rms",
        activation: str = "silu",
        causal: bool = False,
        ffn_first: bool = False,
        exchange_scale: float | None = 0.1,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.context_tokens, self.causal, self.ffn_first = dim, context_tokens, causal, ffn_first
        self.attn_norm = make_norm(norm, dim)
        self.attn = JaggedMultiheadAttention(dim, num_heads, bias=bias, qk_norm=qk_norm, rope=rope)
        if exchange:
            self.exchange_norm_seq = make_norm(norm, dim)
            self.exchange_norm_sum = make_norm(norm, dim)
            self.exchange = InterleavedCrossAttention(dim, num_heads, bias=bias, qk_norm=qk_norm)
            # LayerScale on the sequence side of the exchange: every token of a sample reads the same few
            # summary tokens, so a full-strength update at init washes out what tells the events apart.
            self.exchange_scale = (
                nn.Parameter(torch.full((dim,), float(exchange_scale))) if exchange_scale is not None else None
            )
        else:
            self.exchange = None
        self.ffn = PersonalizedFFN(
            dim, context_tokens * dim, ffn_hidden_dim, activation, bias, norm,
            num_domains=num_domains, domain_groups=domain_groups,
        )

    def forward(
        self,
        stream: JaggedTokens,
        summary: Tensor,
        domain: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[JaggedTokens, Tensor]:
        if self.ffn_first:
            stream = self.ffn(stream, summary.flatten(1), domain)
        x = self.attn_norm(stream.values)
        attn = self.attn(x, stream.offsets, causal=self.causal, query_positions=stream.positions, rotary=rotary)
        stream = stream.replace(stream.values + attn)
        if self.exchange is not None:
            new_sum, new_seq = self.exchange(
                self.exchange_norm_sum(summary), self.exchange_norm_seq(stream.values), stream.offsets
            )
            summary = summary + new_sum
            if self.exchange_scale is not None:
                new_seq = new_seq * self.exchange_scale.to(new_seq.dtype)
            stream = stream.replace(stream.values + new_seq)
        if not self.ffn_first:
            stream = self.ffn(stream, summary.flatten(1), domain)
        return stream, summary

    def flops(self, tokens: float) -> float:
        total = attention_flops(tokens, tokens, self.dim)
        if self.exchange is not None:
            k = self.context_tokens
            total += attention_flops(k, tokens, self.dim) + attention_flops(tokens, k, self.dim)
        return total + self.ffn.flops(tokens)
