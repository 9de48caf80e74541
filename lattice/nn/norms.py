"""Normalization layers: :class:`RMSNorm` and :class:`SwishRMSNorm`.

Both normalize over the last dimension and compute the statistics in float32, so bf16/fp16 activations
keep a stable scale.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RMSNorm", "SwishRMSNorm", "make_norm"]


class RMSNorm(nn.Module):
    """Root-mean-square normalization: ``x / sqrt(mean(x**2) + eps) * weight``.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the square root.
        elementwise_affine: learn a per-channel scale (initialized to 1).

    Shape: ``[..., dim] -> [..., dim]``, same dtype as the input.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True) -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError(f"RMSNorm: dim must be positive, got {dim}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), (self.dim,), weight, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class SwishRMSNorm(RMSNorm):
    """``y * sigmoid(y)`` with ``y = RMSNorm(x)``: a normalization that also gates (Lattice's SwishRMSNorm).

    Same arguments and shapes as :class:`RMSNorm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """``"rms"`` → :class:`RMSNorm`, ``"swish_rms"`` → :class:`SwishRMSNorm`, ``"layer"`` →
    :class:`torch.nn.LayerNorm`, ``"none"`` → identity."""
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "swish_rms":
        return SwishRMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected one of 'rms', 'swish_rms', 'layer', 'none'")
