"""Baselines that share LatticeNetwork's processors and heads, for like-for-like comparisons.

- :class:`SharedBottom` — one shared MLP, one head per task (Caruana 1997);
- :class:`MMoE` — multi-gate mixture of experts (Ma et al., KDD 2018);
- :class:`PLE` — progressive layered extraction with shared and task-specific experts (Tang et al.,
  RecSys 2020);
- :class:`DLRM` — bottom MLP, pairwise dot-product interactions, top MLP (Naumov et al. 2019);
- :class:`Wukong` — a stack of FM + linear-compression interaction layers (Zhang et al. 2024);
- :class:`LogisticRegression` — a linear model over the same features (the classic ads baseline).

None of them models the sequence beyond one mean-pooled token per sample; the flat input of the MLP
baselines is ``flatten(tokens) ‖ mean(sequence)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.data.schema import SchemaLike
from lattice.models.base import LatticeModel
from lattice.nn.fusion import FusionBlock
from lattice.nn.linear import MLP, DomainLinear
from lattice.nn.processors import ProcessedFeatures
from lattice.nn.sequence import jagged_mean, tokens_with_sequence_mean

__all__ = ["SharedBottom", "MMoE", "PLE", "DLRM", "Wukong", "LogisticRegression"]

class _FlatInputModel(LatticeModel):
    """A baseline whose trunk reads ``flatten(tokens) ‖ mean(sequence)``."""

    def _flat_dim(self) -> int:
        return (self.num_tokens + (1 if self.processor.has_sequence else 0)) * self.dim

    @staticmethod
    def _flat(features: ProcessedFeatures) -> Tensor:
        return tokens_with_sequence_mean(features).flatten(1)


class SharedBottom(_FlatInputModel):
    """Shared-bottom multi-task model: one MLP shared by all tasks, then per-task heads.

    Args:
        bottom_dims: hidden sizes of the shared MLP (its last size is the representation width).
        activation, bias, dropout: of the shared MLP.
        untie_bottom: one copy of the bottom MLP per domain (group).

    The other args are :class:`~lattice.models.LatticeModel`'s.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 16,
        bottom_dims: Sequence[int] = (256, 128),
        activation: str = "relu",
        bias: bool = True,
        dropout: float = 0.0,
        untie_bottom: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if not bottom_dims:
            raise ValueError("SharedBottom needs at least one bottom layer")
        self.bottom = MLP(
            self._flat_dim(), bottom_dims, None, activation=activation, bias=bias, dropout=dropout,
            **self._untie(untie_bottom),
        )
        self._build_heads(self.bottom.out_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        rep = self.bottom(self._flat(features), batch.domain)
        return rep, rep

    def trunk_flops(self, events: float) -> float:
        return self.bottom.flops()


class _Experts(nn.Module):
    """E expert MLPs of equal shape, evaluated together: ``[B, in] -> [B, E, out]``."""

    def __init__(self, num_experts: int, in_dim: int, dims: Sequence[int], activation: str, bias: bool) -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            [MLP(in_dim, dims, None, activation=activation, bias=bias) for _ in range(num_experts)]
        )
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        # The first layers, which read the wide flat input, run as one GEMM over the experts' stacked weights:
        # one larger matmul forward and one input-gradient matmul backward, instead of E of each and E - 1
        # adds of [B, in]. The parameters stay per expert (same checkpoint keys).
        first = [e.layers[0] for e in self.experts]
        weight = torch.cat([layer.weight[0] for layer in first])
        bias = None if first[0].bias is None else torch.cat([layer.bias[0] for layer in first])
        hidden = F.linear(x, weight, bias).split(first[0].out_features, dim=1)
        outs = []
        for expert, h in zip(self.experts, hidden):
            h = expert.posts[0](h)
            for layer, post in zip(expert.layers[1:], expert.posts[1:]):
                h = post(layer(h))
            outs.append(h)
        return torch.stack(outs, dim=1)

    def flops(self) -> float:
        return sum(e.flops() for e in self.experts)


class MMoE(_FlatInputModel):
    """Multi-gate mixture of experts: shared experts, one softmax gate per task.

    Args:
        num_experts: E. expert_dims: hidden sizes of every expert (last = expert output width).
        activation, bias: of the experts.
        untie_gates: one copy of the gates per domain (group).

    The other args are :class:`~lattice.models.LatticeModel`'s.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 16,
        num_experts: int = 4,
        expert_dims: Sequence[int] = (128, 64),
        activation: str = "relu",
        bias: bool = True,
        untie_gates: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if not expert_dims or num_experts < 1:
            raise ValueError("MMoE needs num_experts >= 1 and at least one expert layer")
        in_dim = self._flat_dim()
        self.num_tasks = len(self.schema.tasks)
        self.experts = _Experts(num_experts, in_dim, expert_dims, activation, bias)
        self.gates = DomainLinear(in_dim, self.num_tasks * num_experts, bias=True, **self._untie(untie_gates))
        self.num_experts = num_experts
        self._build_heads(self.experts.out_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        x = self._flat(features)
        experts = self.experts(x)  # [B, E, e]
        gates = torch.softmax(self.gates(x, batch.domain).view(-1, self.num_tasks, self.num_experts), dim=-1)
        towers = torch.bmm(gates, experts)  # [B, T, e]
        return towers, towers.mean(1)

    def trunk_flops(self, events: float) -> float:
        e = self.experts.out_dim
        return self.experts.flops() + self.gates.flops() + 2.0 * self.num_tasks * self.num_experts * e


class PLE(_FlatInputModel):
    """Progressive layered extraction: levels of customized gate control (CGC) with shared experts and
    task-specific experts; every level but the last also updates a shared input through its own gate.

    Args:
        num_levels: CGC levels. shared_experts, task_experts: experts per level (shared / per task).
        expert_dims: hidden sizes of every expert (last = expert output width).
        activation, bias: of the experts.

    The other args are :class:`~lattice.models.LatticeModel`'s.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 16,
        num_levels: int = 2,
        shared_experts: int = 2,
        task_experts: int = 1,
        expert_dims: Sequence[int] = (128, 64),
        activation: str = "relu",
        bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if num_levels < 1 or shared_experts < 0 or task_experts < 0 or shared_experts + task_experts < 1:
            raise ValueError("PLE needs num_levels >= 1 and at least one expert per gate")
        if not expert_dims:
            raise ValueError("PLE needs at least one expert layer")
        self.num_tasks = T = len(self.schema.tasks)
        self.num_levels = num_levels
        self.shared_count, self.task_count = shared_experts, task_experts
        e = expert_dims[-1]
        self.levels = nn.ModuleList()
        in_dim = self._flat_dim()
        for level in range(num_levels):
            last = level == num_levels - 1
            mods = nn.ModuleDict()
            if shared_experts:
                mods["shared"] = _Experts(shared_experts, in_dim, expert_dims, activation, bias)
            if task_experts:
                mods["task"] = nn.ModuleList(
                    [_Experts(task_experts, in_dim, expert_dims, activation, bias) for _ in range(T)]
                )
            mods["task_gates"] = nn.ModuleList(
                [nn.Linear(in_dim, task_experts + shared_experts) for _ in range(T)]
            )
            if not last:
                mods["shared_gate"] = nn.Linear(in_dim, T * task_experts + shared_experts)
            self.levels.append(mods)
            in_dim = e
        self.expert_out = e
        self._build_heads(e)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        x = self._flat(features)
        task_in = [x] * self.num_tasks
        shared_in = x
        for mods in self.levels:
            shared = mods["shared"](shared_in) if "shared" in mods else None  # [B, S, e]
            task_out, own_all = [], []
            for t in range(self.num_tasks):
                own = mods["task"][t](task_in[t]) if "task" in mods else None
                pool = [p for p in (own, shared) if p is not None]
                experts = pool[0] if len(pool) == 1 else torch.cat(pool, dim=1)
                gate = torch.softmax(mods["task_gates"][t](task_in[t]), dim=-1)
                task_out.append(torch.bmm(gate.unsqueeze(1), experts).squeeze(1))
                if own is not None:
                    own_all.append(own)
            if "shared_gate" in mods:
                pool = own_all + ([shared] if shared is not None else [])
                experts = torch.cat(pool, dim=1)
                gate = torch.softmax(mods["shared_gate"](shared_in), dim=-1)
                shared_in = torch.bmm(gate.unsqueeze(1), experts).squeeze(1)
            task_in = task_out
        towers = torch.stack(task_in, dim=1)  # [B, T, e]
        return towers, towers.mean(1)

    def trunk_flops(self, events: float) -> float:
        total = 0.0
        T, e = self.num_tasks, self.expert_out
        for mods in self.levels:
            if "shared" in mods:
                total += mods["shared"].flops() * (1 if "shared_gate" in mods else 1)
            if "task" in mods:
                total += sum(m.flops() for m in mods["task"])
            for g in mods["task_gates"]:
                total += 2.0 * g.in_features * g.out_features + 2.0 * g.out_features * e
            if "shared_gate" in mods:
                g = mods["shared_gate"]
                total += 2.0 * g.in_features * g.out_features + 2.0 * g.out_features * e
        return total


class DLRM(LatticeModel):
    """DLRM: a bottom MLP over the dense tokens, pairwise dot products between the bottom vector and
    every other token (sparse features, domain, mean sequence), and a top MLP over
    ``bottom ‖ dots``.

    Args:
        bottom_dims: hidden sizes of the bottom MLP (it ends at ``dim``).
        top_dims: hidden sizes of the top MLP (its last size is the representation width).
        activation, bias: of both MLPs.

    The other args are :class:`~lattice.models.LatticeModel`'s.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 16,
        bottom_dims: Sequence[int] = (64,),
        top_dims: Sequence[int] = (256, 128),
        activation: str = "relu",
        bias: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if not top_dims:
            raise ValueError("DLRM needs at least one top layer")
        sl = self.processor.token_slices["dense"]
        self.dense_slice = sl
        n_dense = sl.stop - sl.start
        self.bottom = (
            MLP(n_dense * dim, bottom_dims, dim, activation=activation, bias=bias, final_activation=True)
            if n_dense
            else None
        )
        n_vec = self.num_tokens - n_dense + (1 if self.bottom is not None else 0)
        n_vec += 1 if self.processor.has_sequence else 0
        self.num_vectors = n_vec
        rows, cols = torch.triu_indices(n_vec, n_vec, offset=1)
        self.register_buffer("pair_index", rows * n_vec + cols, persistent=False)
        top_in = rows.numel() + (dim if self.bottom is not None else 0)
        self.top = MLP(top_in, top_dims, None, activation=activation, bias=bias)
        self._build_heads(self.top.out_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        tokens = features.tokens
        sl = self.dense_slice
        others = torch.cat([tokens[:, : sl.start], tokens[:, sl.stop :]], dim=1)
        vecs = [others]
        bottom = None
        if self.bottom is not None:
            bottom = self.bottom(tokens[:, sl].flatten(1))
            vecs.insert(0, bottom.unsqueeze(1))
        if features.sequence is not None:
            vecs.append(jagged_mean(features.sequence).unsqueeze(1))
        v = torch.cat(vecs, dim=1)  # [B, n_vec, d]
        dots = torch.bmm(v, v.transpose(1, 2)).flatten(1).index_select(1, self.pair_index)
        top_in = dots if bottom is None else torch.cat([bottom, dots], dim=1)
        rep = self.top(top_in)
        return rep, rep

    def trunk_flops(self, events: float) -> float:
        total = self.top.flops() + 2.0 * self.num_vectors**2 * self.dim
        if self.bottom is not None:
            total += self.bottom.flops()
        return total


class Wukong(LatticeModel):
    """Wukong: a stack of interaction layers, each an FM block (optimized O(n·k·d) form) and a linear
    compression block, residual + LayerNorm, over the tokens (plus the mean sequence token); then an MLP.

    Args:
        num_layers: interaction layers. fm_tokens, lcb_tokens: tokens of each block per layer.
        fm_rank, fm_hidden_dims: the FM block's rank and MLP. norm: layer output norm.
        top_dims: hidden sizes of the final MLP (last = representation width).
        activation, bias: of every MLP.
        untied_layers: layers untied per domain.

    The other args are :class:`~lattice.models.LatticeModel`'s.
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 32,
        num_layers: int = 2,
        fm_tokens: int = 8,
        lcb_tokens: int = 8,
        fm_rank: int = 8,
        fm_hidden_dims: Sequence[int] = (128,),
        norm: str = "layer",
        top_dims: Sequence[int] = (128,),
        activation: str = "relu",
        bias: bool = True,
        untied_layers: Sequence[int] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(schema, dim=dim, **kwargs)
        if not top_dims:
            raise ValueError("Wukong needs at least one top layer")
        untied = set(untied_layers)
        n = self.num_tokens + (1 if self.processor.has_sequence else 0)
        self.layers = nn.ModuleList()
        for layer in range(num_layers):
            self.layers.append(
                FusionBlock(
                    n, dim, fm_tokens=fm_tokens, lcb_tokens=lcb_tokens, fm_rank=fm_rank, fm_hidden_dims=fm_hidden_dims,
                    activation=activation, bias=bias, norm=norm, **self._untie(layer in untied),
                )
            )
            n = fm_tokens + lcb_tokens
        self.top = MLP(n * dim, top_dims, None, activation=activation, bias=bias)
        self._build_heads(self.top.out_dim)

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        x = tokens_with_sequence_mean(features)
        for layer in self.layers:
            x = layer(x, batch.domain)
        rep = self.top(x.flatten(1))
        return rep, rep

    def trunk_flops(self, events: float) -> float:
        return sum(layer.flops() for layer in self.layers) + self.top.flops()


class LogisticRegression(_FlatInputModel):
    """Logistic regression over the same features: every task's logit is linear in the one-hot sparse
    ids, the multi-hot (length-normalized) sequence ids, the dense values, the presence bits and the
    domain.

    The input is ``flatten(tokens) ‖ mean(sequence)`` as in the MLP baselines, and each task head is a
    single linear layer (no hidden layer, no activation): the weight of id ``i`` of feature ``f`` for a
    task is ``<h_{task,f}, e_f[i]>``. With ``dim`` at least the number of task heads that factorization
    spans any set of per-task weights, so this is plain multi-task logistic regression, trained like every
    other network (fused sparse optimizer for the tables). The processor's parts are all affine here:
    sparse tokens are embeddings, dense tokens ``value * w + b`` (or a learned missing token), and the
    sequences merge by ``"concat"`` (each event its embedding + type + time-gap + recency-position
    embeddings, then averaged), never MaskNet.

    Args:
        untie_heads: one copy of the heads per domain (group): per-domain logistic regression over
            shared embeddings (captures domain-specific weights, e.g. device effects).

    The other args are :class:`~lattice.models.LatticeModel`'s (``head_hidden_dims`` must stay empty).
    """

    def __init__(
        self,
        schema: SchemaLike,
        dim: int = 16,
        embedding_dim: int | None = None,
        dense_tokens: int | None = None,
        domain_token: bool = True,
        max_positions: int = 256,
        time_buckets: int = 32,
        untie_heads: bool = False,
        domain_groups: Sequence[int] | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        history_match: bool = False,
        standardize_dense: bool = False,
        task_parents: dict[str, str] | None = None,
        num_extra_tokens: int = 0,
    ) -> None:
        super().__init__(
            schema, dim=dim, embedding_dim=embedding_dim, dense_tokens=dense_tokens, domain_token=domain_token,
            sequence_merge="concat", max_positions=max_positions, time_buckets=time_buckets, head_hidden_dims=(),
            head_activation="none", untie_heads=untie_heads, domain_groups=domain_groups,
            embedding_kwargs=embedding_kwargs, history_match=history_match, standardize_dense=standardize_dense,
            task_parents=task_parents, num_extra_tokens=num_extra_tokens,
        )
        self._build_heads(self._flat_dim())

    def encode(self, features: ProcessedFeatures, batch: Batch) -> tuple[Tensor, Tensor]:
        x = self._flat(features)
        return x, x

    def trunk_flops(self, events: float) -> float:
        return 0.0
