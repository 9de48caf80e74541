"""DistillationCallback: runs a frozen teacher online on every training batch and hands its outputs to
the student's loss through the batch."""
from __future__ import annotations

import inspect
import os
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lattice.dotted import import_dotted

__all__ = ["DistillationCallback", "load_teacher_network"]


def _build_network(spec: dict[str, Any], schema: Any) -> nn.Module:
    """``{"class_path": ..., "init_args": {...}}`` -> the network, with ``schema`` filled in when the class
    takes one and the spec gives none."""
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"a teacher network spec needs a class_path (and init_args), got {spec!r}")
    cls = import_dotted(spec["class_path"], "the teacher network class")
    args = dict(spec.get("init_args") or {})
    params = inspect.signature(cls).parameters
    if "schema" in params and args.get("schema") is None:
        if schema is None:
            raise ValueError(f"{spec['class_path']} needs a schema and none is known for the teacher")
        args["schema"] = schema
    return cls(**args)


def _network_spec_from_config(path: str) -> dict[str, Any]:
    """The model's network section of a teacher run's config (the ``config.yaml`` LightningCLI saves), read by
    the same parser as ``lattice fit``; its schema is left out (linked from the data at fit time)."""
    from lattice.train.loading import parse_config

    network = parse_config(path).model.init_args.get("network")
    spec = network.as_dict() if hasattr(network, "as_dict") else network
    if not isinstance(spec, dict) or not spec.get("class_path"):
        raise ValueError(f"{path}: no model network with a class_path")
    init_args = dict(spec.get("init_args") or {})
    init_args.pop("schema", None)
    return {"class_path": spec["class_path"], "init_args": init_args}


def _is_optimizer_state(key: str) -> bool:
    return "optimizer_state." in key or key.startswith("optimizer_state")


def _default_config_path(ckpt: str) -> str | None:
    """LightningCLI writes ``<log_dir>/config.yaml`` and checkpoints to ``<log_dir>/checkpoints/``."""
    here = os.path.dirname(os.path.abspath(ckpt))
    for directory in (here, os.path.dirname(here)):
        candidate = os.path.join(directory, "config.yaml")
        if os.path.isfile(candidate):
            return candidate
    return None


def load_teacher_network(
    ckpt: str,
    schema: Any,
    network: dict[str, Any] | nn.Module | None = None,
    config: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Builds the teacher network and loads its weights from a Lightning checkpoint of a
    :class:`~lattice.train.LatticeModule` (its ``network.*`` parameters; anything else — an auxiliary head,
    optimizer state — is ignored).

    The architecture comes from, in order: ``network`` (a module, or a ``{class_path, init_args}`` spec), the
    checkpoint's ``hyper_parameters["network"]`` when it is such a spec, ``config`` (a LightningCLI
    ``config.yaml`` of the teacher's run), or the ``config.yaml`` LightningCLI saved beside the checkpoint.
    ``schema`` is used for a spec without one.
    """
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"teacher checkpoint {ckpt!r} does not exist")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = checkpoint.get("state_dict", checkpoint)
    if isinstance(network, nn.Module):
        module = network
    else:
        spec = network
        if spec is None:
            hp = checkpoint.get("hyper_parameters") or {}
            if isinstance(hp.get("network"), dict) and "class_path" in hp["network"]:
                spec = hp["network"]
        if spec is None:
            config = config or _default_config_path(ckpt)
            if config is None:
                raise ValueError(
                    f"cannot tell the teacher's architecture: give teacher_network ({{class_path, init_args}}) or "
                    f"teacher_config (the teacher run's LightningCLI config.yaml); none was found beside {ckpt!r}"
                )
            spec = _network_spec_from_config(config)
        module = _build_network(spec, schema)
    prefix = "network."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"teacher checkpoint {ckpt!r} has no 'network.*' weights (is it a LatticeModule checkpoint?)")
    # A frozen teacher needs no optimizer state: the fused embedding optimizer's buffers (sized by the
    # optimizer the teacher trained with, empty in a fresh network) are left out on both sides.
    weights = {k: v for k, v in weights.items() if not _is_optimizer_state(k)}
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches raise even when not strict
        raise ValueError(
            f"teacher checkpoint {ckpt!r} does not match the teacher network {type(module).__name__}: {err}"
        ) from None
    missing = [k for k in missing if not _is_optimizer_state(k)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"teacher checkpoint {ckpt!r} does not match the teacher network {type(module).__name__}: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return module


class DistillationCallback(pl.Callback):
    """Runs a frozen teacher on each training batch (eval mode, no gradients) and writes its outputs into
    the batch — ``teacher_logits [B, T]`` (its serving logits), ``teacher_mask [B]`` (all True) and, with
    ``embedding``, ``teacher_embedding [B, E]`` (its representation) — for
    :class:`~lattice.distill.DistillationModule`'s losses.

    Under DDP every rank holds its own teacher replica (not part of the student, so never wrapped, synced
    or checkpointed) and scores its own batches.

    Args:
        teacher_ckpt: a Lightning checkpoint of the teacher LatticeModule.
        teacher_network: the teacher's architecture as ``{class_path, init_args}`` (the schema is the
            student's unless given); default: from the checkpoint or the teacher run's ``config.yaml``.
        teacher_config: path of the teacher run's LightningCLI ``config.yaml``.
        every_k_steps: run the teacher on every k-th training batch only (the others carry no teacher
            outputs unless the data supplied some); counted in training batches of this process.
        embedding: also hand over the teacher's representation (for the KTAP teacher token).
        overwrite: replace teacher outputs the batch already carries (e.g. joined from logged outputs).
        teacher: a ready teacher (a LatticeModule or network) instead of a checkpoint, for Python use.
        strict: the checkpoint must match the architecture exactly.
    """

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_network: dict[str, Any] | None = None,
        teacher_config: str | None = None,
        every_k_steps: int = 1,
        embedding: bool = True,
        overwrite: bool = True,
        teacher: nn.Module | None = None,
        strict: bool = True,
    ) -> None:
        if teacher is None and teacher_ckpt is None:
            raise ValueError("DistillationCallback needs teacher_ckpt (or a teacher module)")
        if every_k_steps < 1:
            raise ValueError(f"every_k_steps must be >= 1, got {every_k_steps}")
        self.teacher_ckpt = teacher_ckpt
        self.teacher_network = teacher_network
        self.teacher_config = teacher_config
        self.every_k_steps = every_k_steps
        self.embedding = embedding
        self.overwrite = overwrite
        self.strict = strict
        self.teacher: nn.Module | None = teacher
        self.batches_seen = 0
        self.teacher_calls = 0

    # ---- lifecycle -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher is None:
            schema = getattr(getattr(pl_module, "network", None), "schema", None)
            self.teacher = load_teacher_network(
                self.teacher_ckpt, schema, self.teacher_network, self.teacher_config, self.strict
            )
        self.teacher.to(pl_module.device)
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self._check_tasks(pl_module)

    def _check_tasks(self, pl_module: pl.LightningModule) -> None:
        teacher_tasks = self._tasks(self.teacher)
        student_tasks = list(getattr(pl_module, "task_names", []) or [])
        if teacher_tasks is not None and student_tasks and teacher_tasks != student_tasks:
            raise ValueError(
                f"the teacher predicts tasks {teacher_tasks} but the student learns {student_tasks}; "
                "the online teacher must share the student's schema (same tasks, same order)"
            )

    @staticmethod
    def _tasks(module: nn.Module) -> list[str] | None:
        names = getattr(module, "task_names", None)
        if names is None and getattr(module, "schema", None) is not None:
            names = [t.name for t in module.schema.tasks]
        return list(names) if names is not None else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy may have moved the student after setup (e.g. to its rank's device).
        if self.teacher is not None:
            self.teacher.to(pl_module.device)

    # ---- per batch -------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_outputs(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(logits [B, T] float32, representation [B, E] float32 or None)`` of the frozen teacher.
        Gradient-free (``no_grad``, not ``inference_mode``: the outputs are saved for the student's backward)."""
        if self.teacher.training:
            self.teacher.eval()
        output = self.teacher(batch)
        logits = output.logits.float()
        rep = getattr(output, "representation", None)
        return logits, (rep.float() if rep is not None else None)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        run = self.batches_seen % self.every_k_steps == 0
        self.batches_seen += 1
        if not run:
            return
        if not self.overwrite and getattr(batch, "teacher_logits", None) is not None:
            return
        logits, rep = self.teacher_outputs(batch)
        batch.teacher_logits = logits
        batch.teacher_mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.embedding and rep is not None:
            batch.teacher_embedding = rep
        self.teacher_calls += 1

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
