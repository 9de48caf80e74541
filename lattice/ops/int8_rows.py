"""Int8 row-wise quantized embedding tables: the layout, the quantizer and its inverse (pure torch).

Each row of ``D`` values becomes ``row_bytes(D)`` bytes::

    [ D uint8 codes | zero padding to a multiple of 8 | fp32 scale | fp32 bias ]

with ``value = scale * code + bias``, ``bias`` the row's minimum and ``scale = (max - min) / 255``, so every
value is within ``scale / 2`` of its dequantized value. The kernels read the same layout
(``csrc/include/lattice/int8_rows.h``); docs/serving.md says why this one. At ``D = 64`` a row is 72 bytes,
0.28x of its 256 fp32 bytes.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "INT8_ROW_ALIGN", "int8_code_bytes", "int8_row_bytes", "int8_row_qparams", "quantize_rows_int8", "dequantize_rows_int8",
]

INT8_ROW_ALIGN = 8  # bytes: the codes' padding and every row's size are multiples of this
_LEVELS = 255
_CHUNK_ROWS = 1 << 16  # rows quantized at a time: bounds the fp32 temporaries of a 10M-row table


def int8_code_bytes(embedding_dim: int) -> int:
    """Bytes of codes (padded) in a row of ``embedding_dim`` columns; the scale and bias follow them."""
    return -(-int(embedding_dim) // INT8_ROW_ALIGN) * INT8_ROW_ALIGN


def int8_row_bytes(embedding_dim: int) -> int:
    """Bytes of one quantized row of ``embedding_dim`` columns (codes, padding, fp32 scale and bias)."""
    return int8_code_bytes(embedding_dim) + 8


def quantize_rows_int8(weights: Tensor) -> Tensor:
    """``weights [R, D]`` (fp32, bf16, fp16 or fp64) -> ``uint8 [R, int8_row_bytes(D)]``, row by row.

    Each row's min and max set its bias and scale (a constant row gets scale 0 and dequantizes exactly);
    codes are ``round((x - bias) / scale)``. Non-finite values are rejected, naming the first such row.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 2:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"quantize_rows_int8: weights must be a 2-D tensor [rows, embedding_dim], got {shape}")
    if not weights.is_floating_point():
        raise ValueError(f"quantize_rows_int8: weights must be floating point, got {weights.dtype}")
    rows, dim = weights.shape
    if dim < 1:
        raise ValueError("quantize_rows_int8: weights must have at least one column, got 0")
    code_bytes = int8_code_bytes(dim)
    out = torch.zeros(rows, code_bytes + 8, dtype=torch.uint8, device=weights.device)
    with torch.no_grad():
        for lo in range(0, rows, _CHUNK_ROWS):
            x = weights[lo:lo + _CHUNK_ROWS].float()
            finite = torch.isfinite(x).all(1)
            if not bool(finite.all()):
                bad = lo + int((~finite).nonzero()[0, 0])
                raise ValueError(f"quantize_rows_int8: weights row {bad} has a non-finite value")
            bias = x.amin(1)
            scale = (x.amax(1) - bias) / _LEVELS
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = torch.round((x - bias[:, None]) / divisor[:, None]).clamp_(0, _LEVELS)
            chunk = out[lo:lo + x.shape[0]]
            chunk[:, :dim] = codes.to(torch.uint8)
            chunk[:, code_bytes:] = torch.stack([scale, bias], 1).contiguous().view(torch.uint8)
    return out


def _check_rows(q: Tensor, embedding_dim: int, who: str) -> None:
    if not isinstance(q, Tensor) or q.dim() != 2 or q.dtype != torch.uint8:
        desc = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"{who}: weights must be a uint8 tensor [rows, row_bytes] from quantize_rows_int8, got {desc}")
    if int(embedding_dim) < 1:
        raise ValueError(f"{who}: embedding_dim must be >= 1, got {embedding_dim}")
    want = int8_row_bytes(embedding_dim)
    if q.shape[1] != want:
        raise ValueError(
            f"{who}: weights must have {want} bytes per row for embedding_dim={embedding_dim}, got {q.shape[1]}"
        )


def int8_row_qparams(q: Tensor, embedding_dim: int) -> tuple[Tensor, Tensor]:
    """(scale [R], bias [R]) fp32 of quantized rows ``q [R, int8_row_bytes(embedding_dim)]``."""
    _check_rows(q, embedding_dim, "int8_row_qparams")
    start = int8_code_bytes(embedding_dim)
    sb = q[:, start:start + 8].contiguous().view(torch.float32)
    return sb[:, 0], sb[:, 1]


def dequantize_rows_int8(q: Tensor, embedding_dim: int) -> Tensor:
    """``uint8 [R, int8_row_bytes(embedding_dim)]`` -> ``float32 [R, embedding_dim]``: ``scale * code + bias``."""
    _check_rows(q, embedding_dim, "dequantize_rows_int8")
    scale, bias = int8_row_qparams(q, embedding_dim)
    return q[:, :embedding_dim].float() * scale[:, None] + bias[:, None]
