"""Distillation (ExFM, Lattice KTAP): a big teacher's outputs help small students.

* Teacher outputs as data: ``lattice predict`` with :class:`lattice.train.writer.ParquetPredictionWriter`
  logs logits (and a representation) per ``example_id``; the data module joins them onto training rows.
* Online teacher: :class:`DistillationCallback` runs a frozen teacher checkpoint on every batch.
* Student side: :class:`DistillationModule` — soft-label distillation, the ExFM auxiliary head
  (:class:`DistillationHead`, :func:`grad_scale`), the student adapter (:class:`StudentAdapter`) and the
  KTAP teacher token (:class:`TeacherEmbeddingCache`, :class:`TeacherTokenProjection`,
  :class:`TeacherTokenNetwork`).
"""
from lattice.distill.cache import (
    DictEmbeddingStore,
    EmbeddingStore,
    InProcessEmbeddingStore,
    TeacherEmbeddingCache,
    TeacherTokenProjection,
)
from lattice.distill.callback import DistillationCallback, load_teacher_network
from lattice.distill.heads import DistillationHead, GradScale, grad_scale
from lattice.distill.losses import distillation_loss, distillation_mask, teacher_targets
from lattice.distill.module import DistillationModule, DistillationOutput
from lattice.distill.student import StudentAdapter, TeacherTokenNetwork

__all__ = [
    "teacher_targets",
    "distillation_mask",
    "distillation_loss",
    "GradScale",
    "grad_scale",
    "DistillationHead",
    "StudentAdapter",
    "TeacherTokenNetwork",
    "EmbeddingStore",
    "InProcessEmbeddingStore",
    "DictEmbeddingStore",
    "TeacherEmbeddingCache",
    "TeacherTokenProjection",
    "DistillationModule",
    "DistillationOutput",
    "DistillationCallback",
    "load_teacher_network",
]
