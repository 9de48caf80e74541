"""Embedding tables as served: frozen weights pooled by the forward op only.

:func:`freeze_tables` replaces every :class:`~lattice.nn.EmbeddingBagCollection` of a network (a copy) with a
:class:`ServingEmbeddingBagCollection`, which pools each packed group of tables through a :class:`TablePool`.
A ``TablePool`` owns one group's weights ``[rows, D]`` and calls ``torch.ops.lattice.jagged_embedding_pool``;
no fused optimizer, no optimizer state, no gradient. It is the one place a quantized table format plugs in:
a pool with the same ``forward`` over another storage replaces :class:`Fp32TablePool` per group, and nothing
else in the inference graph changes. :func:`quantize_tables` does that for int8 row-wise tables
(:class:`Int8TablePool`, pooled by ``torch.ops.lattice.jagged_embedding_pool_int8``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lattice.nn.embedding import EmbeddingBagCollection
from lattice.ops.pooling import jagged_embedding_pool
from lattice.ops.pooling_int8 import dequantize_rows_int8, jagged_embedding_pool_int8, quantize_rows_int8
from lattice.sparse import KeyedJaggedTensor

__all__ = ["QUANTIZATIONS", "TablePool", "Fp32TablePool", "Int8TablePool", "ServingEmbeddingBagCollection",
           "freeze_tables", "quantize_tables", "table_bytes"]

QUANTIZATIONS = ("none", "int8")  # table formats of a served model: as trained, int8 row-wise


class TablePool(nn.Module):
    """One packed group of tables, forward only.

    ``forward(table_row_offsets, indices [N], offsets [F*B+1], per_sample_weights [N] | None) -> [B, F, D]``
    pooled with the group's pooling, in the op's key-major layout.
    """

    pooling: str

    def forward(self, table_row_offsets: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes of the table storage."""
        raise NotImplementedError

    def dense_weight(self) -> Tensor:
        """The rows as the pool reads them, ``[rows, D]`` float (dequantized for a quantized pool)."""
        raise NotImplementedError


class Fp32TablePool(TablePool):
    """Weights ``[rows, D]`` kept as trained (fp32, or bf16/fp16 storage with fp32 accumulation)."""

    def __init__(self, weight: Tensor, pooling: str) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.pooling = pooling

    def forward(self, table_row_offsets: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor]) -> Tensor:
        return jagged_embedding_pool(self.weight, table_row_offsets, indices, offsets, self.pooling, per_sample_weights)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def dense_weight(self) -> Tensor:
        return self.weight


class Int8TablePool(TablePool):
    """Weights quantized row-wise to int8 (:func:`lattice.ops.quantize_rows_int8`'s layout: ``uint8 [rows,
    int8_row_bytes(D)]``, codes then fp32 scale and bias), pooled with fp32 accumulation; the output is float32
    ``[B, F, D]`` like :class:`Fp32TablePool`'s. Each value is within half a quantization step (``(max - min) /
    510`` of its row) of the trained one."""

    def __init__(self, weight: Tensor, pooling: str) -> None:
        super().__init__()
        self.embedding_dim = int(weight.shape[1])
        self.register_buffer("qweight", quantize_rows_int8(weight.detach()))
        self.pooling = pooling

    def forward(self, table_row_offsets: Tensor, indices: Tensor, offsets: Tensor,
                per_sample_weights: Optional[Tensor]) -> Tensor:
        return jagged_embedding_pool_int8(self.qweight, table_row_offsets, indices, offsets, self.pooling,
                                          per_sample_weights, embedding_dim=self.embedding_dim)

    def nbytes(self) -> int:
        return self.qweight.numel()

    def dense_weight(self) -> Tensor:
        return dequantize_rows_int8(self.qweight, self.embedding_dim)


class ServingEmbeddingBagCollection(EmbeddingBagCollection):
    """An :class:`EmbeddingBagCollection` whose groups pool through :class:`TablePool` modules (``pools``,
    keyed like its ``weights``). Same features, same outputs; built by :func:`freeze_tables`."""

    @classmethod
    def from_trained(cls, trained: EmbeddingBagCollection) -> "ServingEmbeddingBagCollection":
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        skip = {"_parameters", "_buffers", "_modules"}
        out.__dict__.update({k: v for k, v in trained.__dict__.items() if k not in skip})
        for name, buf in trained._buffers.items():  # the per-group row ranges
            out.register_buffer(name, buf.clone(), persistent=False)
        out.fused_optimizer = None
        out.process_group = None
        out.pools = nn.ModuleDict({g.key: Fp32TablePool(trained.weights[g.key], g.pooling) for g in trained._groups})
        return out

    def _pool_group(self, g, kjt: KeyedJaggedTensor) -> Tensor:
        tro = getattr(self, f"_tro_{g.key}")
        psw = kjt.weights_or_none() if self.is_weighted else None
        return self.pools[g.key](tro, kjt.values(), kjt.offsets(), psw)

    def embedding_weight(self, table: str) -> Tensor:
        g = self._group_of_table(table)
        start = g.table_start[table]
        n = next(t.num_embeddings for t in g.tables if t.name == table)
        return self.pools[g.key].dense_weight()[start: start + n]

    def set_fused_optimizer(self, *args, **kwargs) -> None:
        raise RuntimeError("a served embedding collection has no optimizer; train the original network instead")


def freeze_tables(network: nn.Module) -> nn.Module:
    """Replace, in place, every trained :class:`EmbeddingBagCollection` under ``network`` with a
    :class:`ServingEmbeddingBagCollection` over the same weights (copied). Returns ``network``."""
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, EmbeddingBagCollection) and not isinstance(child, ServingEmbeddingBagCollection):
                setattr(parent, name, ServingEmbeddingBagCollection.from_trained(child))
    return network


def quantize_tables(network: nn.Module, quantization: str) -> nn.Module:
    """Swap, in place, every :class:`Fp32TablePool` under ``network`` (after :func:`freeze_tables`) for the
    pool of ``quantization`` (one of :data:`QUANTIZATIONS`; ``"none"`` changes nothing). Returns ``network``.

    Raises ``ValueError`` naming the argument for an unknown format, and for a network with no served tables
    to quantize (``"int8"`` on a network that has none would silently serve fp32).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {list(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return network
    collections = [m for m in network.modules() if isinstance(m, ServingEmbeddingBagCollection)]
    if not collections:
        raise ValueError(f"quantization={quantization!r}: the network has no served embedding tables "
                         "(call freeze_tables first)")
    for ebc in collections:
        for key, pool in list(ebc.pools.items()):
            if isinstance(pool, Fp32TablePool):
                ebc.pools[key] = Int8TablePool(pool.weight, pool.pooling)
    return network


def table_bytes(network: nn.Module) -> int:
    """Bytes of every served table under ``network`` (after :func:`freeze_tables`)."""
    return sum(m.nbytes() for m in network.modules() if isinstance(m, TablePool))
