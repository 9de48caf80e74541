"""InterFormer (Zeng et al., arXiv 2411.09852): heterogeneous interaction learning with bidirectional
information flow between the non-sequence and the sequence side.

Per layer l, with non-sequence tokens ``X`` and the sequence stream ``S`` (CLS tokens in front):

- Cross Arch: ``X_sum = gate(MLP(X))`` (k tokens) and ``S_sum = gate(CLS ‖ PMA(S) ‖ recent(S))``
  (4 CLS, 2 PMA, 2 most-recent tokens by default);
- Interaction Arch: ``X ← DHEN(X ‖ S_sum)`` (dot-product and DCNv2 modules, LayerNorm);
- Sequence Arch: ``S ← MHA(PFFN(X_sum, S))`` — a personalized FFN gated by the non-sequence summary,
  then multi-head self-attention over each sample's jagged stream.

The output reads ``X ‖ S_sum`` after the last layer. Differences from the paper: the PFFN gates the
FFN's hidden units with ``X_sum`` instead of generating a d×d matrix per sample (same role, O(hidden)
cost), and the attention is the jagged kernel rather than padded MHA.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.data.schema import SchemaLike
from lattice.models.base import LatticeModel
from lattice.nn.fusion import FusionBlock
from lattice.nn.linear import MLP
from lattice.nn.processors import ProcessedFeatures
from lattice.nn.sequence import SelfGate, SequenceBlock, SequenceSummary, prepend_tokens

__all__ = ["InterFormer"]


class InterFormer(LatticeModel):
    """InterFormer. See the module docstring.

    Args (besides :class:`~lattice.models.LatticeModel`'s):
        num_layers, num_heads: depth and attention heads.
        dot_tokens, dcn_tokens, lcb_tokens, fm_tokens: tokens of each DHEN module per layer.
        dcn_layers, dcn_rank: the DCNv2 module's depth and rank.
        summary_tokens: k, the non-sequence summary tokens; summary_hidden_dims: its MLP.
        num_cls, num_pma, num_recent: the sequence summary (defaults 4, 2, 2 as in the paper).
        ffn_multiplier: PFFN hidden width = ``ffn_multiplier * dim``.
        rope, qk_norm: attention options (off by default, as in the paper).
        norm: the interaction blocks' output norm (LayerNorm by default).
        representation_dim: width of the final representation. bias: trunk biases.
        untied_layers: layers untied per domain.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 32,
        num_layers: int = 2,
        num_heads: int = 2,
        dot_tokens: int = 8,
        dcn_tokens: int = 8,
        lcb_tokens: int = 0,
        fm_tokens: int = 0,
        dcn_layers: int = 1,
        dcn_rank: int | None = 32,
        summary_tokens: int = 2,
        summary_hidden_dims: Sequence[int] = (128,),
        num_cls: int = 4,
        num_pma: int = 2,
        num_recent: int = 2,
        ffn_multiplier: int = 2,
        rope: bool = False,
        qk_norm: bool = False,
        norm: str = "layer",
        representation_dim: int = 128,
        bias: bool = True,
        untied_layers: Sequence[int] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.summary_tokens = summary_tokens
        untied = set(untied_layers)
        has_seq = self.processor.has_sequence
        n0 = self.num_tokens
        m = dot_tokens + dcn_tokens + lcb_tokens + fm_tokens
        self.cls = nn.Parameter(torch.randn(num_cls, dim) * 0.02) if has_seq and num_cls > 0 else None
        self.x_summary = nn.ModuleList()
        self.x_gate = nn.ModuleList()
        self.seq_blocks = nn.ModuleList()
        self.seq_summaries = nn.ModuleList()
        self.interactions = nn.ModuleList()
        n_in = n0
        for layer in range(num_layers + (1 if has_seq else 0)):
            last = layer == num_layers
            untie = self._untie(layer in untied)
            s_tokens = 0
            if has_seq:
                summary = SequenceSummary(dim, num_heads, num_cls, num_pma, num_recent, True, qk_norm, bias, **untie)
                self.seq_summaries.append(summary)
                s_tokens = summary.num_tokens
            if last:
                break  # the extra summary reads the final stream
            if has_seq:
                self.x_summary.append(MLP(n_in * dim, summary_hidden_dims, summary_tokens * dim, bias=bias, **untie))
                self.x_gate.append(SelfGate(dim, **untie))
                self.seq_blocks.append(
                    SequenceBlock(
                        dim, num_heads, summary_tokens, ffn_multiplier * dim, exchange=False, rope=rope,
                        qk_norm=qk_norm, bias=bias, norm="layer", activation="relu", ffn_first=True, **untie,
                    )
                )
            self.interactions.append(
                FusionBlock(
                    n_in + s_tokens, dim, fm_tokens=fm_tokens, lcb_tokens=lcb_tokens, dot_tokens=dot_tokens,
                    dcn_tokens=dcn_tokens, dcn_layers=dcn_layers, dcn_rank=dcn_rank, bias=bias, norm=norm,
                    activation="relu", **untie,
                )
            )
            n_in = m
        final_tokens = m + (self.seq_summaries[-1].num_tokens if has_seq else 0)
        self.final = MLP(final_tokens * dim, (), representation_dim, bias=bias, final_activation=True,
                         activation="relu")
        self._build_heads(representation_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        domain = batch.domain
        x = features.tokens
        B = x.shape[0]
        stream = features.sequence
        if stream is not None and self.cls is not None:
            stream = prepend_tokens(stream, self.cls.unsqueeze(0).expand(B, -1, -1).to(x.dtype))
        for layer in range(self.num_layers):
            if stream is None:
                x = self.interactions[layer](x, domain)
                continue
            s_sum = self.seq_summaries[layer](stream, domain)
            x_sum = self.x_summary[layer](x.flatten(1), domain).view(B, self.summary_tokens, self.dim)
            x_sum = self.x_gate[layer](x_sum, domain)
            x = self.interactions[layer](torch.cat([x, s_sum], dim=1), domain)
            stream, _ = self.seq_blocks[layer](stream, x_sum, domain)
        if stream is not None:
            x = torch.cat([x, self.seq_summaries[-1](stream, domain)], dim=1)
        rep = self.final(x.flatten(1))
        return rep, rep

    def trunk_flops(self, events: float) -> float:
        tokens = events + (self.cls.shape[0] if self.cls is not None else 0)
        total = 0.0
        for layer in range(self.num_layers):
            total += self.interactions[layer].flops()
            if self.seq_blocks:
                total += self.seq_summaries[layer].flops(tokens)
                total += self.x_summary[layer].flops() + self.x_gate[layer].flops(self.summary_tokens)
                total += self.seq_blocks[layer].flops(tokens)
        if self.seq_blocks:
            total += self.seq_summaries[-1].flops(tokens)
        return total + self.final.flops()
