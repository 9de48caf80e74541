"""Exchange of sparse embedding-row gradients across data-parallel ranks.

A fused in-backward optimizer (:func:`lattice.ops.jagged_embedding_pool_fused`) updates the embedding
rows of its own batch. Under data parallelism every rank holds a full replica of the tables, so each
rank must apply the update of the *global* batch, or the replicas drift apart. Before the fused update,
every rank therefore all-gathers the unique rows its batch touched with their summed gradients
(``rows [U_r]``, ``row_grads [U_r, D]``), reduces the union to unique rows, and applies the same
update; the replicas stay bit-identical, and the result equals single-process training on the
concatenated batch up to summation order.

Cost per step and per table group: every rank receives ``sum_r U_r`` rows of ``D`` gradient values
(``W * max_r U_r`` with the padding the fixed-shape collective needs), so traffic grows linearly with the
number of ranks ``W`` and with the unique rows per rank batch, never with the table size. This is the
regime data-parallel tables are for (TorchRec's data-parallel sharding all-reduces a dense gradient of
the whole table instead, ``rows_total * D`` per step); tables too big for that should be row- or
table-sharded, which this exchange does not do.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size_of", "allgather_sparse_rows", "coalesce_rows"]


def world_size_of(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group`` (1 when torch.distributed is not initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def coalesce_rows(rows: Tensor, row_grads: Tensor) -> Tuple[Tensor, Tensor]:
    """Unique sorted ``rows [U]`` and their summed gradients ``[U, D]`` from ``rows [N]``, ``row_grads [N, D]``.

    The sum runs in the order of ``rows`` (index_add in input order), so every rank given the same
    inputs gets the same bits.
    """
    unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    summed = row_grads.new_zeros((unique.numel(), row_grads.shape[1]))
    summed.index_add_(0, inverse, row_grads)
    return unique, summed


def allgather_sparse_rows(rows: Tensor, row_grads: Tensor, group: Optional[dist.ProcessGroup] = None
                          ) -> Tuple[Tensor, Tensor]:
    """All ranks' ``(rows [U_r] int64, row_grads [U_r, D])`` reduced to the union's unique rows and summed grads.

    Every rank gets the same result. Rows are gathered in rank order, so the sums are deterministic.
    """
    if rows.dim() != 1 or row_grads.dim() != 2 or row_grads.shape[0] != rows.shape[0]:
        raise ValueError(f"allgather_sparse_rows: rows must be [U] and row_grads [U, D]; got "
                         f"{tuple(rows.shape)} and {tuple(row_grads.shape)}")
    world = world_size_of(group)
    if world == 1:
        return rows, row_grads
    rows = rows.to(torch.int64).contiguous()
    row_grads = row_grads.contiguous()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c.item()) for c in counts]
    longest = max(sizes)
    if longest == 0:
        return rows, row_grads
    padded_rows = rows.new_zeros(longest)
    padded_rows[: rows.numel()] = rows
    padded_grads = row_grads.new_zeros((longest, row_grads.shape[1]))
    padded_grads[: rows.numel()] = row_grads
    all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    all_grads = [torch.empty_like(padded_grads) for _ in range(world)]
    dist.all_gather(all_rows, padded_rows, group=group)
    dist.all_gather(all_grads, padded_grads, group=group)
    rows_cat = torch.cat([r[:n] for r, n in zip(all_rows, sizes)])
    grads_cat = torch.cat([g[:n] for g, n in zip(all_grads, sizes)])
    return coalesce_rows(rows_cat, grads_cat)
