"""Linear layers with optional per-domain weights, and the MLP built from them.

:class:`DomainLinear` keeps one weight copy per domain group and applies each sample's own copy, chosen
by ``batch.domain``, without a Python loop over samples. With a single group it is a plain (optionally
bias-free) linear layer, so every block can take ``num_domains``/``domain_groups`` and be untied or not
from configuration alone.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lattice.nn.norms import make_norm

__all__ = ["DomainLinear", "MLP", "make_activation", "resolve_domain_groups"]

Dispatch = Literal["auto", "grouped", "dense", "gather"]


def resolve_domain_groups(num_domains: int, domain_groups: Sequence[int] | None) -> list[int]:
    """The group index of every domain: ``domain_groups`` as given, or one group per domain.

    ``num_domains <= 1`` without groups means "shared" (a single group).
    """
    if domain_groups is None:
        return list(range(num_domains)) if num_domains > 1 else [0]
    groups = [int(g) for g in domain_groups]
    if num_domains > 1 and len(groups) != num_domains:
        raise ValueError(f"domain_groups has {len(groups)} entries but there are {num_domains} domains")
    if not groups or min(groups) < 0:
        raise ValueError(f"domain_groups must be non-empty, non-negative group ids, got {groups}")
    used = sorted(set(groups))
    if used != list(range(len(used))):
        raise ValueError(f"domain_groups must use the ids 0..G-1 without gaps, got {groups}")
    return groups


def make_activation(name: str) -> nn.Module:
    """``"relu"``, ``"gelu"``, ``"silu"`` (swish) or ``"none"``."""
    table = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU, "none": nn.Identity}
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]()


class DomainLinear(nn.Module):
    """``y = x @ W[g].T (+ b[g])`` where ``g = domain_groups[domain[b]]`` is sample b's weight group.

    Args:
        in_features, out_features: as in :class:`torch.nn.Linear`.
        num_domains: number of domains; ``<= 1`` (and no ``domain_groups``) gives a shared layer.
        bias: learn a bias (one per group).
        domain_groups: group id of each domain (``len == num_domains``), so several domains can share
            one copy; default one group per domain.
        dispatch: how samples meet their group's weights when there are several groups:
            ``"grouped"`` sorts the rows by group and runs one matmul per group (exact FLOPs; a
            host sync for the group sizes), ``"dense"`` multiplies every row by every group's weights
            and keeps its own (G× the FLOPs, static shapes), ``"gather"`` gathers a weight matrix per
            sample and uses one ``bmm`` (memory ``B·in·out``). ``"auto"`` is ``grouped`` in eager mode
            and ``dense`` under ``torch.compile``.

    Shape: ``x [B, *, in_features]`` with ``domain [B]`` (int64) -> ``[B, *, out_features]``.
    ``domain`` may be ``None`` only when the layer has a single group.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_domains: int = 1,
        bias: bool = False,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        if dispatch not in ("auto", "grouped", "dense", "gather"):
            raise ValueError(f"unknown dispatch {dispatch!r}")
        groups = resolve_domain_groups(num_domains, domain_groups)
        self.in_features = in_features
        self.out_features = out_features
        self.num_groups = max(groups) + 1
        self.dispatch = dispatch
        self.register_buffer("group_of_domain", torch.tensor(groups, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.empty(self.num_groups, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.num_groups, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        # Same distribution as nn.Linear, drawn independently per group.
        for g in range(self.num_groups):
            nn.init.kaiming_uniform_(self.weight[g], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[g], -bound, bound)

    @property
    def untied(self) -> bool:
        return self.num_groups > 1

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        if self.num_groups == 1:
            return F.linear(x, self.weight[0], None if self.bias is None else self.bias[0])
        if domain is None:
            raise ValueError("DomainLinear with per-domain weights needs the batch's domain tensor")
        if domain.dim() != 1 or domain.shape[0] != x.shape[0]:
            raise ValueError(f"domain must be [B] with B = x.shape[0] = {x.shape[0]}, got {tuple(domain.shape)}")
        group = self.group_of_domain[domain]
        dispatch = self.dispatch
        if dispatch == "auto":
            dispatch = "dense" if torch.compiler.is_compiling() else "grouped"
        if dispatch == "grouped":
            return self._grouped(x, group)
        if dispatch == "dense":
            return self._dense(x, group)
        return self._gather(x, group)

    def _grouped(self, x: Tensor, group: Tensor) -> Tensor:
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=self.num_groups).tolist()
        parts = x.index_select(0, order).split(counts)
        outs = [
            F.linear(part, self.weight[g], None if self.bias is None else self.bias[g])
            for g, part in enumerate(parts)
        ]
        y_sorted = torch.cat(outs, dim=0)
        y = torch.empty_like(y_sorted)
        return y.index_copy(0, order, y_sorted)

    def _dense(self, x: Tensor, group: Tensor) -> Tensor:
        lead = x.shape[1:-1]
        xf = x.reshape(x.shape[0], -1, self.in_features)  # [B, n, in]
        y_all = torch.einsum("bni,goi->bgno", xf, self.weight)  # [B, G, n, out]
        idx = group.view(-1, 1, 1, 1).expand(-1, 1, y_all.shape[2], self.out_features)
        y = y_all.gather(1, idx).squeeze(1)
        if self.bias is not None:
            y = y + self.bias[group].unsqueeze(1)
        return y.reshape(x.shape[0], *lead, self.out_features)

    def _gather(self, x: Tensor, group: Tensor) -> Tensor:
        lead = x.shape[1:-1]
        xf = x.reshape(x.shape[0], -1, self.in_features)
        y = torch.bmm(xf, self.weight[group].transpose(1, 2))
        if self.bias is not None:
            y = y + self.bias[group].unsqueeze(1)
        return y.reshape(x.shape[0], *lead, self.out_features)

    def flops(self, tokens: float = 1.0) -> float:
        """Multiply-add FLOPs (2·in·out per token) for ``tokens`` rows of one sample."""
        return 2.0 * self.in_features * self.out_features * tokens

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.num_groups}, bias={self.bias is not None}, dispatch={self.dispatch}"
        )


class MLP(nn.Module):
    """A stack of (optionally per-domain) linear layers with activations in between.

    ``in_dim -> hidden_dims[0] -> ... -> hidden_dims[-1] (-> out_dim)``; every hidden layer is
    ``linear -> norm -> activation -> dropout``; the output layer (when ``out_dim`` is given) is linear
    only, unless ``final_activation``.

    Args:
        in_dim: input size.
        hidden_dims: hidden sizes (may be empty).
        out_dim: output size, or ``None`` to end at the last hidden layer.
        activation: see :func:`make_activation`.
        bias: biases in the hidden layers (and the output layer unless ``out_bias`` says otherwise).
        out_bias: bias of the output layer (default: ``bias``).
        norm: norm after each hidden linear (``"none"``, ``"rms"``, ``"swish_rms"``, ``"layer"``).
        dropout: dropout after each hidden activation.
        final_activation: apply the activation after the output layer too.
        num_domains, domain_groups, dispatch: per-domain untying of every layer (see :class:`DomainLinear`).

    Shape: ``[B, *, in_dim] -> [B, *, out_dim or hidden_dims[-1]]``; ``domain [B]`` when untied.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int] = (),
        out_dim: int | None = None,
        activation: str = "silu",
        bias: bool = False,
        out_bias: bool | None = None,
        norm: str = "none",
        dropout: float = 0.0,
        final_activation: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        dims = [in_dim, *hidden_dims]
        if out_dim is None and not hidden_dims:
            raise ValueError("MLP needs hidden_dims or out_dim")
        self.in_dim = in_dim
        self.out_dim = out_dim if out_dim is not None else dims[-1]
        self.layers = nn.ModuleList()
        self.posts = nn.ModuleList()
        untie = dict(num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)
        for a, b in zip(dims[:-1], dims[1:]):
            self.layers.append(DomainLinear(a, b, bias=bias, **untie))
            post = [make_norm(norm, b), make_activation(activation)]
            if dropout > 0:
                post.append(nn.Dropout(dropout))
            self.posts.append(nn.Sequential(*post))
        if out_dim is not None:
            self.layers.append(DomainLinear(dims[-1], out_dim, bias=bias if out_bias is None else out_bias, **untie))
            self.posts.append(make_activation(activation) if final_activation else nn.Identity())

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        for layer, post in zip(self.layers, self.posts):
            x = post(layer(x, domain))
        return x

    def flops(self, tokens: float = 1.0) -> float:
        return sum(layer.flops(tokens) for layer in self.layers)
