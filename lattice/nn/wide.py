"""The wide path of Wide & Deep (Cheng et al. 2016): a per-domain logistic regression over the same
features as the deep network, whose logits a :class:`~lattice.models.LatticeModel` adds to its heads'.

It carries the additive effects of single features (a dense value's slope, an id's bias) that a
normalized deep trunk learns slowly. Its own :class:`~lattice.nn.FeatureProcessor` (``dim``-wide
tables) feeds ``flatten(tokens) ‖ mean(sequence)`` straight into linear per-domain
:class:`~lattice.nn.MultiTaskHeads`: the weight of id ``i`` of feature ``f`` for a task is
``<h_{task,f}, e_f[i]>``. Every processor part is affine here (sequences merge by ``"concat"``, never
MaskNet), so the whole path is linear in the one-hot ids, the dense values, the presence bits and the
domain.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from lattice.batch import Batch
from lattice.nn.heads import HeadOutput, MultiTaskHeads
from lattice.nn.processors import FeatureProcessor
from lattice.nn.sequence import tokens_with_sequence_mean

__all__ = ["WidePath"]


class WidePath(nn.Module):
    """Per-domain multi-task logistic regression over a schema's features.

    Args:
        schema: the data schema (``sparse_features``, ``dense_features``, ``sequence_features``,
            ``domains``, ``tasks``).
        dim: width of its embedding tables and tokens (the per-task id weights are rank ``dim``).
        domain_groups: group id of every domain (default one group per domain): one head per group.
        embedding_kwargs: extra keyword arguments of every :class:`~lattice.nn.EmbeddingBagCollection`.
        history_match: candidate-in-history match tokens (:class:`~lattice.nn.match.HistoryMatch`).
        standardize_dense: standardize dense values by their running training statistics first.

    ``forward(batch) -> HeadOutput``: ``logits``/``train_logits [B, T]`` and every windowed task's
    ``window_logits [B, W]``, routed by ``batch.label_window`` like the deep heads.
    """

    def __init__(
        self,
        schema: Any,
        dim: int = 32,
        domain_groups: Sequence[int] | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        history_match: bool = False,
        standardize_dense: bool = False,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"WidePath dim must be >= 1, got {dim}")
        self.processor = FeatureProcessor(
            schema, dim, sequence_merge="concat", history_match=history_match,
            collection_kwargs=embedding_kwargs, standardize_dense=standardize_dense,
        )
        in_dim = (self.processor.num_tokens + (1 if self.processor.has_sequence else 0)) * dim
        self.heads = MultiTaskHeads(
            in_dim, schema.tasks, hidden_dims=(), activation="none", num_domains=max(1, len(schema.domains)),
            domain_groups=domain_groups,
        )

    def forward(self, batch: Batch) -> HeadOutput:
        x = tokens_with_sequence_mean(self.processor(batch)).flatten(1)
        return self.heads(x, batch.label_window, batch.domain)

    def flops(self, sequence_length: float | None = None) -> float:
        """Forward FLOPs per sample for ``sequence_length`` sequence events (default: its processor's
        :meth:`~lattice.nn.FeatureProcessor.default_sequence_length`)."""
        events = self.processor.default_sequence_length() if sequence_length is None else float(sequence_length)
        if not self.processor.has_sequence:
            events = 0.0
        return float(self.processor.flops(events) + self.heads.flops())
