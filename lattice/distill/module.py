"""DistillationModule: a LatticeModule whose student also learns from a teacher (ExFM, Lattice KTAP)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lattice.batch import Batch
from lattice.distill.cache import TeacherEmbeddingCache, TeacherTokenProjection
from lattice.distill.heads import DistillationHead, grad_scale
from lattice.distill.losses import distillation_loss, distillation_mask, teacher_targets
from lattice.distill.student import StudentAdapter
from lattice.metrics import masked_multitask_loss
from lattice.train.compile import CompileOption
from lattice.train.module import LatticeModule, NonFiniteLossError, SparseOptimizer

__all__ = ["DistillationModule", "DistillationOutput", "ServingStudent"]

DistillationMode = Literal["none", "soft_label", "aux_head"]
AuxInput = Literal["backbone", "head_hidden"]


@dataclass
class DistillationOutput:
    """The student's forward output.

    Attributes:
        logits, train_logits, representation, window_logits: the network's own output (the serving
            heads; predict/export use ``logits`` only).
        distill_logits: ``[B, T]`` the auxiliary distillation head (``aux_head`` mode, training only).
        teacher_hit: ``[B]`` bool, rows whose KTAP teacher token carried an embedding (``None`` without
            a teacher token).
    """

    logits: Tensor
    train_logits: Tensor
    representation: Tensor | None = None
    window_logits: dict[str, Tensor] = field(default_factory=dict)
    distill_logits: Tensor | None = None
    teacher_hit: Tensor | None = None


class ServingStudent(nn.Module):
    """What :meth:`DistillationModule.serving_model` returns: the network (+ the teacher-token
    projection, with KTAP), sharing the training module's parameters."""

    def __init__(self, network: nn.Module, teacher_token: TeacherTokenProjection | None = None) -> None:
        super().__init__()
        self.network = network
        self.teacher_token = teacher_token

    def forward(self, batch: Batch) -> Tensor:
        if self.teacher_token is None:
            return self.network(batch).logits
        emb, hit = batch_teacher_embedding(batch, self.teacher_token.embedding_dim)
        return self.network(batch, extra_tokens=self.teacher_token(emb, hit)).logits


def batch_teacher_embedding(batch: Any, dim: int) -> tuple[Tensor, Tensor]:
    """``(embedding [B, E], hit [B] bool)`` straight from the batch: ``teacher_embedding`` where
    ``teacher_mask`` (default: every row) says the teacher scored the row and the values are finite;
    zeros and ``hit = False`` everywhere when the batch carries no embedding."""
    B = batch.batch_size
    device = batch.domain.device
    emb = getattr(batch, "teacher_embedding", None)
    if emb is None:
        return torch.zeros(B, dim, device=device), torch.zeros(B, dtype=torch.bool, device=device)
    if emb.shape != (B, dim):
        raise ValueError(f"batch.teacher_embedding must be [B={B}, E={dim}], got {tuple(emb.shape)}")
    mask = getattr(batch, "teacher_mask", None)
    hit = torch.ones(B, dtype=torch.bool, device=device) if mask is None else mask.to(torch.bool)
    return emb, hit & torch.isfinite(emb).all(1)


def _head_in_dim(network: nn.Module) -> int:
    heads = getattr(network, "heads", None)
    for attr in ("in_dim", "input_dim"):
        if heads is not None and isinstance(getattr(heads, attr, None), int):
            return getattr(heads, attr)
    raise ValueError(
        f"cannot tell the width of {type(network).__name__}'s backbone output (its `heads.in_dim`); "
        "give aux_in_dim"
    )


def _head_hidden_dim(network: nn.Module) -> int:
    hidden = getattr(getattr(network, "heads", None), "hidden_dims", None)
    if not hidden:
        raise ValueError(
            f"aux_input='head_hidden' shares the serving heads' hidden layers, but {type(network).__name__}'s "
            f"heads have none (hidden_dims={hidden!r}); give the network head hidden dims or use aux_input='backbone'"
        )
    return int(hidden[-1])


def _token_dim(network: nn.Module) -> int:
    for owner in (network, getattr(network, "processor", None)):
        if owner is not None and isinstance(getattr(owner, "dim", None), int):
            return owner.dim
    raise ValueError(f"cannot tell {type(network).__name__}'s token width (`dim`) for the teacher token")


class DistillationModule(LatticeModule):
    """A student that learns the true labels and, on the side, a teacher's outputs.

    The teacher's outputs arrive in the batch: ``teacher_logits [B, T]``, ``teacher_mask [B]`` and
    optionally ``teacher_embedding [B, E]`` — joined from logged teacher predictions by the data module
    (``lattice predict`` with the Parquet writer), or written by :class:`DistillationCallback` running a
    frozen teacher online. A row without teacher outputs contributes no distillation loss.

    Losses (``distillation``):

    * ``"none"``: labels only (the baseline).
    * ``"soft_label"``: plain distillation — the serving head learns the labels and the teacher's soft
      labels (``grad_scale`` scales the distillation gradient into the serving head and backbone).
    * ``"aux_head"`` (ExFM): the serving head learns the labels only; a separate
      :class:`~lattice.distill.DistillationHead` on the same backbone output (the serving heads' input)
      learns the teacher. ``grad_scale`` scales the distillation gradient where it enters the backbone
      (0: backbone untouched; the serving head never receives any).

    With ``adapter=True`` a :class:`~lattice.distill.StudentAdapter` maps the teacher's logits to corrected
    ones, trained on the true labels (``adapter_weight``), and its detached output replaces the teacher
    logits as the distillation target (ExFM's fix for a stale teacher).

    With ``teacher_embedding_dim`` set, the teacher embedding enters the student as one extra input token
    (KTAP) through a :class:`~lattice.distill.TeacherTokenProjection`, read from ``cache`` (a
    :class:`~lattice.distill.TeacherEmbeddingCache` with a TTL) when one is given, else straight from the
    batch. The network must be built with room for the token (:class:`~lattice.distill.TeacherTokenNetwork`).

    Args (besides :class:`~lattice.train.LatticeModule`'s):
        distillation: ``"none"``, ``"soft_label"`` or ``"aux_head"``.
        distill_weight: weight of the distillation loss.
        distill_task_weights: per-task weights of the distillation loss (default: the label task weights).
        grad_scale: gradient scale on the distillation path (see above), >= 0.
        temperature: softens the teacher (and the distilled logits): see :func:`~lattice.distill.distillation_loss`.
        label_scale: scales the teacher's probabilities (:func:`~lattice.distill.teacher_targets`).
        distill_labeled_only: distill only where the true label is present (default: wherever the teacher
            scored the row and the row's domain has the task — unlabeled rows are where a teacher helps most).
        aux_hidden_dims: hidden sizes of the auxiliary head's per-task MLPs.
        aux_in_dim: width of the backbone output (default: the network's ``heads.in_dim``).
        aux_input: where the auxiliary head branches off. ``"backbone"`` (default): the serving heads'
            input, so the serving heads learn from the labels alone. ``"head_hidden"``: each task's serving
            head's last hidden activation — the auxiliary head shares the serving heads' hidden layers
            and only their output layers learn from the labels alone (ExFM's auxiliary head on a shared
            task arch). The teacher then shapes more of the serving path, which pays off where labels
            are few (a small domain, a rare task, a Zipper window's share of the rows); ``grad_scale``
            still scales the distillation gradient at the branch. Needs heads with a hidden layer.
        adapter, adapter_hidden_dims, adapter_weight: the student adapter.
        adapter_lr: the adapter's own learning rate (``None``: the optimizer's); it starts as the identity
            and must track a drifting teacher, so it may warrant a faster rate than the student.
        adapter_half_life: seconds of event time (``None``: every row alike). ExFM trains the adapter on
            the freshest labels, so that it corrects the teacher towards today's traffic rather than the
            average of the student's window: each row's adapter loss is weighted by
            ``2 ** (-age / adapter_half_life)``, ``age`` counted back from the newest event time seen in
            training (the ``adapter_clock`` buffer, in the state dict, so a resumed run keeps it; under data
            parallelism the newest over all ranks). Needs ``batch.timestamp`` (a schema timestamp column).
        teacher_embedding_dim: E; enables the KTAP teacher token.
        normalize_teacher_embedding: layer-normalize the teacher embedding before projecting it.
        cache: the teacher-embedding cache (``None``: embeddings come straight from the batch).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        sparse_optimizer: SparseOptimizer = "rowwise_adagrad",
        sparse_lr: float = 0.05,
        sparse_eps: float = 1e-8,
        sparse_weight_decay: float = 0.0,
        task_weights: dict[str, float] | None = None,
        autocast_bf16: bool = False,
        group_auc: bool = True,
        compile: CompileOption = False,
        sharding: dict[str, Any] | None = None,
        finite_check_every_n_steps: int | None = None,
        distillation: DistillationMode = "aux_head",
        distill_weight: float = 1.0,
        distill_task_weights: dict[str, float] | None = None,
        grad_scale: float = 1.0,
        temperature: float = 1.0,
        label_scale: float = 1.0,
        distill_labeled_only: bool = False,
        aux_hidden_dims: Sequence[int] = (64,),
        aux_in_dim: int | None = None,
        aux_input: AuxInput = "backbone",
        adapter: bool = False,
        adapter_hidden_dims: Sequence[int] = (16,),
        adapter_weight: float = 1.0,
        adapter_lr: float | None = None,
        adapter_half_life: float | None = None,
        teacher_embedding_dim: int | None = None,
        normalize_teacher_embedding: bool = True,
        cache: TeacherEmbeddingCache | None = None,
    ) -> None:
        super().__init__(
            network,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            sparse_optimizer=sparse_optimizer,
            sparse_lr=sparse_lr,
            sparse_eps=sparse_eps,
            sparse_weight_decay=sparse_weight_decay,
            task_weights=task_weights,
            autocast_bf16=autocast_bf16,
            group_auc=group_auc,
            compile=compile,
            sharding=sharding,
            finite_check_every_n_steps=finite_check_every_n_steps,
        )
        # The cache is runtime state (like a serving-side store), not a hyper-parameter.
        self.save_hyperparameters(ignore=["network", "cache", "optimizer", "lr_scheduler"])
        if distillation not in ("none", "soft_label", "aux_head"):
            raise ValueError(f"distillation must be 'none', 'soft_label' or 'aux_head', got {distillation!r}")
        for name, value, low in (("distill_weight", distill_weight, 0.0), ("adapter_weight", adapter_weight, 0.0),
                                 ("grad_scale", grad_scale, 0.0)):
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"{name} must be finite and >= {low}, got {value}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not label_scale >= 0:
            raise ValueError(f"label_scale must be >= 0, got {label_scale}")
        self.distillation = distillation
        self.distill_weight = float(distill_weight)
        self.grad_scale = float(grad_scale)
        self.temperature = float(temperature)
        self.label_scale = float(label_scale)
        self.distill_labeled_only = distill_labeled_only
        self.adapter_weight = float(adapter_weight)
        if adapter_lr is not None and not (math.isfinite(adapter_lr) and adapter_lr > 0):
            raise ValueError(f"adapter_lr must be > 0, got {adapter_lr}")
        self.adapter_lr = adapter_lr
        if adapter_half_life is not None:
            if not adapter:
                raise ValueError("adapter_half_life weights the student adapter's loss: it needs adapter=True")
            if not (math.isfinite(adapter_half_life) and adapter_half_life > 0):
                raise ValueError(f"adapter_half_life must be a finite number of seconds > 0, got {adapter_half_life}")
            # the newest event time seen in training; recency is counted back from it
            self.register_buffer("adapter_clock", torch.tensor(torch.iinfo(torch.int64).min, dtype=torch.int64))
        self.adapter_half_life = None if adapter_half_life is None else float(adapter_half_life)

        schema = network.schema
        weights = dict(zip(self.task_names, self.task_weights.tolist()))
        for name, w in (distill_task_weights or {}).items():
            if name not in weights:
                raise ValueError(f"distill_task_weights names task {name!r}, which is not in the schema {self.task_names}")
            weights[name] = float(w)
        self.register_buffer("distill_task_weights", torch.tensor([weights[n] for n in self.task_names]), persistent=False)
        # task_present[d, t]: domain d has task t (a domain listing no tasks has them all).
        present = torch.ones(max(1, len(schema.domains)), len(self.task_names), dtype=torch.bool)
        for d, spec in enumerate(schema.domains):
            tasks = getattr(spec, "tasks", None)
            if tasks is not None:
                present[d] = torch.tensor([n in tasks for n in self.task_names], dtype=torch.bool)
        self.register_buffer("task_present", present, persistent=False)

        T = len(self.task_names)
        if aux_input not in ("backbone", "head_hidden"):
            raise ValueError(f"aux_input must be 'backbone' or 'head_hidden', got {aux_input!r}")
        self.aux_input = aux_input
        if aux_input == "head_hidden" and distillation == "aux_head" and aux_in_dim is None:
            aux_in_dim = _head_hidden_dim(network)
        self.aux_head = (
            DistillationHead(aux_in_dim or _head_in_dim(network), T, aux_hidden_dims) if distillation == "aux_head" else None
        )
        self.adapter = StudentAdapter(T, adapter_hidden_dims) if adapter else None
        self.teacher_token = (
            TeacherTokenProjection(teacher_embedding_dim, _token_dim(network), normalize_teacher_embedding)
            if teacher_embedding_dim
            else None
        )
        if cache is not None and teacher_embedding_dim is None:
            raise ValueError("a teacher-embedding cache needs teacher_embedding_dim (the KTAP teacher token)")
        if cache is not None and cache.dim != teacher_embedding_dim:
            raise ValueError(f"cache dim {cache.dim} differs from teacher_embedding_dim {teacher_embedding_dim}")
        self.cache = cache

    # ---- forward ---------------------------------------------------------------------------------
    def _now(self) -> float:
        if self.cache is not None and self.cache.clock == "wall":
            return time.time()
        return float(self.global_step)  # 0 when not attached to a trainer

    def _teacher_embedding(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(embedding [B, E], hit [B])`` for the teacher token: read from the cache (then the batch's
        own teacher embeddings written to it), or straight from the batch without a cache."""
        emb, fresh = batch_teacher_embedding(batch, self.teacher_token.embedding_dim)
        if self.cache is None:
            return emb, fresh
        keys = self.cache.keys_of(batch)
        now = self._now()
        cached, hit = self.cache.lookup(keys, now)
        if getattr(batch, "teacher_embedding", None) is not None:
            self.cache.update(keys, emb, now, fresh)
        return cached, hit

    def forward(self, batch: Batch) -> DistillationOutput:
        with self._autocast():
            tokens = hit = None
            if self.teacher_token is not None:
                emb, hit = self._teacher_embedding(batch)
                tokens = self.teacher_token(emb, hit)
            output = self.network(batch, extra_tokens=tokens)
            distill_logits = None
            if self.aux_head is not None and self.training:
                head_input = output.head_input
                if self.aux_input == "head_hidden":
                    head_input = output.head_hidden
                    if head_input is None:
                        raise ValueError(f"{type(self.network).__name__}'s heads report no serving_hidden for "
                                         "aux_input='head_hidden'")
                if head_input is None:
                    raise ValueError(f"{type(self.network).__name__} exposes no backbone output for the auxiliary head")
                distill_logits = self.aux_head(grad_scale(head_input, self.grad_scale))
        return DistillationOutput(
            logits=output.logits,
            train_logits=output.train_logits,
            representation=getattr(output, "representation", None),
            window_logits=getattr(output, "window_logits", {}) or {},
            distill_logits=distill_logits,
            teacher_hit=hit,
        )

    def serving_model(self) -> nn.Module:
        """The student as served: the network's serving heads only — no auxiliary head, no adapter, no
        cache. ``serving_model()(batch) -> logits [B, T]``; with the KTAP teacher token, the request
        brings the teacher embedding (``batch.teacher_embedding``, ``batch.teacher_mask`` = found in the
        store; ``None`` = missing everywhere)."""
        return ServingStudent(self.network, self.teacher_token)

    def configure_optimizers(self):
        if self.adapter is None or self.adapter_lr is None:
            return super().configure_optimizers()
        adapter = {id(p) for p in self.adapter.parameters()}
        params = self._dense_parameters()
        groups = [
            {"params": [p for p in params if id(p) not in adapter]},
            {"params": [p for p in params if id(p) in adapter], "lr": self.adapter_lr},
        ]
        optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- losses ----------------------------------------------------------------------------------
    def distillation_losses(self, output: DistillationOutput, batch: Any) -> dict[str, Tensor]:
        """The student-side losses of one batch: ``distill`` (weighted sum over tasks, unweighted by
        ``distill_weight``), ``distill_per_task [T]``, ``adapter`` (when on) and ``coverage`` (the share
        of rows with a teacher output). Always connected to every distillation parameter (a zero where
        the batch has no teacher), so DDP sees every parameter used."""
        B, T = output.logits.shape
        teacher = getattr(batch, "teacher_logits", None)
        teacher_mask = getattr(batch, "teacher_mask", None)
        device = output.logits.device
        if teacher is None:
            teacher = torch.zeros(B, T, device=device)
            teacher_mask = torch.zeros(B, dtype=torch.bool, device=device)
        elif teacher.shape != (B, T):
            raise ValueError(f"batch.teacher_logits must be [B, T]=[{B}, {T}], got {tuple(teacher.shape)}")
        teacher = teacher.float()
        present = self.task_present[batch.domain]
        if self.distill_labeled_only:
            present = present & batch.label_mask
        mask = distillation_mask(teacher, teacher_mask, present)
        losses: dict[str, Tensor] = {}
        targets = None
        if self.adapter is not None:
            adapted = self.adapter(teacher)
            adapter_loss, _ = masked_multitask_loss(
                adapted, batch.labels, batch.label_mask & mask, self.task_kinds, self.task_weights,
                row_weights=self.adapter_row_weights(batch) if self.adapter_half_life is not None else None,
            )
            losses["adapter"] = adapter_loss
            targets = teacher_targets(adapted.detach(), self.task_kinds, self.temperature, self.label_scale)
        if self.aux_head is not None:
            student = output.distill_logits
            if student is None:
                raise RuntimeError("the auxiliary head did not run (distillation losses need a training-mode forward)")
        else:
            student = grad_scale(output.logits, self.grad_scale)
        total, per_task = distillation_loss(
            student,
            teacher,
            self.task_kinds,
            teacher_mask=mask,
            task_weights=self.distill_task_weights,
            temperature=self.temperature,
            label_scale=self.label_scale,
            targets=targets,
        )
        losses["distill"] = total
        losses["distill_per_task"] = per_task
        row_covered = mask.any(dim=1) if T else torch.zeros(B, dtype=torch.bool, device=device)
        losses["coverage"] = row_covered.float().mean() if B else torch.zeros((), device=device)
        return losses

    def adapter_row_weights(self, batch: Any) -> Tensor:
        """``[B]`` recency weights of the adapter's rows, ``2 ** (-age / adapter_half_life)``; advances
        ``adapter_clock`` to the newest event time of this batch (over all ranks) first."""
        ts = getattr(batch, "timestamp", None)
        if ts is None:
            raise ValueError(
                "adapter_half_life weights the adapter's rows by recency and needs each row's event time "
                "(batch.timestamp): give the data's schema a timestamp_column"
            )
        ts = ts.to(self.adapter_clock.device, torch.int64)
        newest = ts.max() if ts.numel() else torch.tensor(torch.iinfo(torch.int64).min, device=ts.device)
        newest = self.data_parallel.all_reduce_max(newest.reshape(1)).reshape(())
        self.adapter_clock.copy_(torch.maximum(self.adapter_clock, newest))
        age = (self.adapter_clock - ts).clamp_min(0).double()
        return torch.exp2(-age / self.adapter_half_life).float()

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        output = self(batch)
        label_loss, per_task = self._loss(output, batch, global_batch=True)
        loss = label_loss
        extra: dict[str, Tensor] = {}
        if self.distillation != "none":
            extra = self.distillation_losses(output, batch)
            loss = loss + self.distill_weight * extra["distill"]
            if "adapter" in extra:
                loss = loss + self.adapter_weight * extra["adapter"]
        parts = {"label": label_loss, **dict(zip(self.task_names, per_task)),
                 **{k: v for k, v in extra.items() if v.dim() == 0}}
        self._watch_finite(loss, parts, batch_idx)
        size = batch.batch_size
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/label_loss", label_loss, batch_size=size)
        for name, value in zip(self.task_names, per_task):
            self.log(f"train/{name}/loss", value, batch_size=size)
        if extra:
            self.log("train/distill/loss", extra["distill"], prog_bar=True, batch_size=size)
            self.log("train/distill/coverage", extra["coverage"], batch_size=size)
            for name, value in zip(self.task_names, extra["distill_per_task"]):
                self.log(f"train/distill/{name}/loss", value, batch_size=size)
            if "adapter" in extra:
                self.log("train/adapter/loss", extra["adapter"], batch_size=size)
        self._log_teacher_token(output, "train", size)
        return loss

    def _log_teacher_token(self, output: DistillationOutput, stage: str, size: int) -> None:
        if output.teacher_hit is None:
            return
        self.log(f"{stage}/ktap/hit_rate", output.teacher_hit.float().mean(), batch_size=size, sync_dist=stage != "train")
        if self.cache is not None and self.cache.lookups:
            self.log(f"{stage}/ktap/cache_hit_rate", float(self.cache.hit_rate), batch_size=size)
            self.log(f"{stage}/ktap/cache_expired", float(self.cache.expired), batch_size=size, reduce_fx="max")

    def _eval_step(self, batch, metrics, stage: str):
        output = self(batch)
        loss, _ = self._loss(output, batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        metrics.update(output.logits, batch.labels, batch.label_mask, batch.domain, batch.user_id, batch.true_probs)
        self._count_sharded_step(batch)
        self._log_teacher_token(output, stage, batch.batch_size)

    def on_train_epoch_start(self) -> None:
        if self.cache is not None:
            self.cache.reset_counters()
