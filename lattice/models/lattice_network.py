"""LatticeNetwork: the default lattice model (after Meta's Lattice, arXiv 2512.09200).

L interleaved layers over two streams, the non-sequence tokens ``X [B, n, d]`` and each sample's
behaviour sequence ``S`` (jagged, with ``num_cls`` CLS tokens in front):

1. non-sequence summary ``X_sum = gate(LCB(X))`` — k tokens handed to the sequence side;
2. sequence block (:class:`~lattice.nn.SequenceBlock`): jagged self-attention with RoPE and QK-norm,
   two-way exchange through :class:`~lattice.nn.attention.InterleavedCrossAttention` (``X_sum`` attends
   to the sequence — target-aware attention — and the sequence attends to ``X_sum``), and a personalized
   FFN gated by ``X_sum``;
3. sequence summary ``Sum = gate(CLS, PMA, most-recent tokens)``;
4. DWFB (Wukong FM + linear compression, optional DHEN dot/DCN modules, SwishRMSNorm) over
   ``concat(X + ECS, Sum, X_sum)`` -> the next ``X``; the extended context store adds a learned
   projection of all earlier ``X`` (DenseNet-style).

Bias-free throughout (the heads keep their output bias); chosen layers can be untied per domain
(``untied_layers``); the last layer's tokens are flattened and projected into the representation the
multi-task (Zipper) heads read.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.data.schema import SchemaLike
from lattice.models.base import LatticeModel
from lattice.nn.attention import rope_table
from lattice.nn.context import ExtendedContextStore
from lattice.nn.fusion import FusionBlock
from lattice.nn.linear import MLP, DomainLinear
from lattice.nn.processors import ProcessedFeatures
from lattice.nn.sequence import SelfGate, SequenceBlock, SequenceSummary, prepend_tokens

__all__ = ["LatticeNetwork"]


class LatticeNetwork(LatticeModel):
    """The Lattice network. See the module docstring for the layer structure.

    Args (besides :class:`~lattice.models.LatticeModel`'s):
        num_layers: L.
        num_heads: attention heads (``dim`` must be divisible by it).
        fm_tokens, lcb_tokens, dot_tokens, dcn_tokens: tokens of each DWFB module per layer; the
            non-sequence stream has ``fm + lcb + dot + dcn`` tokens after the first layer.
        fm_rank, fm_hidden_dims: the FM block's rank k and MLP hidden sizes.
        summary_tokens: k, the non-sequence summary tokens handed to the sequence side.
        num_cls, num_pma, num_recent: the sequence summary's CLS, PMA and most-recent tokens.
        ffn_multiplier: hidden width of the personalized FFN = ``ffn_multiplier * dim``.
        exchange: two-way exchange through InterleavedCrossAttention in every sequence block.
        exchange_scale: initial LayerScale of the sequence side of the exchange (``None``: unscaled).
        rope, qk_norm, causal: attention options of the sequence self-attention.
        ecs: use the extended context store.
        norm: DWFB output norm (default ``"swish_rms"``); the sequence blocks use RMSNorm pre-norms.
        untied_layers: indices of layers whose DWFB, summary gates and FFN get one weight copy per
            domain (group).
        representation_dim: width of the final representation (heads' input).
        dropout: dropout on the input tokens, every DWFB output and the final representation.
        bias: biases in the trunk's linears.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        fm_tokens: int = 8,
        lcb_tokens: int = 8,
        dot_tokens: int = 0,
        dcn_tokens: int = 0,
        fm_rank: int = 8,
        fm_hidden_dims: Sequence[int] = (128,),
        summary_tokens: int = 2,
        num_cls: int = 2,
        num_pma: int = 2,
        num_recent: int = 2,
        ffn_multiplier: int = 2,
        exchange: bool = True,
        exchange_scale: float | None = 0.1,
        rope: bool = True,
        qk_norm: bool = True,
        causal: bool = False,
        ecs: bool = True,
        norm: str = "swish_rms",
        untied_layers: Sequence[int] = (),
        representation_dim: int = 128,
        dropout: float = 0.0,
        bias: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        bad = [i for i in untied_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"untied_layers {list(untied_layers)} must lie in [0, {num_layers})")
        self.num_layers = num_layers
        self.num_cls = num_cls
        self.rope = rope
        self.head_dim = dim // num_heads
        self.untied_layers = sorted(set(untied_layers))
        has_seq = self.processor.has_sequence
        n0 = self.num_tokens
        m = fm_tokens + lcb_tokens + dot_tokens + dcn_tokens
        self.stream_tokens = [n0] + [m] * num_layers

        self.cls = nn.Parameter(torch.randn(num_cls, dim) * 0.02) if has_seq and num_cls > 0 else None
        self.summary_proj = nn.ModuleList()
        self.summary_gate = nn.ModuleList()
        self.seq_blocks = nn.ModuleList()
        self.seq_summaries = nn.ModuleList()
        self.fusions = nn.ModuleList()
        for layer in range(num_layers):
            untie = self._untie(layer in self.untied_layers)
            n_in = self.stream_tokens[layer]
            extra = 0
            if has_seq:
                self.summary_proj.append(DomainLinear(n_in, summary_tokens, bias=bias, **untie))
                self.summary_gate.append(SelfGate(dim, **untie))
                self.seq_blocks.append(
                    SequenceBlock(
                        dim, num_heads, summary_tokens, ffn_multiplier * dim, exchange=exchange, rope=rope,
                        qk_norm=qk_norm, bias=bias, causal=causal, exchange_scale=exchange_scale, **untie,
                    )
                )
                summary = SequenceSummary(
                    dim, num_heads, num_cls, num_pma, num_recent, gate=True, qk_norm=qk_norm, bias=bias, **untie
                )
                self.seq_summaries.append(summary)
                extra = summary.num_tokens + summary_tokens
            self.fusions.append(
                FusionBlock(
                    n_in + extra, dim, fm_tokens, lcb_tokens, dot_tokens, dcn_tokens, fm_rank, fm_hidden_dims,
                    bias=bias, norm=norm, **untie,
                )
            )
        self.ecs = (
            ExtendedContextStore(dim, self.stream_tokens[:-1], self.stream_tokens[:-1], bias=bias)
            if ecs and num_layers > 1
            else None
        )
        self.final = MLP(m * dim, (), representation_dim, bias=bias, final_activation=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._build_heads(representation_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        domain = batch.domain
        x = self.dropout(features.tokens)
        stream = features.sequence
        if stream is not None and self.cls is not None:
            stream = prepend_tokens(stream, self.cls.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype))
        rotary = rope_table(stream.positions, self.head_dim) if stream is not None and self.rope else None
        context = [x]
        for layer in range(self.num_layers):
            if self.ecs is not None and layer > 0:
                x = x + self.ecs.read(layer, context)
            parts = [x]
            if stream is not None:
                x_sum = self.summary_gate[layer](
                    self.summary_proj[layer](x.transpose(1, 2), domain).transpose(1, 2), domain
                )
                stream, x_sum = self.seq_blocks[layer](stream, x_sum, domain, rotary)
                parts += [self.seq_summaries[layer](stream, domain), x_sum]
            x = self.dropout(self.fusions[layer](torch.cat(parts, dim=1) if len(parts) > 1 else x, domain))
            context.append(x)
        rep = self.final(x.flatten(1))
        return self.dropout(rep), rep

    def trunk_flops(self, events: float) -> float:
        total = 0.0
        tokens = events + (self.num_cls if self.cls is not None else 0)
        for layer in range(self.num_layers):
            if self.ecs is not None and layer > 0:
                total += self.ecs.flops(layer)
            if self.seq_blocks:
                total += self.summary_proj[layer].flops(self.dim) + self.summary_gate[layer].flops(
                    self.summary_proj[layer].out_features
                )
                total += self.seq_blocks[layer].flops(tokens) + self.seq_summaries[layer].flops(tokens)
            total += self.fusions[layer].flops()
        return total + self.final.flops()
