"""The flat inference interface: any trained lattice network as a module of plain tensors.

:class:`InferenceModule` takes the tensors a serving request carries (no :class:`~lattice.batch.Batch`, no
:class:`~lattice.sparse.KeyedJaggedTensor`), rebuilds the batch view the network reads, and returns per-task
probabilities from the serving heads. It is what :mod:`lattice.serve.export` hands to ``torch.export``.

Inputs, in :data:`INPUT_NAMES` order (``B`` rows; ``Fd``/``Fs``/``Fq`` the schema's dense/sparse/sequence
features; every integer tensor int64):

- ``dense [B, Fd]`` float32 (0 where absent) and ``dense_mask [B, Fd]`` bool (True = present);
- ``sparse_values [Ns]`` ids and ``sparse_offsets [Fs * B + 1]``, key-major (feature ``i``, row ``b`` is
  ``sparse_values[sparse_offsets[i*B + b] : sparse_offsets[i*B + b + 1]]``), ``sparse_mask [B, Fs]`` bool;
- ``sequence_values [Nq]`` event ids (oldest first), ``sequence_offsets [Fq * B + 1]`` key-major,
  ``sequence_timestamps [Nq]`` (parallel to the values; ignored when the schema has no timestamps). When the
  sequence features are parallel attributes of the same events (they share one timestamps column, see
  :func:`~lattice.nn.processors.parallel_sequences`): ``sequence_values [Fq, N]`` (row ``f`` is feature
  ``f``'s values of the same ``N`` events) and ``sequence_timestamps [N]``;
- ``domain [B]`` index into the schema's domains;
- a KTAP student (a teacher-token network) also takes ``teacher_embedding [B, E]`` float32 and
  ``teacher_mask [B]`` bool (the teacher store had the row).

Output: ``[B, T]`` float32 in the schema's task order: ``sigmoid`` of the serving logit for a binary task
(a windowed task's longest window; an ESMM child already composed with its parent), the raw prediction
for a regression task. The module is built in eval mode with frozen tables (:mod:`lattice.serve.tables`):
no dropout, no fused optimizer, no auxiliary head, no adapter, no teacher cache. With ``quantization="int8"``
its tables are int8 row-wise (:func:`~lattice.serve.tables.quantize_tables`): the module ``lattice export
--quantize int8`` exports, runnable eagerly for debugging.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lattice.data.schema import Schema
from lattice.distill.module import DistillationModule, ServingStudent
from lattice.nn.processors import parallel_sequences
from lattice.serve.tables import freeze_tables, quantize_tables
from lattice.sparse import KeyedJaggedTensor

__all__ = ["INPUT_NAMES", "TEACHER_INPUT_NAMES", "ServingBatch", "InferenceModule", "serving_network"]

INPUT_NAMES = (
    "dense", "dense_mask", "sparse_values", "sparse_offsets", "sparse_mask",
    "sequence_values", "sequence_offsets", "sequence_timestamps", "domain",
)
TEACHER_INPUT_NAMES = ("teacher_embedding", "teacher_mask")


@dataclass
class ServingBatch:
    """The fields of a :class:`~lattice.batch.Batch` a network reads at inference (no labels)."""

    dense: Tensor
    dense_mask: Tensor
    sparse: KeyedJaggedTensor
    sparse_mask: Tensor
    sequences: KeyedJaggedTensor
    sequence_timestamps: Optional[KeyedJaggedTensor]
    domain: Tensor
    teacher_embedding: Optional[Tensor] = None
    teacher_mask: Optional[Tensor] = None
    label_window: Optional[Tensor] = None  # always None: the serving heads use the longest window

    @property
    def batch_size(self):
        return self.domain.shape[0]


def serving_network(model: nn.Module) -> tuple[nn.Module, Schema, bool]:
    """``(net, schema, has_teacher_token)``: the part of ``model`` that serves, as ``net(batch) -> logits [B, T]``.

    ``model`` is a lattice network (``network(batch).logits``), a :class:`~lattice.train.LatticeModule` (its
    network) or a :class:`DistillationModule` (its student's serving heads, :meth:`~DistillationModule.serving_model`).
    """
    if isinstance(model, DistillationModule):
        student = model.serving_model()
        return student, model.network.schema, student.teacher_token is not None
    inner = getattr(model, "network", None)
    if not isinstance(getattr(model, "schema", None), Schema) and isinstance(inner, nn.Module):
        model = inner  # a LatticeModule
    schema = getattr(model, "schema", None)
    if not isinstance(schema, Schema):
        raise TypeError(f"cannot serve a {type(model).__name__}: expected a lattice network (with a .schema), a "
                        "LatticeModule or a DistillationModule")
    return _Logits(model), schema, False


class _Logits(nn.Module):
    """``network(batch).logits``."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, batch: Any) -> Tensor:
        return self.network(batch).logits


class InferenceModule(nn.Module):
    """A trained model as ``forward(*inputs) -> probabilities [B, T]`` over plain tensors (module docstring).

    Args:
        model: a lattice network, a :class:`LatticeModule` or a :class:`DistillationModule` (copied: the
            original is left as it was).
        quantization: the tables' format, ``"none"`` (as trained) or ``"int8"`` (row-wise int8, fp32
            accumulation; see :data:`~lattice.serve.tables.QUANTIZATIONS`).
    """

    def __init__(self, model: nn.Module, quantization: str = "none") -> None:
        super().__init__()
        model = copy.deepcopy(model)
        net, schema, teacher = serving_network(model)
        self.net = quantize_tables(freeze_tables(net), quantization).eval()
        self.quantization = quantization
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.schema = schema
        self.has_teacher_token = teacher
        self.teacher_embedding_dim = int(net.teacher_token.embedding_dim) if teacher else None
        self.input_names = INPUT_NAMES + (TEACHER_INPUT_NAMES if teacher else ())
        self.sparse_keys = [f.name for f in schema.sparse_features]
        self.sequence_keys = [f.name for f in schema.sequence_features]
        self.sequence_has_timestamps = any(f.timestamps_column for f in schema.sequence_features)
        self.parallel_sequences = parallel_sequences(schema.sequence_features)
        self.task_names = [t.name for t in schema.tasks]
        self.register_buffer("binary", torch.tensor([t.kind == "binary" for t in schema.tasks]), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> "InferenceModule":
        """Always eval: a served model has no training mode."""
        return super().train(False)

    def batch(self, dense: Tensor, dense_mask: Tensor, sparse_values: Tensor, sparse_offsets: Tensor,
              sparse_mask: Tensor, sequence_values: Tensor, sequence_offsets: Tensor, sequence_timestamps: Tensor,
              domain: Tensor, teacher_embedding: Optional[Tensor] = None,
              teacher_mask: Optional[Tensor] = None) -> ServingBatch:
        """The :class:`ServingBatch` the network reads, from the flat inputs (views, no copies)."""
        B = domain.shape[0]
        if self.parallel_sequences:  # [Fq, N] -> key-major [Fq * N]; the timestamps repeat per feature
            sequence_values = sequence_values.reshape(-1)
            sequence_timestamps = sequence_timestamps.repeat(len(self.sequence_keys))
        sparse = KeyedJaggedTensor(self.sparse_keys, sparse_values, offsets=sparse_offsets, stride=B, validate=False)
        sequences = KeyedJaggedTensor(self.sequence_keys, sequence_values, offsets=sequence_offsets, stride=B,
                                      validate=False)
        timestamps = None
        if self.sequence_has_timestamps:
            timestamps = KeyedJaggedTensor(self.sequence_keys, sequence_timestamps, offsets=sequence_offsets,
                                           stride=B, validate=False)
        return ServingBatch(dense, dense_mask, sparse, sparse_mask, sequences, timestamps, domain,
                            teacher_embedding, teacher_mask)

    def forward(self, dense: Tensor, dense_mask: Tensor, sparse_values: Tensor, sparse_offsets: Tensor,
                sparse_mask: Tensor, sequence_values: Tensor, sequence_offsets: Tensor, sequence_timestamps: Tensor,
                domain: Tensor, teacher_embedding: Optional[Tensor] = None,
                teacher_mask: Optional[Tensor] = None) -> Tensor:
        batch = self.batch(dense, dense_mask, sparse_values, sparse_offsets, sparse_mask, sequence_values,
                           sequence_offsets, sequence_timestamps, domain, teacher_embedding, teacher_mask)
        logits = self.net(batch).float()
        return torch.where(self.binary, torch.sigmoid(logits), logits)
