"""Extended context store (ECS): every layer's output tokens are kept, and each later layer reads a learned
projection of all of them (DenseNet-style), so deep stacks keep direct access to the raw feature tokens
and to early interactions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lattice.nn.linear import Dispatch, DomainLinear

__all__ = ["ExtendedContextStore"]


class ExtendedContextStore(nn.Module):
    """Reads for layers ``1..L-1`` of a stack from the outputs of all the layers before them.

    The store itself is stateless: the caller keeps the list ``context = [h_0, h_1, ...]`` (``h_0`` the
    input tokens, ``h_i`` layer i's output, each ``[B, n_i, d]``) and asks for ``read(i, context)``, a
    token-axis linear map of ``concat(h_0..h_{i-1})`` (``sum(n_0..n_{i-1})`` tokens) onto the
    ``read_tokens[i]`` tokens layer i takes as input; the caller adds it to that input. The maps start at
    zero, so a fresh store leaves the stack unchanged.

    Args:
        dim: d, the token width.
        write_tokens: ``[n_0, n_1, ..., n_{L-1}]`` tokens written by the input (0) and each layer.
        read_tokens: tokens each layer ``1..L-1`` expects (``read_tokens[i]``; entry 0 is ignored).
        bias, num_domains, domain_groups, dispatch: see :class:`~lattice.nn.DomainLinear`.

    Shape: ``read(i, context) -> [B, read_tokens[i], d]``.
    """

    def __init__(
        self,
        dim: int,
        write_tokens: Sequence[int],
        read_tokens: Sequence[int],
        bias: bool = False,
        num_domains: int = 1,
        domain_groups: Sequence[int] | None = None,
        dispatch: Dispatch = "auto",
    ) -> None:
        super().__init__()
        if len(read_tokens) != len(write_tokens):
            raise ValueError("read_tokens and write_tokens need one entry per layer (entry 0 = the input)")
        self.dim = dim
        self.write_tokens = list(write_tokens)
        self.read_tokens = list(read_tokens)
        self.readers = nn.ModuleList([nn.Identity()])
        for i in range(1, len(write_tokens)):
            reader = DomainLinear(
                sum(self.write_tokens[:i]), self.read_tokens[i], bias=bias,
                num_domains=num_domains, domain_groups=domain_groups, dispatch=dispatch,
            )
            nn.init.zeros_(reader.weight)
            self.readers.append(reader)

    def read(self, layer: int, context: Sequence[Tensor], domain: Tensor | None = None) -> Tensor:
        if not 1 <= layer < len(self.readers):
            raise IndexError(f"ECS has readers for layers 1..{len(self.readers) - 1}, asked for {layer}")
        if len(context) < layer:
            raise ValueError(f"layer {layer} reads {layer} stored outputs, the context holds {len(context)}")
        stored = torch.cat(list(context[:layer]), dim=1)  # [B, sum n_j, d]
        return self.readers[layer](stored.transpose(1, 2), domain).transpose(1, 2)

    def flops(self, layer: int) -> float:
        return self.readers[layer].flops(self.dim)
