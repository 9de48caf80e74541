"""Feature-interaction blocks over a fixed set of tokens: Wukong's FM and linear compression blocks,
DHEN's dot-product and DCNv2 cross modules, and the fusion block (DWFB) that ensembles them.

Every block maps ``x [B, n, d]`` to ``[B, m, d]`` tokens. Linears are bias-free unless asked, and each
block can be untied per domain (``num_domains``/``domain_groups``, see :class:`~lattice.nn.DomainLinear`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lattice.nn.linear import MLP, Dispatch, DomainLinear
from lattice.nn.norms import make_norm

__all__ = ["FMBlock", "LinearCompressBlock", "DotProductBlock", "CrossNetBlock", "FusionBlock", "DWFB"]


def _token_linear(x: Tensor, layer: DomainLinear, domain: Tensor | None) -> Tensor:
    """Applies ``layer`` along the token axis: ``[B, n, d] -> [B, m, d]``."""
    return layer(x.transpose(1, 2), domain).transpose(1, 2)


class FMBlock(nn.Module):
    """Wukong's factorization machine block in its O(n·k·d) form.

    Pairwise interactions ``X Xᵀ`` are never formed: with a learned projection ``Y [n, k]`` the block
    computes ``X (Xᵀ Y) [B, n, k]`` (rank-k summary of all n² dot products), flattens it, normalizes it,
    and an MLP maps it to ``out_tokens`` new tokens.

    Args:
        num_tokens: n. dim: d. out_tokens: m. rank: k.
        hidden_dims: the MLP's hidden sizes. activation, bias, norm: see :class:`~lattice.nn.MLP`.

    Shape: ``[B, n, d] -> [B, m, d]``.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        out_tokens: int,
        rank: int = 8,
        hidden_dims: Sequence[int] = (),
        activation: str = "silu",
        bias: bool = False,
        norm: str = "rms",
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        untie = dict(num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)
        self.num_tokens, self.dim, self.out_tokens, self.rank = num_tokens, dim, out_tokens, rank
        self.proj = DomainLinear(num_tokens, rank, bias=False, **untie)  # Y, applied to Xᵀ
        self.norm = make_norm(norm, num_tokens * rank)
        self.mlp = MLP(num_tokens * rank, hidden_dims, out_tokens * dim, activation=activation, bias=bias, **untie)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        xty = self.proj(x.transpose(1, 2), domain)  # [B, d, k]
        inter = torch.bmm(x, xty)  # [B, n, k]
        out = self.mlp(self.norm(inter.reshape(b, -1)), domain)
        return out.view(b, self.out_tokens, self.dim)

    def flops(self) -> float:
        n, d, k = self.num_tokens, self.dim, self.rank
        return 2.0 * n * d * k * 2 + self.mlp.flops()


class LinearCompressBlock(nn.Module):
    """Wukong's linear compression block: ``out_tokens`` linear combinations of the n input tokens.

    Shape: ``[B, n, d] -> [B, m, d]``.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        out_tokens: int,
        bias: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.mix = DomainLinear(
            num_tokens, out_tokens, bias=bias, num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch
        )

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        return _token_linear(x, self.mix, domain)

    def flops(self) -> float:
        return self.mix.flops(self.dim)


class DotProductBlock(nn.Module):
    """DHEN's dot-product module: all pairwise dot products ``<x_i, x_j>`` (i < j) → linear → m tokens.

    Shape: ``[B, n, d] -> [B, m, d]``.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        out_tokens: int,
        bias: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        if num_tokens < 2:
            raise ValueError(f"DotProductBlock needs at least 2 tokens, got {num_tokens}")
        self.num_tokens, self.dim, self.out_tokens = num_tokens, dim, out_tokens
        rows, cols = torch.triu_indices(num_tokens, num_tokens, offset=1)
        self.register_buffer("pair_index", rows * num_tokens + cols, persistent=False)
        self.out = DomainLinear(
            rows.numel(), out_tokens * dim, bias=bias, num_domains=num_domains,
            domain_groups=domain_groups, dispatch=dispatch,
        )

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        gram = torch.bmm(x, x.transpose(1, 2)).reshape(b, -1)  # [B, n*n]
        pairs = gram.index_select(1, self.pair_index)
        return self.out(pairs, domain).view(b, self.out_tokens, self.dim)

    def flops(self) -> float:
        return 2.0 * self.num_tokens**2 * self.dim + self.out.flops()


class CrossNetBlock(nn.Module):
    """DHEN's DCNv2 cross module over the flattened tokens, then a token-axis compression to m tokens.

    ``x_{l+1} = x_0 ⊙ (U_l V_l x_l (+ b_l)) + x_l`` on ``x_0 = flatten(X) [B, n·d]`` (low rank ``rank``;
    ``rank=None`` uses a full ``n·d × n·d`` matrix).

    Shape: ``[B, n, d] -> [B, m, d]``.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        out_tokens: int,
        num_layers: int = 1,
        rank: int | None = 16,
        bias: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        untie = dict(num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)
        width = num_tokens * dim
        self.num_tokens, self.dim = num_tokens, dim
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for _ in range(num_layers):
            if rank is None:
                self.down.append(nn.Identity())
                self.up.append(DomainLinear(width, width, bias=bias, **untie))
            else:
                self.down.append(DomainLinear(width, rank, bias=False, **untie))
                self.up.append(DomainLinear(rank, width, bias=bias, **untie))
        self.compress = DomainLinear(num_tokens, out_tokens, bias=bias, **untie)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        x0 = x.reshape(b, -1)
        xl = x0
        for down, up in zip(self.down, self.up):
            h = xl if isinstance(down, nn.Identity) else down(xl, domain)
            xl = x0 * up(h, domain) + xl
        return _token_linear(xl.view(b, self.num_tokens, self.dim), self.compress, domain)

    def flops(self) -> float:
        total = 0.0
        for down, up in zip(self.down, self.up):
            if isinstance(down, DomainLinear):
                total += down.flops()
            total += up.flops() + 2.0 * self.num_tokens * self.dim
        return total + self.compress.flops(self.dim)


class FusionBlock(nn.Module):
    """The DHEN/Wukong fusion block (DWFB): an ensemble of interaction modules over n tokens.

    ``y = norm(concat_tokens(FM(x), LCB(x), Dot(x), DCN(x)) + R x)`` where each module is present when its
    token count is positive and ``R`` is the identity when ``n == m`` (m = total output tokens) or a
    token-axis linear otherwise. Wukong's layer is ``fm_tokens, lcb_tokens > 0`` alone; the DHEN ensemble
    adds ``dot_tokens`` and/or ``dcn_tokens``.

    Args:
        num_tokens: n, input tokens. dim: d.
        fm_tokens, lcb_tokens, dot_tokens, dcn_tokens: tokens each module contributes (0 = off).
        fm_rank: k of the FM block. fm_hidden_dims: the FM block's MLP hidden sizes.
        dcn_layers, dcn_rank: the cross module's depth and rank.
        activation, bias: for every linear inside. norm: output norm (default SwishRMSNorm).
        num_domains, domain_groups, dispatch: per-domain untying of every linear inside.

    Shape: ``[B, n, d] -> [B, m, d]``; ``domain [B]`` when untied.
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        fm_tokens: int = 8,
        lcb_tokens: int = 8,
        dot_tokens: int = 0,
        dcn_tokens: int = 0,
        fm_rank: int = 8,
        fm_hidden_dims: Sequence[int] = (),
        dcn_layers: int = 1,
        dcn_rank: int | None = 16,
        activation: str = "silu",
        bias: bool = False,
        norm: str = "swish_rms",
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        untie = dict(num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch)
        self.num_tokens, self.dim = num_tokens, dim
        self.out_tokens = fm_tokens + lcb_tokens + dot_tokens + dcn_tokens
        if self.out_tokens <= 0:
            raise ValueError("FusionBlock needs at least one module with a positive token count")
        self.modules_ = nn.ModuleList()
        if fm_tokens > 0:
            self.modules_.append(
                FMBlock(num_tokens, dim, fm_tokens, fm_rank, fm_hidden_dims, activation, bias, **untie)
            )
        if lcb_tokens > 0:
            self.modules_.append(LinearCompressBlock(num_tokens, dim, lcb_tokens, bias, **untie))
        if dot_tokens > 0:
            self.modules_.append(DotProductBlock(num_tokens, dim, dot_tokens, bias, **untie))
        if dcn_tokens > 0:
            self.modules_.append(CrossNetBlock(num_tokens, dim, dcn_tokens, dcn_layers, dcn_rank, bias, **untie))
        self.residual = (
            None if self.out_tokens == num_tokens else DomainLinear(num_tokens, self.out_tokens, bias=False, **untie)
        )
        self.norm = make_norm(norm, dim)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        parts = [m(x, domain) for m in self.modules_]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        res = x if self.residual is None else _token_linear(x, self.residual, domain)
        return self.norm(y + res)

    def flops(self) -> float:
        total = sum(m.flops() for m in self.modules_)
        if self.residual is not None:
            total += self.residual.flops(self.dim)
        return total


DWFB = FusionBlock
