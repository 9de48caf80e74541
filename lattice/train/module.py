"""LatticeModule: the LightningModule that trains any lattice network on multi-domain, multi-task data."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lattice.train.losses import masked_multitask_loss
from lattice.train.metrics import MultiTaskMetrics

SparseOptimizer = Literal["rowwise_adagrad", "sgd", "none"]


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss becomes NaN or infinite; names the step and the tasks."""


def _fused_embedding_modules(network: nn.Module) -> list[nn.Module]:
    """Sub-modules whose embedding weights are updated by a fused in-backward optimizer."""
    return [m for m in network.modules() if hasattr(m, "set_fused_optimizer")]


class LatticeModule(pl.LightningModule):
    """Wraps a lattice network (``network(batch) -> output`` with ``.logits`` and ``.train_logits`` [B, T]).

    Args:
        network: the model (LatticeNetwork, InterFormer, a baseline...), built with the data's schema.
        optimizer: the dense optimizer, applied to every parameter except fused-optimizer embeddings.
        lr_scheduler: optional LR scheduler over the dense optimizer (stepped every optimizer step).
        sparse_optimizer: the optimizer fused into the embedding backward (``"rowwise_adagrad"``,
            ``"sgd"``), or ``"none"`` for plain autograd sparse gradients handled by ``optimizer``
            (which must then accept sparse gradients, e.g. ``torch.optim.Adagrad``/``SparseAdam``).
        sparse_lr, sparse_eps, sparse_weight_decay: the fused optimizer's hyper-parameters.
        task_weights: loss weight per task name (default: each task's ``TaskSpec.weight``).
        autocast_bf16: run forward passes under bf16 autocast (CPU or GPU).
        group_auc: also compute group AUC by user in evaluation.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["network"])
        self.network = network
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.autocast_bf16 = autocast_bf16
        schema = network.schema
        self.task_names = [t.name for t in schema.tasks]
        self.task_kinds = [t.kind for t in schema.tasks]
        self.domain_names = [d.name for d in schema.domains]
        weights = {t.name: float(getattr(t, "weight", 1.0)) for t in schema.tasks}
        for name, w in (task_weights or {}).items():
            if name not in weights:
                raise ValueError(f"task_weights names task {name!r}, which is not in the schema {self.task_names}")
            weights[name] = float(w)
        self.register_buffer("task_weights", torch.tensor([weights[n] for n in self.task_names]), persistent=False)
        self.fused_modules = _fused_embedding_modules(network)
        for module in self.fused_modules:
            module.set_fused_optimizer(
                None if sparse_optimizer == "none" else sparse_optimizer,
                lr=sparse_lr,
                eps=sparse_eps,
                weight_decay=sparse_weight_decay,
            )
        self.sparse_optimizer = sparse_optimizer
        self.val_metrics = MultiTaskMetrics(self.task_names, self.domain_names, self.task_kinds, group_auc=group_auc)
        self.test_metrics = MultiTaskMetrics(self.task_names, self.domain_names, self.task_kinds, group_auc=group_auc)
        self.eval_results: dict[str, dict[str, float]] = {}

    # ---- forward ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def forward(self, batch: Any):
        with self._autocast():
            return self.network(batch)

    def _loss(self, output, batch) -> tuple[Tensor, Tensor]:
        return masked_multitask_loss(output.train_logits, batch.labels, batch.label_mask, self.task_kinds, self.task_weights)

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        output = self(batch)
        loss, per_task = self._loss(output, batch)
        if not bool(torch.isfinite(loss)):
            bad = [n for n, v in zip(self.task_names, per_task.tolist()) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); non-finite task losses: {bad or 'none (the weighted sum overflowed)'}. "
                "Stopping; the last checkpoint written before this step is intact."
            )
        size = batch.batch_size
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in zip(self.task_names, per_task):
            self.log(f"train/{name}/loss", value, batch_size=size)
        return loss

    def _eval_step(self, batch, metrics: MultiTaskMetrics, stage: str):
        output = self(batch)
        loss, _ = self._loss(output, batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        metrics.update(output.logits, batch.labels, batch.label_mask, batch.domain, batch.user_id, batch.true_probs)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def _eval_epoch_end(self, metrics: MultiTaskMetrics, stage: str):
        results = metrics.compute()
        metrics.reset()
        self.eval_results[stage] = results
        loggable = {f"{stage}/{k}": v for k, v in results.items() if not k.endswith("/count") and math.isfinite(v)}
        # compute() already synced across ranks: every rank holds the same values.
        self.log_dict(loggable, sync_dist=False, rank_zero_only=False)

    def on_validation_epoch_end(self):
        self._eval_epoch_end(self.val_metrics, "val")

    def on_test_epoch_end(self):
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict[str, Tensor]:
        """Returns ``example_id [B]``, ``logits [B, T]``, ``probs [B, T]`` (sigmoid for binary tasks) and, when the
        network provides one, ``embedding [B, E]`` (its final representation, for teacher logging)."""
        output = self(batch)
        logits = output.logits.float()
        binary = torch.tensor([k == "binary" for k in self.task_kinds], device=logits.device)
        result = {
            "example_id": batch.example_id,
            "logits": logits,
            "probs": torch.where(binary, torch.sigmoid(logits), logits),
        }
        embedding = getattr(output, "representation", None)
        if embedding is not None:
            result["embedding"] = embedding.float()
        return result

    # ---- optimizers ------------------------------------------------------------------------------
    def _dense_parameters(self) -> list[nn.Parameter]:
        fused = set()
        if self.sparse_optimizer != "none":
            for module in self.fused_modules:
                fused.update(id(p) for p in module.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in fused]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._dense_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
