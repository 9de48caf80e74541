"""Feature processors: turn a :class:`~lattice.batch.Batch` into tokens of width d.

- sparse features -> one token each, pooled by :class:`~lattice.nn.EmbeddingBagCollection` (the fused
  kernel); features naming the same ``shared_table`` share one table;
- dense features -> one token each (a per-feature affine map of the value), or a few tokens for all of
  them together;
- sequence features -> one jagged token stream per sample (an embedding per event, a learned recency
  position and an optional time-gap bucket); several sequences are merged by concatenation per sample
  (each event tagged with its feature) or, when they are parallel attributes of the same events, by
  InterFormer's MaskNet option;
- the sample's domain -> one token.

A feature that is absent in a row (``dense_mask``/``sparse_mask`` False, e.g. not collected in that
row's domain) becomes a learned per-feature "missing" token, never a faked zero. An empty bag of a
present sparse feature pools to zero, and an empty sequence is a sample with no events.

Sequence features draw their event embeddings from the same tables as the sparse features (a
``shared_table`` links e.g. a clicked-item history to the target item's table), looked up as bags of one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.nn.embedding import EmbeddingBagCollection, EmbeddingTableConfig
from lattice.nn.linear import MLP
from lattice.nn.match import HistoryMatch, match_pairs
from lattice.nn.norms import RunningStandardize, make_norm
from lattice.sparse import KeyedJaggedTensor, jagged_positions, jagged_row_ids

__all__ = [
    "JaggedTokens",
    "ProcessedFeatures",
    "EmbeddingTables",
    "DenseProcessor",
    "SparseProcessor",
    "SequenceProcessor",
    "FeatureProcessor",
    "parallel_sequences",
]


@dataclass
class JaggedTokens:
    """A jagged stream of d-wide tokens: sample b owns ``values[offsets[b]:offsets[b+1]]``.

    Attributes:
        values: ``[N, d]`` tokens, each sample's tokens oldest first.
        offsets: ``[B + 1]`` int64 row starts.
        positions: ``[N]`` int64 position of each token in its sample (0 = oldest).
    """

    values: Tensor
    offsets: Tensor
    positions: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def batch_size(self) -> int:
        return self.offsets.numel() - 1

    def replace(self, values: Tensor) -> "JaggedTokens":
        return JaggedTokens(values, self.offsets, self.positions)


@dataclass
class ProcessedFeatures:
    """What :class:`FeatureProcessor` returns.

    Attributes:
        tokens: ``[B, n, d]`` non-sequence tokens: sparse features, then dense, then the domain token,
            then the history-match tokens.
        sequence: the merged sequence stream, or ``None`` when the schema has no sequence features.
    """

    tokens: Tensor
    sequence: JaggedTokens | None


def parallel_sequences(features: Sequence[Any]) -> bool:
    """True when several sequence features are attributes of the same events: they all name one
    ``timestamps_column`` (e.g. ``hist_items`` and ``hist_clusters`` both timed by ``hist_ts``)."""
    columns = {getattr(f, "timestamps_column", None) for f in features}
    return len(features) > 1 and len(columns) == 1 and None not in columns


def _offsets(lengths: Tensor) -> Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


class EmbeddingTables(nn.Module):
    """All embedding tables of a schema, in :class:`EmbeddingBagCollection` s.

    One table per ``shared_table`` name (or per feature without one), sized by the largest
    ``num_embeddings`` among the features it serves, ``embedding_dim`` wide (default
    ``default_embedding_dim``). Tables serving only sparse features live in one collection per width;
    tables serving a sequence feature (possibly shared with sparse features, e.g. the target item and the
    clicked-item history) live in the ``"sequence"`` collection. Every lookup goes through the
    collections' fused kernel (and their fused optimizer), one call per collection per step.

    The ``"sequence"`` collection pools the batch's sparse bags and looks up every sequence event in the
    same call: a KeyedJaggedTensor of stride ``B + S`` (S events in all) whose first B rows are the
    sparse features' bags and whose row ``B + r`` is a bag of one, under event r's own feature only. So
    ``[B + S, F, D]`` comes back, a shared table gets one fused update per step, and no host sync is
    needed.

    Args:
        features: the sparse and sequence feature specs to serve.
        default_embedding_dim: width of tables whose features give no ``embedding_dim``.
        collection_kwargs: extra keyword arguments for every :class:`EmbeddingBagCollection`.
    """

    def __init__(
        self,
        features: Sequence[Any],
        default_embedding_dim: int,
        collection_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        tables: dict[str, dict[str, Any]] = {}
        for f in features:
            if not f.num_embeddings:
                raise ValueError(f"feature {f.name!r} ({f.kind}) needs num_embeddings for its embedding table")
            name = f.shared_table or f.name
            dim = f.embedding_dim or default_embedding_dim
            t = tables.setdefault(
                name, dict(rows=0, dim=dim, features=[], pooling=getattr(f, "pooling", "sum"), sequence=False)
            )
            if t["dim"] != dim:
                raise ValueError(
                    f"table {name!r} is shared by features with different embedding_dim ({t['dim']} and {dim})"
                )
            t["rows"] = max(t["rows"], int(f.num_embeddings))
            t["features"].append(f.name)
            t["sequence"] = t["sequence"] or f.kind == "sequence"
        self.sequence_features = [f.name for f in features if f.kind == "sequence"]
        seq_dims = {tables[f.shared_table or f.name]["dim"] for f in features if f.kind == "sequence"}
        if len(seq_dims) > 1:
            raise ValueError(f"all sequence features must share one embedding_dim, got {sorted(seq_dims)}")
        groups: dict[str, list[str]] = {}
        for name, t in tables.items():
            groups.setdefault("sequence" if t["sequence"] else f"sparse_d{t['dim']}", []).append(name)
        self.collections = nn.ModuleDict()
        self.feature_dim: dict[str, int] = {}
        self._collection_of: dict[str, str] = {}
        for key, names in sorted(groups.items()):
            configs = [
                EmbeddingTableConfig(
                    name=n,
                    num_embeddings=tables[n]["rows"],
                    embedding_dim=tables[n]["dim"],
                    feature_names=list(tables[n]["features"]),
                    pooling=tables[n]["pooling"],
                )
                for n in names
            ]
            self.collections[key] = EmbeddingBagCollection(configs, **(collection_kwargs or {}))
            for n in names:
                for fname in tables[n]["features"]:
                    self.feature_dim[fname] = tables[n]["dim"]
                    self._collection_of[fname] = key
        self.table_of = {f: name for name, t in tables.items() for f in t["features"]}
        self.sequence_dim = seq_dims.pop() if seq_dims else None

    def forward(
        self, sparse: KeyedJaggedTensor | None, sequences: KeyedJaggedTensor | None = None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """Pooled embeddings ``{feature: [B, D]}`` of every key of ``sparse``, and the unpooled
        embeddings ``[S, D]`` of every event of ``sequences`` (keys = the schema's sequence features, in
        order), in its key-major value order (``None`` without sequences)."""
        pooled: dict[str, Tensor] = {}
        events = None
        sparse_keys = sparse.keys() if sparse is not None else []
        in_seq = {k for k in sparse_keys if self._collection_of[k] == "sequence"}
        for key in sorted({self._collection_of[k] for k in sparse_keys if k not in in_seq}):
            ebc = self.collections[key]
            out = ebc(sparse)  # [B, F_ebc, D]; the collection picks its own keys
            for f, column in zip(ebc.feature_names, out.unbind(1)):  # unbind: one stack in backward
                pooled[f] = column
        if "sequence" in self.collections and (in_seq or sequences is not None):
            seq_pooled, events = self._sequence_collection(sparse, in_seq, sequences)
            pooled.update(seq_pooled)
        return pooled, events

    def _sequence_collection(
        self, sparse: KeyedJaggedTensor | None, in_seq: set[str], sequences: KeyedJaggedTensor | None
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """The sequence collection's lookups: pooled ``{feature: [B, D]}`` of the sparse features in
        ``in_seq``, and the events' embeddings ``[S, D]`` (``None`` without ``sequences``)."""
        ebc = self.collections["sequence"]
        names = ebc.feature_names
        seq_names = set(self.sequence_features)
        sparse_names = [f for f in names if f not in seq_names]
        if sparse is not None and sparse_names and not in_seq.issuperset(sparse_names):
            missing = sorted(set(sparse_names) - in_seq)
            raise ValueError(f"batch.sparse lacks features {missing}")
        device = sparse.values().device if sparse is not None else sequences.values().device
        B = sparse.stride() if sparse is not None else sequences.stride()
        S = sequences.values().numel() if sequences is not None else 0
        parts = []
        if sparse_names:
            if sparse is not None:
                part = sparse.permute([sparse.index_per_key()[f] for f in sparse_names])
                values, lengths = part.values(), part.lengths().long().view(len(sparse_names), B)
            else:  # sequences only: the sparse features of these tables get empty bags
                values = torch.zeros(0, dtype=torch.long, device=device)
                lengths = torch.zeros(len(sparse_names), B, dtype=torch.long, device=device)
            lengths = torch.cat([lengths, lengths.new_zeros(len(sparse_names), S)], dim=1)
            parts.append(KeyedJaggedTensor(sparse_names, values, lengths=lengths.reshape(-1),
                                           stride=B + S, validate=False))
        K = len(self.sequence_features)
        r = torch.arange(S, device=device)
        if sequences is not None:
            if sequences.keys() != self.sequence_features:
                raise ValueError(
                    f"batch.sequences keys {sequences.keys()} differ from the sequence features {self.sequence_features}"
                )
            key_start = sequences.offsets()[torch.arange(K + 1, device=device) * B].long()  # [K + 1]
            own = ((r >= key_start[:-1, None]) & (r < key_start[1:, None])).long()  # [K, S]
            lengths = torch.cat([own.new_zeros(K, B), own], dim=1)
            ids = sequences.values().to(parts[0].values().dtype) if parts else sequences.values()
        else:
            lengths = torch.zeros(K, B, dtype=torch.long, device=device)
            ids = torch.zeros(0, dtype=torch.long, device=device)
        parts.append(KeyedJaggedTensor(self.sequence_features, ids, lengths=lengths.reshape(-1),
                                       stride=B + S, validate=False))
        out = ebc(KeyedJaggedTensor.concat(parts))  # [B + S, F, D]
        # split/unbind, not slices: each slice's backward zero-fills and adds a gradient of all of out [B + S, F, D]
        # (three fills and two adds of [24160, 4, 32], 12% of an MMoE step of configs/mdmo.yaml at B = 1024)
        samples, event_rows = out.split([B, out.shape[0] - B])
        columns = samples.unbind(1)
        pooled = {f: columns[i] for i, f in enumerate(names) if f in in_seq}
        events = None
        if sequences is not None:
            # Row B + r holds one non-empty bag (event r's own feature); every other column pooled an empty bag
            # to zero, so the sum over features is that column exactly. Its backward is an expand, not the
            # zero-fill of [S, F, D] and scatter that picking the column by an advanced index costs.
            events = event_rows.sum(1)
        return pooled, events

    def pooled(self, kjt: KeyedJaggedTensor) -> list[Tensor]:
        """Pooled embeddings of every key of ``kjt`` (sparse features): a list of ``[B, D_k]``, key order."""
        pooled, _ = self(kjt, None)
        return [pooled[k] for k in kjt.keys()]

    def sequence_lookup(self, sequences: KeyedJaggedTensor) -> Tensor:
        """Unpooled embeddings ``[S, D]`` of every event of ``sequences``, key-major value order."""
        return self(None, sequences)[1]


class DenseProcessor(nn.Module):
    """Dense features -> tokens.

    ``num_tokens=None``: one token per feature, ``value * w_f + b_f``; an absent value gives the
    feature's learned missing token ``m_f``. ``num_tokens=k``: all values and presence bits together
    through one linear map to k tokens (for schemas with many dense features). ``standardize``: the values
    are first standardized by their running training statistics (:class:`~lattice.nn.RunningStandardize`).

    Shape: ``dense [B, F], dense_mask [B, F] -> [B, F or k, d]``.
    """

    def __init__(
        self, num_features: int, dim: int, num_tokens: int | None = None, bias: bool = True, standardize: bool = False
    ) -> None:
        super().__init__()
        self.num_features, self.dim, self.grouped = num_features, dim, num_tokens is not None
        self.standardize = RunningStandardize(num_features) if standardize else None
        if num_tokens is None:
            self.num_tokens = num_features
            self.weight = nn.Parameter(torch.randn(num_features, dim) / dim**0.5)
            self.bias = nn.Parameter(torch.zeros(num_features, dim)) if bias else None
            self.missing = nn.Parameter(torch.randn(num_features, dim) * 0.02)
        else:
            self.num_tokens = num_tokens
            self.proj = MLP(2 * num_features, (), num_tokens * dim, bias=bias)

    def forward(self, dense: Tensor, dense_mask: Tensor) -> Tensor:
        if self.standardize is not None:
            dense = self.standardize(dense, dense_mask)
        if self.grouped:
            present = dense_mask.to(dense.dtype)
            x = torch.cat([dense * present, present], dim=1)
            return self.proj(x).view(dense.shape[0], self.num_tokens, self.dim)
        tokens = dense.unsqueeze(-1) * self.weight
        if self.bias is not None:
            tokens = tokens + self.bias
        return torch.where(dense_mask.unsqueeze(-1), tokens, self.missing.to(tokens.dtype))

    def flops(self) -> float:
        return self.proj.flops() if self.grouped else 2.0 * self.num_features * self.dim


class SparseProcessor(nn.Module):
    """Sparse features -> one pooled token each (projected to d where the table is narrower/wider);
    an absent feature gives its learned missing token.

    Shape: pooled ``{feature: [B, D_f]}``, ``sparse_mask [B, F]`` -> ``[B, F, d]``.
    """

    def __init__(self, features: Sequence[Any], tables: EmbeddingTables, dim: int) -> None:
        super().__init__()
        self.names = [f.name for f in features]
        self.dim = dim
        self.tables = [tables]  # not registered here: the FeatureProcessor owns the tables
        self.proj = nn.ModuleDict(
            {
                str(d): nn.Linear(d, dim, bias=False)
                for d in sorted({tables.feature_dim[n] for n in self.names})
                if d != dim
            }
        )
        self.missing = nn.Parameter(torch.randn(len(self.names), dim) * 0.02)

    def forward(self, pooled: dict[str, Tensor], sparse_mask: Tensor) -> Tensor:
        """``pooled``: ``{feature: [B, D_f]}`` from :class:`EmbeddingTables`."""
        tokens = torch.stack(
            [p if p.shape[-1] == self.dim else self.proj[str(p.shape[-1])](p) for p in (pooled[n] for n in self.names)],
            dim=1,
        )
        return torch.where(sparse_mask.unsqueeze(-1), tokens, self.missing.to(tokens.dtype))

    def flops(self) -> float:
        return float(sum(2 * self.tables[0].feature_dim[n] * self.dim for n in self.names
                         if self.tables[0].feature_dim[n] != self.dim))


class SequenceProcessor(nn.Module):
    """Sequence features -> one merged jagged token stream per sample.

    Args:
        features: the sequence feature specs (keys of ``batch.sequences``, in order).
        tables: the shared :class:`EmbeddingTables`.
        dim: d.
        merge: ``"concat"`` — per sample, the events of feature 0, then feature 1, ... (each event also
            gets its feature's learned type embedding); ``"masknet"`` — the features are parallel
            attributes of the same events (equal lengths in every row) and are fused per event by a
            MaskNet block (instance-guided mask ``W2 relu(W1 e)`` times the concatenated embeddings,
            projected to d and normalized); ``"auto"`` — ``masknet`` when the features are parallel
            (:func:`parallel_sequences`), else ``concat``.
        max_positions: size of the learned recency-position table (position 0 = the most recent event;
            older events share the last slot); 0 disables positions (e.g. when attention uses RoPE only).
        time_buckets: number of log2 time-gap buckets (gap to the sample's latest event, from
            ``batch.sequence_timestamps``); 0 disables them.

    Shape: ``sequences`` KJT (stride B) -> :class:`JaggedTokens` with ``values [N, d]``.
    """

    def __init__(
        self,
        features: Sequence[Any],
        tables: EmbeddingTables,
        dim: int,
        merge: Literal["auto", "concat", "masknet"] = "auto",
        max_positions: int = 256,
        time_buckets: int = 32,
    ) -> None:
        super().__init__()
        if merge not in ("auto", "concat", "masknet"):
            raise ValueError(f"unknown sequence merge {merge!r}; expected 'auto', 'concat' or 'masknet'")
        if merge == "auto":
            merge = "masknet" if parallel_sequences(features) else "concat"
        self.names = [f.name for f in features]
        self.dim, self.merge = dim, merge
        self.tables = [tables]
        self.embedding_dim = tables.sequence_dim
        self.proj = nn.Linear(self.embedding_dim, dim, bias=False) if self.embedding_dim != dim else None
        k = len(self.names)
        if merge == "concat":
            self.type_embedding = nn.Parameter(torch.randn(k, dim) * 0.02) if k > 1 else None
        else:
            self.mask_mlp = MLP(k * dim, [k * dim], k * dim, activation="relu", bias=True)
            self.mask_out = nn.Linear(k * dim, dim, bias=False)
            self.mask_norm = make_norm("layer", dim)
        self.positions = nn.Embedding(max_positions, dim) if max_positions > 0 else None
        if self.positions is not None:
            nn.init.normal_(self.positions.weight, std=0.02)
        self.time = nn.Embedding(time_buckets, dim) if time_buckets > 0 else None
        if self.time is not None:
            nn.init.normal_(self.time.weight, std=0.02)

    def forward(
        self,
        sequences: KeyedJaggedTensor,
        timestamps: KeyedJaggedTensor | None = None,
        events: Tensor | None = None,
        event_bias: Tensor | None = None,
    ) -> JaggedTokens:
        """``events``: the ``[S, D]`` event embeddings from :class:`EmbeddingTables` (looked up here when
        not given). ``event_bias``: ``[S, d]`` added to every event before merging (key-major, like
        ``sequences.values()``; e.g. :class:`~lattice.nn.match.HistoryMatch`'s match vectors)."""
        if sequences.keys() != self.names:
            raise ValueError(
                f"batch.sequences keys {sequences.keys()} differ from the schema's sequence features {self.names}"
            )
        B, K = sequences.stride(), len(self.names)
        lengths = sequences.lengths().long().view(K, B)
        flat = events if events is not None else self.tables[0].sequence_lookup(sequences)  # [S, D] key-major
        if self.proj is not None:
            flat = self.proj(flat)
        total = flat.shape[0]
        bag = jagged_row_ids(lengths.reshape(-1), total)  # key-major bag id k*B + b of every event
        if event_bias is not None and self.merge == "concat":
            flat = flat + event_bias
        gaps = self._time_gaps(sequences, timestamps, bag, B) if self.time is not None else None
        if self.merge == "concat":
            if self.type_embedding is not None:
                flat = flat + self.type_embedding[bag // B]
            if gaps is not None:
                flat = flat + self.time(gaps)
            row_len = lengths.sum(0)  # [B]
            offsets = _offsets(row_len)
            # Destination of every key-major event in the sample-major merged stream.
            start = offsets[:-1].unsqueeze(0) + torch.cumsum(lengths, 0) - lengths  # [K, B]
            kjt_offsets = _offsets(lengths.reshape(-1))
            dest = start.reshape(-1)[bag] + (torch.arange(total, device=flat.device) - kjt_offsets[bag])
            tokens = torch.zeros_like(flat).index_copy(0, dest, flat)
        else:
            if K > 1 and not torch.compiler.is_compiling():
                if not bool((lengths == lengths[0:1]).all()):
                    raise ValueError(
                        f"sequence merge 'masknet' needs the sequence features {self.names} to have equal "
                        "lengths in every row (parallel attributes of the same events)"
                    )
            n0 = total // K
            e = flat.view(K, n0, self.dim).transpose(0, 1).reshape(n0, K * self.dim)  # [N0, K*d]
            mask = self.mask_mlp(e)
            tokens = self.mask_norm(self.mask_out(mask * e))
            if event_bias is not None:
                tokens = tokens + event_bias.view(K, n0, self.dim).sum(0)
            if gaps is not None:
                tokens = tokens + self.time(gaps[:n0])
            offsets = _offsets(lengths[0])
        positions = jagged_positions(offsets, tokens.shape[0])
        if self.positions is not None:
            row_len = offsets[1:] - offsets[:-1]
            recency = torch.repeat_interleave(row_len, row_len, output_size=tokens.shape[0]) - 1 - positions
            recency = recency.clamp(max=self.positions.num_embeddings - 1)
            tokens = tokens + self.positions(recency)
        return JaggedTokens(tokens, offsets, positions)

    def _time_gaps(
        self, sequences: KeyedJaggedTensor, timestamps: KeyedJaggedTensor | None, bag: Tensor, B: int
    ) -> Tensor | None:
        """log2 bucket of (latest event time of the sample - event time), key-major ``[S]``."""
        if timestamps is None:
            return None
        if timestamps.keys() != self.names:
            if sorted(timestamps.keys()) != sorted(self.names):
                return None  # timestamps only where every sequence has them
            timestamps = timestamps.permute([timestamps.keys().index(n) for n in self.names])
        ts = timestamps.values().long()
        if ts.shape[0] != bag.shape[0]:
            raise ValueError("batch.sequence_timestamps must be parallel to batch.sequences")
        sample = bag % B
        latest = torch.full((B,), torch.iinfo(torch.int64).min, dtype=torch.long, device=ts.device)
        latest = latest.scatter_reduce(0, sample, ts, reduce="amax", include_self=True)
        gap = (latest[sample] - ts).clamp(min=0).float()
        return torch.floor(torch.log2(gap + 1.0)).long().clamp(max=self.time.num_embeddings - 1)

    def flops(self, tokens: float) -> float:
        """FLOPs for ``tokens`` merged tokens per sample (concat: one per event of any feature; masknet:
        one per event, from K lookups)."""
        lookups = tokens * (len(self.names) if self.merge == "masknet" else 1)
        total = 2.0 * self.embedding_dim * self.dim * lookups if self.proj is not None else 0.0
        if self.merge == "masknet":
            total += (self.mask_mlp.flops() + 2.0 * len(self.names) * self.dim * self.dim) * tokens
        return total


class FeatureProcessor(nn.Module):
    """The whole input side of a network: a :class:`~lattice.batch.Batch` -> :class:`ProcessedFeatures`.

    Args:
        schema: the data :class:`~lattice.data.Schema`.
        dim: d, the token width.
        embedding_dim: width of tables whose features give none (default ``dim``).
        dense_tokens: ``None`` = one token per dense feature; k = all dense features into k tokens.
        domain_token: add a learned token for the sample's domain.
        sequence_merge, max_positions, time_buckets: see :class:`SequenceProcessor`.
        history_match: add :class:`~lattice.nn.match.HistoryMatch`: for every sequence feature sharing an
            embedding table with a sparse feature (``hist_items`` / ``item``), one token per such pair
            saying whether, how often and how recently the candidate occurs in the history, and a
            learned vector on the matching events.
        bias: bias of the dense per-feature map.
        standardize_dense: standardize dense values by their running training statistics first.
        collection_kwargs: passed to every :class:`EmbeddingBagCollection`.

    ``num_tokens`` is n, the number of non-sequence tokens (sparse, dense, domain, then history-match
    tokens; see ``token_slices``); ``has_sequence`` tells whether a sequence stream is produced.
    """

    def __init__(
        self,
        schema: Any,
        dim: int,
        embedding_dim: int | None = None,
        dense_tokens: int | None = None,
        domain_token: bool = True,
        sequence_merge: Literal["auto", "concat", "masknet"] = "auto",
        max_positions: int = 256,
        time_buckets: int = 32,
        history_match: bool = False,
        bias: bool = True,
        collection_kwargs: dict[str, Any] | None = None,
        standardize_dense: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        sparse, seq, dense = schema.sparse_features, schema.sequence_features, schema.dense_features
        self.tables = (
            EmbeddingTables([*sparse, *seq], embedding_dim or dim, collection_kwargs) if (sparse or seq) else None
        )
        self.sparse = SparseProcessor(sparse, self.tables, dim) if sparse else None
        self.dense = DenseProcessor(len(dense), dim, dense_tokens, bias, standardize_dense) if dense else None
        self.sequence = (
            SequenceProcessor(seq, self.tables, dim, sequence_merge, max_positions, time_buckets) if seq else None
        )
        self.sequence_max_lengths = [f.max_length or 50 for f in seq]
        self.match = (
            HistoryMatch(match_pairs(schema), [f.name for f in seq], [f.name for f in sparse], dim)
            if history_match else None
        )
        num_domains = max(1, len(schema.domains))
        self.domain = nn.Embedding(num_domains, dim) if domain_token else None
        if self.domain is not None:
            nn.init.normal_(self.domain.weight, std=0.02)
        self.num_tokens = (
            (len(sparse) if sparse else 0)
            + (self.dense.num_tokens if self.dense is not None else 0)
            + (1 if domain_token else 0)
            + (self.match.num_tokens if self.match is not None else 0)
        )
        if self.num_tokens == 0:
            raise ValueError("the schema has no dense or sparse feature and domain_token is off: no tokens")
        n_sparse = len(sparse) if sparse else 0
        n_dense = self.dense.num_tokens if self.dense is not None else 0
        n_domain = 1 if domain_token else 0
        #: where each kind of token sits in ``tokens``: ``{"sparse", "dense", "domain", "match"}`` -> slice
        self.token_slices = {
            "sparse": slice(0, n_sparse),
            "dense": slice(n_sparse, n_sparse + n_dense),
            "domain": slice(n_sparse + n_dense, n_sparse + n_dense + n_domain),
            "match": slice(n_sparse + n_dense + n_domain, self.num_tokens),
        }

    @property
    def has_sequence(self) -> bool:
        return self.sequence is not None

    def default_sequence_length(self) -> float:
        """Sequence tokens per sample at every sequence feature's ``max_length`` (50 where none is
        given): their sum when sequences are concatenated, their maximum when they are merged per event
        (MaskNet); 0 without sequences. The worst case that FLOP counts assume by default."""
        if not self.sequence_max_lengths:
            return 0.0
        merged = self.sequence is not None and self.sequence.merge == "masknet"
        lengths = self.sequence_max_lengths
        return float(max(lengths) if merged else sum(lengths))

    def forward(self, batch: Batch) -> ProcessedFeatures:
        parts = []
        pooled, events = {}, None
        if self.tables is not None:
            if self.sparse is not None and batch.sparse.keys() != self.sparse.names:
                raise ValueError(
                    f"batch.sparse keys {batch.sparse.keys()} differ from the schema's sparse features {self.sparse.names}"
                )
            pooled, events = self.tables(
                batch.sparse if self.sparse is not None else None,
                batch.sequences if self.sequence is not None else None,
            )
        if self.sparse is not None:
            parts.append(self.sparse(pooled, batch.sparse_mask))
        if self.dense is not None:
            parts.append(self.dense(batch.dense, batch.dense_mask))
        if self.domain is not None:
            parts.append(self.domain(batch.domain).unsqueeze(1))
        event_bias = None
        if self.match is not None:
            match_tokens, event_bias = self.match(batch.sparse, batch.sequences)
            parts.append(match_tokens.to(parts[0].dtype))
        tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        seq = None
        if self.sequence is not None:
            seq = self.sequence(batch.sequences, batch.sequence_timestamps, events, event_bias)
        return ProcessedFeatures(tokens, seq)

    def flops(self, events: float = 0.0) -> float:
        total = 0.0
        if self.sparse is not None:
            total += self.sparse.flops()
        if self.dense is not None:
            total += self.dense.flops()
        if self.sequence is not None:
            total += self.sequence.flops(events)
        if self.match is not None:
            total += self.match.flops()
        return total
