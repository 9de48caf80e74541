"""Pure-torch reference of :func:`lattice.ops.jagged_embedding_pool_int8`: dequantize every row, then the float
reference pooling. What the int8 kernels are tested against, and what ``LATTICE_OPS=reference`` runs."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from lattice.ops.int8_rows import dequantize_rows_int8
from lattice.ops.reference.pooling import jagged_embedding_pool

__all__ = ["jagged_embedding_pool_int8"]


def jagged_embedding_pool_int8(
    weights: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: int,
    per_sample_weights: Optional[Tensor],
    embedding_dim: int,
) -> Tensor:
    """``out [B, T, embedding_dim]`` float32: :func:`jagged_embedding_pool` over the dequantized table."""
    return jagged_embedding_pool(
        dequantize_rows_int8(weights, embedding_dim), table_row_offsets, indices, offsets, pooling, per_sample_weights
    )
