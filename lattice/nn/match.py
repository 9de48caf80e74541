"""Exact candidate-in-history match: which history events are the very item (or cluster, brand, ...)
being scored, as DIN's target attention and SIM's hard search use it.

Re-engagement (the candidate is in the user's history) is one of the strongest signals in ads and
recommendation logs, yet a network sees it only through embedding similarity: a history event and the
candidate look up the same table row, and attention has to discover that a dot product of a row with
itself is special. In practice it barely does (on the planted world a LatticeNetwork's logit moved by
0.02 where the planted effect is 1.0-1.5). :class:`HistoryMatch` hands the network the exact match.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lattice.sparse import KeyedJaggedTensor, jagged_positions, jagged_row_ids

__all__ = ["HistoryMatch", "match_pairs"]


def match_pairs(schema: Any) -> list[tuple[str, str, int]]:
    """``(sequence feature, sparse feature, table rows)`` for every sequence feature and every sparse
    feature that look up the same embedding table (``hist_items`` and ``item`` both on table
    ``item``): the ids of such a pair live in one id space, so equal ids are the same entity."""
    out = []
    for s in schema.sequence_features:
        for c in schema.sparse_features:
            if c.table == s.table:
                out.append((s.name, c.name, int(s.num_embeddings)))
    return out


class HistoryMatch(nn.Module):
    """Marks the history events whose id is one of the sample's candidate ids, per
    :func:`match_pairs` pair, and summarizes them per sample.

    Per pair p and sample b, three numbers: whether any event matches, ``log1p`` of how many do, and
    ``1 / (1 + r)`` with r the recency of the latest match (0 = the most recent event; 0 when none
    matches). A learned affine map (per pair) turns them into one token ``[d]``; a learned vector per
    pair is also added to every matching event, so the sequence layers can attend to it.

    Args:
        pairs: ``(sequence feature, sparse feature, table rows)`` triples (see :func:`match_pairs`).
        sequence_names: the keys of ``batch.sequences``, in order.
        sparse_names: the keys of ``batch.sparse``, in order.
        dim: d.

    Shape: ``forward(sparse, sequences)`` -> ``(tokens [B, P, d], event_bias [S, d])``, ``event_bias``
    in the key-major event order of ``sequences.values()``.
    """

    num_stats = 3

    def __init__(self, pairs: Sequence[tuple[str, str, int]], sequence_names: Sequence[str],
                 sparse_names: Sequence[str], dim: int) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("history match needs a sequence feature and a sparse feature on one embedding table "
                             "(e.g. hist_items with shared_table: item, and item); the schema has none")
        seq_index = {n: i for i, n in enumerate(sequence_names)}
        sparse_index = {n: i for i, n in enumerate(sparse_names)}
        for s, c, _ in pairs:
            if s not in seq_index:
                raise ValueError(f"history match pair ({s!r}, {c!r}): {s!r} is not a sequence feature "
                                 f"{list(sequence_names)}")
            if c not in sparse_index:
                raise ValueError(f"history match pair ({s!r}, {c!r}): {c!r} is not a sparse feature "
                                 f"{list(sparse_names)}")
        self.pairs = [(s, c, int(rows)) for s, c, rows in pairs]
        self.sequence_names, self.sparse_names = list(sequence_names), list(sparse_names)
        self._index = [(seq_index[s], sparse_index[c], int(rows)) for s, c, rows in pairs]
        self.dim = dim
        P = len(pairs)
        self.weight = nn.Parameter(torch.randn(P, self.num_stats, dim) * (1.0 / self.num_stats) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(P, dim))
        self.event_vector = nn.Parameter(torch.randn(P, dim) * 0.02)

    @property
    def num_tokens(self) -> int:
        return len(self.pairs)

    def matches(self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor) -> Tensor:
        """``[P, S]`` bool: event e (key-major in ``sequences.values()``) belongs to pair p's sequence
        feature and its id is one of its sample's ids of pair p's sparse feature."""
        return self._matches(sparse, sequences, self._event_bags(sequences))

    @staticmethod
    def _event_bags(sequences: KeyedJaggedTensor) -> Tensor:
        """``[S]`` key-major bag id ``k * B + b`` of every event."""
        return jagged_row_ids(sequences.lengths().long(), sequences.values().shape[0])

    def _matches(self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor, ev_bag: Tensor) -> Tensor:
        if sequences.keys() != self.sequence_names or sparse.keys() != self.sparse_names:
            raise ValueError(f"history match was built for sequences {self.sequence_names} and sparse "
                             f"{self.sparse_names}, got {sequences.keys()} and {sparse.keys()}")
        seq_keys, cand_keys = sequences.offset_per_key_or_none(), sparse.offset_per_key_or_none()
        if seq_keys is not None and cand_keys is not None and not torch.compiler.is_compiling():  # ints: guards
            return self._matches_per_key(sparse, sequences, seq_keys, cand_keys)
        B = sequences.stride()
        ev_ids = sequences.values().long()
        ev_feature, ev_sample = ev_bag // B, ev_bag % B
        cand_ids = sparse.values().long()
        cand_bag = jagged_row_ids(sparse.lengths().long(), cand_ids.shape[0])
        cand_feature, cand_sample = cand_bag // B, cand_bag % B
        out = []
        for s_idx, c_idx, rows in self._index:
            # (sample, id) as one sortable key; ids lie in [0, rows), so B * rows is above every key
            sentinel = B * rows
            keys = torch.where(cand_feature == c_idx, cand_sample * rows + cand_ids, sentinel)
            out.append(_found(keys, ev_sample * rows + ev_ids, sentinel) & (ev_feature == s_idx))
        return torch.stack(out) if out else ev_ids.new_zeros((0, ev_ids.shape[0]), dtype=torch.bool)

    def _matches_per_key(self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor, seq_keys: list[int],
                         cand_keys: list[int]) -> Tensor:
        """:meth:`_matches` when both KJTs know where each key's values lie (``offset_per_key`` without a sync):
        each pair sorts only its sparse feature's ids and searches only its sequence feature's events."""
        B, S = sequences.stride(), sequences.values().shape[0]
        ev_lengths, cand_lengths = sequences.lengths().long(), sparse.lengths().long()
        out = []
        for s_idx, c_idx, rows in self._index:
            e0, e1, c0, c1 = seq_keys[s_idx], seq_keys[s_idx + 1], cand_keys[c_idx], cand_keys[c_idx + 1]
            cand_sample = jagged_row_ids(cand_lengths[c_idx * B:(c_idx + 1) * B], c1 - c0)
            keys = cand_sample * rows + sparse.values()[c0:c1].long()  # (sample, id) as one key, as in _matches
            ev_sample = jagged_row_ids(ev_lengths[s_idx * B:(s_idx + 1) * B], e1 - e0)
            hit = _found(keys, ev_sample * rows + sequences.values()[e0:e1].long(), B * rows)
            out.append(torch.cat([hit.new_zeros(e0), hit, hit.new_zeros(S - e1)]))
        return torch.stack(out) if out else sequences.values().new_zeros((0, S), dtype=torch.bool)

    def forward(self, sparse: KeyedJaggedTensor, sequences: KeyedJaggedTensor) -> tuple[Tensor, Tensor]:
        B = sequences.stride()
        lengths = sequences.lengths().long()
        total = sequences.values().shape[0]
        bag = self._event_bags(sequences)
        matched = self._matches(sparse, sequences, bag)  # [P, S]
        sample = bag % B
        dtype = self.weight.dtype
        recency = (lengths[bag] - 1 - jagged_positions(sequences.offsets().long(), total)).to(dtype)
        P = matched.shape[0]
        count = torch.zeros(P, B, dtype=dtype, device=bag.device).index_add_(1, sample, matched.to(dtype))
        far = torch.full((P, B), float("inf"), dtype=dtype, device=bag.device)
        cand_recency = torch.where(matched, recency, recency.new_full((), float("inf")))
        latest = far.scatter_reduce(1, sample.expand(P, -1), cand_recency, reduce="amin", include_self=True)
        any_match = (count > 0).to(dtype)
        closeness = torch.where(count > 0, 1.0 / (1.0 + latest.clamp(max=1e9)), torch.zeros_like(latest))
        stats = torch.stack([any_match, torch.log1p(count), closeness], dim=-1)  # [P, B, 3]
        tokens = torch.einsum("pbs,psd->bpd", stats, self.weight) + self.bias  # [B, P, d]
        event_bias = matched.to(dtype).transpose(0, 1) @ self.event_vector  # [S, d]
        return tokens, event_bias

    def flops(self) -> float:
        """Per sample: the per-pair affine maps (the per-event work is comparisons, not counted)."""
        return 2.0 * len(self.pairs) * self.num_stats * self.dim


def _found(keys: Tensor, queries: Tensor, sentinel: int) -> Tensor:
    """``[Q]`` whether each of ``queries [Q]`` is among ``keys [K]`` (unsorted; every key and query below
    ``sentinel``, which bounds the search so that no position runs past the end)."""
    keys = torch.cat([keys, keys.new_full((1,), sentinel)]).sort().values
    pos = torch.searchsorted(keys, queries).clamp(max=keys.numel() - 1)
    return keys[pos] == queries
