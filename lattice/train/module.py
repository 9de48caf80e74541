"""LatticeModule: the LightningModule that trains any lattice network on multi-domain, multi-task data."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn

from lattice.metrics import masked_multitask_loss, masked_task_sums, weighted_task_total
from lattice.nn.conditional import ConditionalTasks
from lattice.nn.norms import RunningStandardize
from lattice.train import faults, parallel, sharding as sharding_
from lattice.train.compile import CompileOption, compile_network, compile_options, mark_batch_dynamic
from lattice.train.finite_check import FiniteLossWatch, NonFiniteLossError, StepPlace
from lattice.train.label_checks import ConditionalLabelCheck, EvalConditionalLabelCheck
from lattice.train.metrics import MultiTaskMetrics

# The val/test metrics are logged after MultiTaskMetrics.compute() synced them across ranks; Lightning cannot tell
# and advises sync_dist=True for each of them at every epoch end.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('(val|test)/", category=PossibleUserWarning)

SparseOptimizer = Literal["rowwise_adagrad", "sgd", "none"]
__all__ = ["LatticeModule", "NonFiniteLossError", "SparseOptimizer", "mean_pair_auc"]


def _fused_embedding_modules(network: nn.Module) -> list[nn.Module]:
    """Sub-modules whose embedding weights are updated by a fused in-backward optimizer."""
    return [m for m in network.modules() if hasattr(m, "set_fused_optimizer")]


def mean_pair_auc(results: dict[str, float], domains: list[str], tasks: list[str]) -> float:
    """The mean of the finite ``<domain>/<task>/auc`` values in ``results`` (``nan`` when none is finite); logged as
    ``val/mean_auc``, the default checkpoint monitor and the sketch's objective."""
    values = [results.get(f"{d}/{t}/auc", math.nan) for d in domains for t in tasks]
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


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
        compile: ``torch.compile`` the network's forward and backward at ``setup`` (fit, validate, test,
            predict): ``false``, ``true`` (inductor) or a dict of options (``backend``, ``mode``, ``dynamic``,
            ``fullgraph``, ``options``); see :mod:`lattice.train.compile`. Checkpoints are the same either way.
        finite_check_every_n_steps: a NaN/inf training loss raises :class:`NonFiniteLossError`; the check reads
            the loss on the host, a device sync, so it runs every this many steps (``None``: the Trainer's
            ``log_every_n_steps``; ``1``: every step, before the bad step's backward), and always before a
            validation, at epoch end and before a checkpoint is written (see :mod:`lattice.train.finite_check`).
        sharding: shard the embedding tables across ranks (``{plan: auto | <plan file>, memory_per_rank,
            overrides}``, see :mod:`lattice.train.sharding`; needs its ``ShardedDDPStrategy``).
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
    ) -> None:
        super().__init__()
        self.sharding = sharding_.ShardingConfig.from_value(sharding)  # applied in setup(), once ranks exist
        self.sharding_plan = None
        self.compile_options = compile_options(compile)  # validated here, applied in setup()
        # Optimizer factories are code, not data: leaving them out keeps checkpoints loadable with weights_only.
        self.save_hyperparameters(ignore=["network", "optimizer", "lr_scheduler"])
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
        self.data_parallel = parallel.DataParallelState()
        self.finite_check_every_n_steps = finite_check_every_n_steps
        every = 1 if finite_check_every_n_steps is None else finite_check_every_n_steps  # None: set at fit start
        self.finite_watch = FiniteLossWatch(every, self.data_parallel.all_reduce_sum)
        conditional = next((m for m in network.modules() if isinstance(m, ConditionalTasks)), None)
        pairs = [] if conditional is None else [
            (c, p, self.task_names.index(c), self.task_names.index(p)) for c, p in conditional.order
        ]
        reduce = self.data_parallel.all_reduce_sum
        self.label_check = ConditionalLabelCheck(pairs, reduce=reduce) if pairs else None
        self.eval_label_check = EvalConditionalLabelCheck(pairs, reduce=reduce) if pairs else None
        self.val_metrics = MultiTaskMetrics(self.task_names, self.domain_names, self.task_kinds, group_auc=group_auc)
        self.test_metrics = MultiTaskMetrics(self.task_names, self.domain_names, self.task_kinds, group_auc=group_auc)
        self.eval_results: dict[str, dict[str, float]] = {}

    # ---- forward ---------------------------------------------------------------------------------
    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def forward(self, batch: Any):
        if self.compile_options is not None:
            mark_batch_dynamic(batch)
        with self._autocast():
            return self.network(batch)

    def _loss(self, output, batch, global_batch: bool = False) -> tuple[Tensor, Tensor]:
        """``(total [], per_task [T])``: each task's mean loss over its labeled rows, weighted and summed.

        With ``global_batch`` under data parallelism the mean runs over every rank's labeled rows (their
        count is all-reduced), scaled so that the ranks' averaged gradients equal the gradient of the global
        batch's loss exactly, whatever each rank's share of labels.
        """
        if not (global_batch and self.data_parallel.world_size > 1):
            return masked_multitask_loss(
                output.train_logits, batch.labels, batch.label_mask, self.task_kinds, self.task_weights
            )
        sums, counts = masked_task_sums(output.train_logits, batch.labels, batch.label_mask, self.task_kinds)
        world = self.data_parallel.world_size
        global_counts = self.data_parallel.all_reduce_sum(counts.detach())
        per_task = sums * world / global_counts.clamp_min(1.0)
        return weighted_task_total(per_task, self.task_weights), per_task

    def _watch_finite(self, loss: Tensor, parts: dict[str, Tensor], batch_idx: int) -> None:
        """Records the step's loss for :attr:`finite_watch`, which raises :class:`NonFiniteLossError` on every rank
        at once, at its next check, when any rank's loss or part was NaN/inf."""
        self.finite_watch.record(loss, parts, StepPlace(self.global_step, self.current_epoch, batch_idx))

    # ---- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        output = self(batch)
        loss, per_task = self._loss(output, batch, global_batch=True)
        self._watch_finite(loss, dict(zip(self.task_names, per_task)), batch_idx)
        if self.label_check is not None:
            self.label_check.update(batch.labels, batch.label_mask)
        size = batch.batch_size
        sync = self.data_parallel.world_size > 1
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=sync)
        for name, value in zip(self.task_names, per_task):
            self.log(f"train/{name}/loss", value, batch_size=size, sync_dist=sync)
        return loss

    def _eval_step(self, batch, metrics: MultiTaskMetrics, stage: str):
        output = self(batch)
        loss, _ = self._loss(output, batch)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch.batch_size, sync_dist=True)
        metrics.update(output.logits, batch.labels, batch.label_mask, batch.domain, batch.user_id, batch.true_probs)
        self._count_sharded_step(batch)
        if self.eval_label_check is not None:
            self.eval_label_check.update(batch.labels, batch.label_mask)

    def _count_sharded_step(self, batch) -> None:
        """Under sharding, records an evaluation or prediction step (:func:`lattice.train.sharding.count_eval_step`):
        a rank that runs out of batches re-runs its last one at the epoch's end, as often as the others need."""
        if self.sharding_plan is not None:
            sharding_.count_eval_step(self, batch)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def _eval_epoch_end(self, metrics: MultiTaskMetrics, stage: str):
        if self.sharding_plan is not None:  # sharded lookups are collectives: every rank runs as many steps
            sharding_.finish_eval_epoch(self)
        if self.eval_label_check is not None:
            self.eval_label_check.finish({"val": "validation"}.get(stage, stage), self.device)
        results = metrics.compute()
        metrics.reset()
        results["mean_auc"] = mean_pair_auc(results, self.domain_names, self.task_names)
        self.eval_results[stage] = results
        loggable = {f"{stage}/{k}": v for k, v in results.items() if not k.endswith("/count") and math.isfinite(v)}
        loggable.setdefault(f"{stage}/mean_auc", results["mean_auc"])  # a checkpoint monitor: present even when nan
        # compute() already synced across ranks: every rank holds the same values.
        self.log_dict(loggable, sync_dist=False, rank_zero_only=False)

    def on_train_start(self) -> None:
        if self.finite_check_every_n_steps is None:
            self.finite_watch.check()
            self.finite_watch.every = max(1, int(self.trainer.log_every_n_steps))

    def on_validation_start(self) -> None:
        self.finite_watch.check()  # a spoiled model is not validated (nor reported to a pruner)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite_watch.check()  # raising here leaves the file unwritten

    def on_train_end(self) -> None:
        self.finite_watch.check()

    def on_train_epoch_end(self):
        self.finite_watch.check()
        if self.label_check is not None:
            self.label_check.warn_contradictions(rank_zero_warn)

    def on_validation_epoch_start(self):
        if self.sharding_plan is not None:
            sharding_.start_eval_epoch(self, self.data_parallel.group, sharding_.eval_batches(self, "val"))

    def on_test_epoch_start(self):
        if self.sharding_plan is not None:
            sharding_.start_eval_epoch(self, self.data_parallel.group, sharding_.eval_batches(self, "test"))

    def on_predict_epoch_start(self):
        if self.sharding_plan is not None:
            sharding_.start_eval_epoch(self, self.data_parallel.group, sharding_.eval_batches(self, "predict"))

    def on_predict_epoch_end(self):
        if self.sharding_plan is not None:  # the padding steps' outputs never reach predict_step's callers
            sharding_.finish_eval_epoch(self)

    def on_validation_epoch_end(self):
        self._eval_epoch_end(self.val_metrics, "val")

    def on_test_epoch_end(self):
        self._eval_epoch_end(self.test_metrics, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0) -> dict[str, Tensor]:
        """Returns ``example_id [B]``, ``logits [B, T]``, ``probs [B, T]`` (sigmoid for binary tasks) and, when the
        network provides one, ``embedding [B, E]`` (its final representation, for teacher logging)."""
        output = self(batch)
        self._count_sharded_step(batch)
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

    # ---- data parallelism ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Under DDP or FSDP2: the fused embedding tables join the row exchange, and DDP is told to leave
        their weights and optimizer state alone (they are kept identical by the exchange instead)."""
        mesh = getattr(self, "_device_mesh", None)
        self.data_parallel.setup(mesh)
        if self.sharding is not None:
            self.sharding_plan = sharding_.shard_network(self, self.sharding, self.data_parallel.group)
            self.fused_modules = _fused_embedding_modules(self.network)
        compile_network(self.network, self.compile_options)
        if self.data_parallel.world_size > 1:
            faults.watch_launcher()
            # dense standardization merges the global batch, so its statistics agree on every rank
            for module in self.network.modules():
                if isinstance(module, RunningStandardize):
                    module.set_process_group(self.data_parallel.group)
        if self.data_parallel.world_size > 1 and self.sparse_optimizer != "none":
            for module in self.fused_modules:
                module.set_process_group(self.data_parallel.group)
            self._ddp_params_and_buffers_to_ignore = parallel.fused_state_names(self)

    def on_fit_start(self) -> None:
        if self.data_parallel.world_size > 1 and self.sparse_optimizer != "none":
            # Replicas start from rank 0's tables and optimizer state, whatever each rank initialized.
            parallel.broadcast_fused_state(self, self.data_parallel)

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy`` / :class:`lattice.train.FSDP2Strategy`): shard the dense layers
        over the data-parallel mesh; the fused embedding tables stay replicated (row exchange)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            parallel.fully_shard_dense(self, mesh)

    def configure_callbacks(self):
        return [faults.PeerFailureReporter()]

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
