"""The ExFM auxiliary (distillation) head and gradient scaling on the distillation path.

ExFM (arXiv 2502.17494) keeps the teacher's supervision away from the head that serves: the student's
serving head learns the true labels only, and a separate auxiliary head on the same backbone learns
the teacher's soft labels. The backbone still benefits from the teacher (through the auxiliary head's
gradient), while the teacher's bias cannot reach the serving head. :func:`grad_scale` sits where the
distillation path leaves the backbone and scales the gradient that flows back into it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GradScale", "grad_scale", "DistillationHead"]


class GradScale(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = float(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.scale == 0.0:
            return torch.zeros_like(grad), None  # exactly zero, even where grad is inf/nan
        return grad * ctx.scale, None


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward pass; ``scale * grad`` in the backward.

    ``scale == 1`` returns ``x`` itself; ``scale == 0`` returns ``x.detach()`` — the graph is cut, so
    whatever produced ``x`` gets exactly no gradient from this path and no backward work is done.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"gradient scale must be finite and >= 0, got {scale}")
    if scale == 1.0:
        return x
    if scale == 0.0:
        return x.detach()
    return GradScale.apply(x, scale)


class DistillationHead(nn.Module):
    """One small MLP per task, run as one batched einsum over stacked weights.

    The auxiliary head predicts the teacher's (serving) output for every task, so it has one output per
    task and no Zipper windows.

    Args:
        in_dim: input width R.
        num_tasks: T.
        hidden_dims: hidden sizes of every task's MLP (empty: a linear head).
        activation: ``"silu"``, ``"relu"`` or ``"gelu"``.

    Shape: ``x [B, R]`` (shared input) or ``[B, T, R]`` (one input per task, e.g. MMoE towers) ->
    logits ``[B, T]``.
    """

    _ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}

    def __init__(self, in_dim: int, num_tasks: int, hidden_dims: Sequence[int] = (64,), activation: str = "silu") -> None:
        super().__init__()
        if in_dim <= 0 or num_tasks <= 0:
            raise ValueError(f"in_dim and num_tasks must be > 0, got {in_dim} and {num_tasks}")
        if activation not in self._ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(self._ACTIVATIONS)}, got {activation!r}")
        self.in_dim = in_dim
        self.num_tasks = num_tasks
        self.hidden_dims = [int(h) for h in hidden_dims]
        dims = [in_dim, *self.hidden_dims, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(num_tasks, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_tasks, b).uniform_(-bound, bound)))
        self.act = self._ACTIVATIONS[activation]()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.shape[1] == self.in_dim:
            h = x.unsqueeze(1).expand(-1, self.num_tasks, -1)
        elif x.dim() == 3 and x.shape[1:] == (self.num_tasks, self.in_dim):
            h = x
        else:
            raise ValueError(
                f"the distillation head takes [B, {self.in_dim}] or [B, {self.num_tasks}, {self.in_dim}], "
                f"got {tuple(x.shape)}"
            )
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.einsum("bti,tio->bto", h, w.to(h.dtype)) + b.to(h.dtype)
            if i < n - 1:
                h = self.act(h)
        return h.squeeze(-1)

    def flops(self) -> float:
        dims = [self.in_dim, *self.hidden_dims, 1]
        return float(sum(2 * a * b for a, b in zip(dims[:-1], dims[1:])) * self.num_tasks)
