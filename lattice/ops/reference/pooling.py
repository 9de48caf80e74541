"""Pure-torch reference of :func:`lattice.ops.jagged_embedding_pool` and its backward ops.

Written for clarity, not speed: a gather of every index's row, an ``index_add_`` per bag, and the
optimizer steps as plain tensor arithmetic. Tests check the kernels against these, benchmarks time
them, and ``LATTICE_OPS=reference`` runs whole models on them.

Shapes (key-major, as a KeyedJaggedTensor lays them out): ``weights [rows_total, D]``,
``table_row_offsets [T+1]`` (packed tables) or ``[T, 2]`` (row range per table), ``indices [N]``
local to their table, ``offsets [T*B+1]`` (bag ``t*B+b``), ``per_sample_weights [N]``; the output is
``[B, T, D]``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "jagged_embedding_pool",
    "jagged_embedding_pool_backward_sparse",
    "jagged_embedding_pool_backward_per_sample_weights",
    "jagged_embedding_pool_backward_fused_",
    "sparse_rows_optimizer_step_",
    "table_row_ranges",
]

SGD, ROWWISE_ADAGRAD = 0, 1


def table_row_ranges(table_row_offsets: Tensor) -> tuple[Tensor, Tensor]:
    """(start [T], end [T]) rows of every table, from either layout of ``table_row_offsets``."""
    if table_row_offsets.dim() == 2:
        return table_row_offsets[:, 0], table_row_offsets[:, 1]
    return table_row_offsets[:-1], table_row_offsets[1:]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _positions(table_row_offsets: Tensor, indices: Tensor, offsets: Tensor):
    """Per index position (up to offsets[-1]): its bag, its global row; plus T, B, bag lengths."""
    start, end = table_row_ranges(table_row_offsets)
    T = start.numel()
    B = (offsets.numel() - 1) // T
    offsets = offsets.long()
    lengths = offsets[1:] - offsets[:-1]
    used = int(offsets[-1])
    bag = torch.repeat_interleave(torch.arange(T * B, device=offsets.device), lengths)
    table = torch.div(bag, B, rounding_mode="floor") if B > 0 else bag
    local = indices[:used].long()
    bad = (local < 0) | (local >= (end - start)[table])
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        t = int(table[j])
        raise RuntimeError(
            f"indices[{j}] = {int(local[j])} is out of range for table {t} with "
            f"{int(end[t] - start[t])} rows (sample {int(bag[j]) % B})"
        )
    rows = start[table] + local
    return bag, rows, T, B, lengths


def jagged_embedding_pool(
    weights: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: int,
    per_sample_weights: Optional[Tensor] = None,
) -> Tensor:
    """out[b, t] = pool over the bag t*B+b of weights[row]: sum (times per_sample_weights) or mean."""
    if per_sample_weights is not None and pooling != 0:
        raise RuntimeError("per_sample_weights are only supported with sum pooling (pooling=0)")
    bag, rows, T, B, lengths = _positions(table_row_offsets, indices, offsets)
    acc = _acc_dtype(weights.dtype)
    vals = weights.index_select(0, rows).to(acc)
    if per_sample_weights is not None:
        vals = vals * per_sample_weights[: rows.numel()].to(acc).unsqueeze(1)
    out = torch.zeros(T * B, weights.shape[1], dtype=acc, device=weights.device).index_add(0, bag, vals)
    if pooling == 1:
        out = out / lengths.clamp(min=1).to(acc).unsqueeze(1)
    return out.view(T, B, weights.shape[1]).transpose(0, 1).to(weights.dtype)


def _row_contributions(grad_output, table_row_offsets, indices, offsets, pooling, per_sample_weights):
    bag, rows, T, B, lengths = _positions(table_row_offsets, indices, offsets)
    acc = _acc_dtype(grad_output.dtype)
    g = grad_output.to(acc).transpose(0, 1).reshape(T * B, grad_output.shape[2])  # bag-major
    contrib = g.index_select(0, bag)
    if per_sample_weights is not None:
        contrib = contrib * per_sample_weights[: rows.numel()].to(acc).unsqueeze(1)
    if pooling == 1:
        contrib = contrib / lengths.clamp(min=1).to(acc)[bag].unsqueeze(1)
    return rows, contrib


def jagged_embedding_pool_backward_sparse(
    grad_output: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: int,
    per_sample_weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """(rows [U] sorted unique global rows, row_grads [U, D]) of the pooled output's gradient."""
    rows, contrib = _row_contributions(
        grad_output, table_row_offsets, indices, offsets, pooling, per_sample_weights
    )
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.numel(), contrib.shape[1], dtype=contrib.dtype, device=contrib.device)
    summed.index_add_(0, inverse, contrib)
    return unique, summed.to(grad_output.dtype)


def jagged_embedding_pool_backward_per_sample_weights(
    grad_output: Tensor, weights: Tensor, table_row_offsets: Tensor, indices: Tensor, offsets: Tensor
) -> Tensor:
    """grad[j] = <grad_output[b, t], weights[row(j)]> for every index position j (0 past offsets[-1])."""
    bag, rows, T, B, _ = _positions(table_row_offsets, indices, offsets)
    acc = _acc_dtype(weights.dtype)
    g = grad_output.to(acc).transpose(0, 1).reshape(T * B, grad_output.shape[2])
    out = torch.zeros(indices.numel(), dtype=acc, device=weights.device)
    out[: rows.numel()] = (g.index_select(0, bag) * weights.index_select(0, rows).to(acc)).sum(1)
    return out


def sparse_rows_optimizer_step_(
    weights: Tensor,
    optimizer_state: Tensor,
    rows: Tensor,
    row_grads: Tensor,
    optimizer: int,
    learning_rate: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In place, for each (unique) row r with gradient g:

    - SGD: ``w[r] -= lr * (g + wd * w[r])``
    - row-wise Adagrad: ``g' = g + wd * w[r]``; ``state[r] += mean(g'^2)``;
      ``w[r] -= lr / (sqrt(state[r]) + eps) * g'``
    """
    if rows.numel() == 0:
        return
    rows = rows.long()
    acc = _acc_dtype(weights.dtype)
    w = weights.index_select(0, rows).to(acc)
    g = row_grads.to(acc) + weight_decay * w
    if optimizer == SGD:
        new = w - learning_rate * g
    elif optimizer == ROWWISE_ADAGRAD:
        state = optimizer_state.index_select(0, rows) + (g * g).mean(1).to(optimizer_state.dtype)
        optimizer_state.index_copy_(0, rows, state)
        new = w - (learning_rate / (state.to(acc).sqrt() + eps)).unsqueeze(1) * g
    else:
        raise RuntimeError(f"optimizer must be 0 (SGD) or 1 (row-wise Adagrad), got {optimizer}")
    weights.index_copy_(0, rows, new.to(weights.dtype))


def jagged_embedding_pool_backward_fused_(
    weights: Tensor,
    optimizer_state: Tensor,
    grad_output: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: int,
    per_sample_weights: Optional[Tensor],
    optimizer: int,
    learning_rate: float,
    eps: float,
    weight_decay: float,
) -> None:
    """The sparse row gradient followed by :func:`sparse_rows_optimizer_step_` on the touched rows."""
    rows, row_grads = jagged_embedding_pool_backward_sparse(
        grad_output, table_row_offsets, indices, offsets, pooling, per_sample_weights
    )
    sparse_rows_optimizer_step_(
        weights, optimizer_state, rows, row_grads.to(_acc_dtype(weights.dtype)), optimizer,
        learning_rate, eps, weight_decay,
    )
