"""Fused jagged embedding pooling over int8 row-wise quantized tables, for inference:
``torch.ops.lattice.jagged_embedding_pool_int8``.

::

    q = quantize_rows_int8(weights)                      # uint8 [rows_total, int8_row_bytes(D)]
    out = jagged_embedding_pool_int8(q, table_row_offsets, indices, offsets, "sum", embedding_dim=D)

The arguments are :func:`lattice.ops.jagged_embedding_pool`'s (key-major ``offsets [T*B+1]``, ``indices`` local
to their table, ``table_row_offsets [T+1]`` or ``[T, 2]``, optional ``per_sample_weights`` with sum pooling)
plus ``embedding_dim``; the output is float32 ``[B, T, D]``, accumulated in fp32, empty bags zero. Forward only:
training keeps fp32/bf16 tables. Honours ``LATTICE_OPS=reference`` (:mod:`lattice.ops.reference.pooling_int8`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from lattice.ops import _library  # noqa: F401  (registers the schemas)
from lattice.ops._backend import use_reference
from lattice.ops.int8_rows import dequantize_rows_int8, int8_row_bytes, quantize_rows_int8
from lattice.ops.pooling import SUM, _match_offsets, _num_tables, pooling_mode
from lattice.ops.reference import pooling_int8 as _ref

__all__ = ["jagged_embedding_pool_int8", "quantize_rows_int8", "dequantize_rows_int8", "int8_row_bytes"]

_ops = torch.ops.lattice


@torch.library.register_fake("lattice::jagged_embedding_pool_int8")
def _pool_int8_fake(weights, table_row_offsets, indices, offsets, pooling, per_sample_weights, embedding_dim):
    T = _num_tables(table_row_offsets)
    torch._check(T >= 1)
    torch._check(embedding_dim >= 1)
    torch._check(weights.shape[1] == int8_row_bytes(embedding_dim))
    B = (offsets.shape[0] - 1) // T
    return weights.new_empty((B, T, embedding_dim), dtype=torch.float32)


def jagged_embedding_pool_int8(
    weights: Tensor,
    table_row_offsets: Tensor,
    indices: Tensor,
    offsets: Tensor,
    pooling: Union[int, str] = SUM,
    per_sample_weights: Optional[Tensor] = None,
    *,
    embedding_dim: int,
) -> Tensor:
    """Pool every bag of every int8 table in one call; returns float32 ``[B, T, embedding_dim]``.

    ``out[b, t] = sum_j psw[j] * dequantize(weights[tro_start[t] + indices[j]])`` over the bag ``t*B+b``,
    divided by the bag length for ``"mean"``. Not differentiable: ``per_sample_weights`` that require grad
    under grad mode are an error.
    """
    if per_sample_weights is not None and per_sample_weights.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "jagged_embedding_pool_int8 is forward only (int8 tables are for inference): per_sample_weights must "
            "not require grad; detach them or run under torch.no_grad()"
        )
    mode = pooling_mode(pooling)
    offsets = _match_offsets(indices, offsets)
    impl = _ref if use_reference() else _ops
    return impl.jagged_embedding_pool_int8(
        weights, table_row_offsets, indices, offsets, mode, per_sample_weights, int(embedding_dim)
    )
