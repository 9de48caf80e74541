"""The flat inputs of an :class:`~lattice.serve.inference.InferenceModule`: from a
:class:`~lattice.batch.Batch` (:func:`flat_inputs`), or drawn at random for a schema (:func:`random_inputs`,
the example ``torch.export`` traces with and the benchmarks' requests)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lattice.data.schema import Schema
from lattice.nn.processors import parallel_sequences

__all__ = ["flat_inputs", "random_inputs", "num_rows"]


def flat_inputs(batch: Any, schema: Schema, teacher_embedding_dim: Optional[int] = None) -> tuple[Tensor, ...]:
    """The inputs of :data:`~lattice.serve.inference.INPUT_NAMES` from a Batch of ``schema`` (int64 ids and
    offsets, bool masks; parallel sequence features as ``[Fq, N]`` values and ``[N]`` timestamps). With
    ``teacher_embedding_dim`` (a KTAP student) also ``teacher_embedding [B, E]`` and ``teacher_mask [B]``:
    the batch's, or zeros and ``False`` (a store miss) where it carries none."""
    seq = batch.sequences
    ts = batch.sequence_timestamps
    values = seq.values().long()
    stamps = ts.values().long() if ts is not None else torch.zeros_like(values)
    if parallel_sequences(schema.sequence_features):
        values = values.view(len(seq.keys()), -1)  # one event list, a row per feature
        stamps = stamps[: values.shape[1]]
    inputs = (
        batch.dense.float(), batch.dense_mask.bool(), batch.sparse.values().long(), batch.sparse.offsets().long(),
        batch.sparse_mask.bool(), values, seq.offsets().long(), stamps, batch.domain.long(),
    )
    if teacher_embedding_dim is None:
        return inputs
    B = int(batch.domain.shape[0])
    emb = getattr(batch, "teacher_embedding", None)
    mask = getattr(batch, "teacher_mask", None)
    if emb is None:
        return inputs + (torch.zeros(B, teacher_embedding_dim), torch.zeros(B, dtype=torch.bool))
    if mask is None:
        mask = torch.ones(B, dtype=torch.bool)
    return inputs + (emb.float(), mask.bool())


def num_rows(inputs: tuple[Tensor, ...]) -> int:
    """``B`` of a flat input tuple (the length of ``domain``)."""
    return int(inputs[8].shape[0])


def _present(schema: Schema, kind: str, domain: Tensor) -> Tensor:
    """``[B, F]`` bool: does each row's domain have each feature of ``kind``."""
    table = torch.as_tensor(schema.feature_presence(kind), dtype=torch.bool)
    if table.dim() != 2 or table.shape[0] == 0:
        return torch.ones(domain.shape[0], table.shape[-1] if table.dim() == 2 else 0, dtype=torch.bool)
    return table[domain]


def _bags(lengths: Tensor, highs: list[int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Key-major ``(values, offsets)`` for ``lengths [F, B]``, ids of key ``f`` in ``[0, highs[f])``."""
    lengths = lengths.long()
    if highs:
        high = torch.tensor(highs, dtype=torch.long).repeat_interleave(lengths.sum(1))
    else:
        high = torch.zeros(0, dtype=torch.long)
    values = (torch.rand(int(lengths.sum()), generator=gen) * high).long()
    offsets = torch.nn.functional.pad(torch.cumsum(lengths.reshape(-1), 0), (1, 0))
    return values, offsets


def random_inputs(schema: Schema, batch_size: int, seed: int = 0, max_bag: int = 3, empty_rate: float = 0.25,
                  absent_rate: float = 0.1, teacher_embedding_dim: Optional[int] = None) -> tuple[Tensor, ...]:
    """Random flat inputs for ``schema``: every domain's absent features absent, some present features absent
    at random (``absent_rate``), bags of 0..``max_bag`` ids, sequences of 0..``max_length`` events (empty
    with probability ``empty_rate``; parallel sequence features, which share a timestamps column, with equal
    lengths and timestamps), increasing timestamps, ids in range."""
    gen = torch.Generator().manual_seed(seed)
    B = batch_size
    domain = torch.randint(0, max(1, len(schema.domains)), (B,), generator=gen)
    Fd = len(schema.dense_features)
    dense_mask = _present(schema, "dense", domain) & (torch.rand(B, Fd, generator=gen) >= absent_rate)
    dense = torch.randn(B, Fd, generator=gen) * dense_mask
    sparse = schema.sparse_features
    sparse_mask = _present(schema, "sparse", domain) & (torch.rand(B, len(sparse), generator=gen) >= absent_rate)
    lengths = torch.randint(0, max_bag + 1, (len(sparse), B), generator=gen) * sparse_mask.T
    sparse_values, sparse_offsets = _bags(lengths, [int(f.num_embeddings) for f in sparse], gen)
    seq = schema.sequence_features
    caps = torch.tensor([int(f.max_length or 8) for f in seq], dtype=torch.long).view(-1, 1)
    seq_lengths = (torch.rand(len(seq), B, generator=gen) * (caps + 1)).long()
    seq_lengths = seq_lengths * (torch.rand(len(seq), B, generator=gen) >= empty_rate)
    seq_lengths = seq_lengths * _present(schema, "sequence", domain).T
    parallel = parallel_sequences(seq)
    if parallel:  # attributes of the same events: equal lengths, the same timestamps
        seq_lengths = seq_lengths[:1].expand(len(seq), B)
    seq_values, seq_offsets = _bags(seq_lengths, [int(f.num_embeddings) for f in seq], gen)
    # increasing within each sequence: a running sum of positive gaps, restarted per bag
    n_gaps = int(seq_lengths[0].sum()) if parallel else seq_values.numel()
    gaps = torch.randint(1, 86_400, (n_gaps,), generator=gen)
    if parallel:
        gaps = gaps.repeat(len(seq))
    run = torch.cumsum(gaps, 0)
    if run.numel():
        first = run[seq_offsets[:-1].clamp(max=run.numel() - 1)]  # each bag's first running sum
    else:
        first = torch.zeros(seq_lengths.numel(), dtype=torch.long)
    timestamps = 1_700_000_000 + run - torch.repeat_interleave(first, seq_lengths.reshape(-1))
    if parallel:  # one event list, a row of values per feature, one timestamp per event
        seq_values = seq_values.view(len(seq), -1)
        timestamps = timestamps[: seq_values.shape[1]]
    inputs = (dense, dense_mask, sparse_values, sparse_offsets, sparse_mask, seq_values, seq_offsets, timestamps,
              domain)
    if teacher_embedding_dim is not None:
        inputs += (torch.randn(B, teacher_embedding_dim, generator=gen), torch.rand(B, generator=gen) >= 0.2)
    return inputs
