"""The :class:`Batch` every lattice model consumes.

It sits beside :mod:`lattice.sparse` (and imports only torch and it) so that ``nn`` and ``models`` can
name its type. It is a pytree node with keyed flattening, so ``torch.export`` and ``torch.compile`` take a
Batch as an input directly: the fields that are ``None`` stay in the (static) tree spec and come back as
``None``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from lattice.sparse import KeyedJaggedTensor

__all__ = ["Batch"]


@dataclass
class Batch:
    """One batch of ``B`` impressions.

    Shapes (``Fd``/``Fs``/``Fq``: dense/sparse/sequence features of the schema, ``T``: tasks):

    - ``dense [B, Fd]`` float32, 0 where absent; ``dense_mask [B, Fd]`` bool, True = present.
    - ``sparse``: KeyedJaggedTensor, keys = ``schema.sparse_features`` names in order, stride ``B``,
      int64 ids; ``sparse_mask [B, Fs]`` bool, False = the feature is absent in this row's domain
      (its bag is then empty).
    - ``sequences``: KeyedJaggedTensor, keys = ``schema.sequence_features`` names, stride ``B``, oldest
      first; ``sequence_timestamps``: parallel int64 timestamps (same keys, same offsets) where every
      sequence feature has a timestamps column, else ``None``.
    - ``domain [B]`` int64 index into ``schema.domains``.
    - ``labels [B, T]`` float32, 0 where masked; ``label_mask [B, T]`` bool, True = label present.
    - ``label_window [B, T]`` int64: the Lattice Zipper window index whose label ``labels[:, t]`` is
      (-1 for tasks without windows).
    - ``example_id``, ``user_id``, ``item_id``: ``[B]`` int64.
    - ``true_probs [B, T]`` float32: the planted world's true label probabilities (``p_<task>``
      columns; never a feature), 0 where unknown; ``None`` for real data.
    - ``timestamp [B]`` int64: each impression's event time in seconds (the schema's
      ``timestamp_column``; never a feature: what recency-aware losses such as the student adapter's
      read); ``None`` when the schema has no timestamp column.
    - ``teacher_logits [B, T]`` float32 and ``teacher_mask [B]`` bool (rows the teacher scored),
      ``teacher_embedding [B, E]``: teacher outputs joined by ``example_id`` (distillation); else ``None``.
    """

    dense: Tensor
    dense_mask: Tensor
    sparse: KeyedJaggedTensor
    sparse_mask: Tensor
    sequences: KeyedJaggedTensor
    sequence_timestamps: Optional[KeyedJaggedTensor]
    domain: Tensor
    labels: Tensor
    label_mask: Tensor
    label_window: Tensor
    example_id: Tensor
    user_id: Tensor
    item_id: Tensor
    true_probs: Optional[Tensor] = None
    timestamp: Optional[Tensor] = None
    teacher_logits: Optional[Tensor] = None
    teacher_mask: Optional[Tensor] = None
    teacher_embedding: Optional[Tensor] = None

    @property
    def batch_size(self) -> int:
        return int(self.domain.shape[0])

    def __len__(self) -> int:
        return self.batch_size

    def _map(self, fn_tensor, fn_kjt) -> "Batch":
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                out[f.name] = None
            elif isinstance(value, KeyedJaggedTensor):
                out[f.name] = fn_kjt(value)
            else:
                out[f.name] = fn_tensor(value)
        return Batch(**out)

    def select_rows(self, indices: Tensor) -> "Batch":
        """The rows ``indices [B']`` (int, each in ``[0, B)``) of every field, in that order: e.g. one rank's
        share of a global batch, or a shuffled batch."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return self._map(lambda t: t.index_select(0, indices.to(t.device)), lambda k: k.select_samples(indices))

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """Every tensor moved to ``device`` (Lightning calls this to transfer a batch)."""
        return self._map(
            lambda t: t.to(device, non_blocking=non_blocking),
            lambda k: k.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> "Batch":
        """Every tensor in pinned memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory(), lambda k: k.pin_memory())

    @property
    def device(self) -> torch.device:
        return self.domain.device


# --------------------------------------------------------------------------------------------------
# pytree registration (torch.export / torch.compile / FSDP input casting)
# --------------------------------------------------------------------------------------------------
# Descending name order, so that no field comes before one whose name it prefixes (``dense`` before
# ``dense_mask``): torch.export writes its input guards by replacing each input's key path as plain text,
# in flatten order, and ``batch.dense`` would otherwise also rewrite ``batch.dense_mask``.
_FIELDS = tuple(sorted((f.name for f in dataclasses.fields(Batch)), reverse=True))


def _flatten(batch: Batch) -> Tuple[List[Any], Tuple[str, ...]]:
    """Children: the fields that are not ``None``, in ``_FIELDS`` order; context: their names."""
    present = tuple(name for name in _FIELDS if getattr(batch, name) is not None)
    return [getattr(batch, name) for name in present], present


def _flatten_with_keys(batch: Batch) -> Tuple[List[Tuple[Any, Any]], Tuple[str, ...]]:
    children, present = _flatten(batch)
    return [(pytree.GetAttrKey(name), child) for name, child in zip(present, children)], present


def _unflatten(children, present: Tuple[str, ...]) -> Batch:
    fields = dict.fromkeys(_FIELDS)
    fields.update(zip(present, children))
    return Batch(**fields)


pytree.register_pytree_node(
    Batch, _flatten, _unflatten,
    serialized_type_name="lattice.batch.Batch",
    flatten_with_keys_fn=_flatten_with_keys,
)
