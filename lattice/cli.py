"""The ``lattice`` command.

``lattice fit|validate|test|predict --config ...`` is a LightningCLI over :class:`LatticeModule` (or a
subclass of it) and :class:`LatticeDataModule`; the network is chosen by ``class_path`` and the data's
schema is linked into it. lattice's own commands: ``lattice data generate|consolidate``, ``lattice
filter``, ``lattice partition``, ``lattice plan``.

The model section takes either form::

    model:                                   # LatticeModule, init args given directly
      network: {class_path: lattice.models.LatticeNetwork, init_args: {dim: 32}}
    model:                                   # any LatticeModule subclass, e.g. a distillation student
      class_path: lattice.distill.DistillationModule
      init_args: {network: ..., distillation: aux_head}

(subclass mode with ``LatticeModule`` as the implicit class: a mapping without ``class_path`` is read as
``LatticeModule``'s init args, so stacked configs such as ``--config configs/mdmo.yaml --config
configs/interformer.yaml`` merge as before).
"""
from __future__ import annotations

import contextlib
import os
import sys
from argparse import ArgumentError
from typing import Sequence

import torch
from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lattice.data.datamodule import LatticeDataModule
from lattice.nn.embedding import deferred_tables
from lattice.train import faults
from lattice.train.callbacks import ModelSummary
from lattice.train.checkpoint import AtomicCheckpointIO
from lattice.train.loading import ConfigCLI
from lattice.train.module import LatticeModule
from lattice.train.resume import default_ckpt_path, resolve_ckpt_path
from lattice.train.sharding import sharding_requested
from lattice.train.writer import ParquetPredictionWriter

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class LatticeCLI(ConfigCLI):
    """:class:`~lattice.train.loading.ConfigCLI` (the schema link, the metrics table, the Parquet prediction
    writer, checkpoint hyper-parameters) running lattice's Lightning subcommands."""

    def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # `lattice predict` streams to Parquet; keeping every batch's output in memory too would not scale.
            parser.set_defaults(return_predictions=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand in ("validate", "test", "predict") and self.config[subcommand].get("ckpt_path") is None:
            # the best checkpoint the config's monitored ModelCheckpoint kept, taken as an explicit --ckpt_path
            self.config[subcommand].ckpt_path = default_ckpt_path(self.config[subcommand].get("trainer"), subcommand)
        super()._parse_ckpt_path()

    def _prepare_subcommand_kwargs(self, subcommand):
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None:  # "last" past damaged files, a damaged file named (train/resume.py)
            kwargs["ckpt_path"] = resolve_ckpt_path(self.trainer, kwargs["ckpt_path"])
        return kwargs

    def instantiate_classes(self) -> None:
        # Under model.sharding each rank makes its own shards at setup: the network's tables are never built whole.
        deferred = sharding_requested(self._get(self.config, "model"))
        with deferred_tables() if deferred else contextlib.nullcontext():
            super().instantiate_classes()

    def _instantiate_trainer(self, config, callbacks):
        if self.subcommand != "predict":  # the prediction writer only belongs to `lattice predict`
            callbacks = [c for c in callbacks if not isinstance(c, ParquetPredictionWriter)]
        config = dict(config)
        config["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
        configured = [*callbacks, *(config.get("callbacks") or [])]
        if config.get("enable_model_summary") is not False and not any(
                isinstance(c, LightningModelSummary) for c in configured):
            callbacks = [*callbacks, ModelSummary()]  # instead of Lightning's default, whose FLOPs read 0
            config["enable_model_summary"] = False  # Lightning's own default summary; ours runs as a callback
        return super()._instantiate_trainer(config, callbacks)


def with_atomic_checkpoint_io(plugins):
    """``plugins`` plus :class:`AtomicCheckpointIO` unless a ``CheckpointIO`` is configured already, so a crash
    while saving never leaves a run without a loadable checkpoint."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins):
        return list(plugins)
    return [*plugins, AtomicCheckpointIO()]


def run_lightning(args: Sequence[str] | None = None, run: bool = True) -> LatticeCLI:
    """Runs the LightningCLI part (fit/validate/test/predict) on ``args`` (default ``sys.argv[1:]``)."""
    return LatticeCLI(
        LatticeModule,
        LatticeDataModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        # A parse error raises (and main() prints it as one line) instead of printing the whole usage first.
        parser_kwargs={"default_env": False, "exit_on_error": False},
        auto_configure_optimizers=False,
    )


# Every command ``lattice --help`` lists: name -> one-line description. The LightningCLI part takes the first four.
COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI: --config YAML, any --section.key=value override)",
    "validate": "evaluate a checkpoint on the validation split and print the per-domain x per-task table",
    "test": "evaluate a checkpoint on the test split and print the per-domain x per-task table",
    "predict": "score rows with a checkpoint and write predictions (teacher logits) to Parquet",
    "data": "data tools: generate the planted world, consolidate per-domain datasets, infer a schema",
    "filter": "Lattice Filter: permutation importance and Pareto feature selection under a budget",
    "partition": "group (domain, objective) portfolios by id overlap and label delay",
    "plan": "place embedding tables across ranks (replicated, table-, row-, column-wise) under a memory budget",
    "sketch": "Lattice Sketch: budgeted search over hyper-parameters and network class (Optuna); --lr-find",
    "export": "export a checkpoint to a serving package (torch.export + AOTInductor .pt2); "
              "lattice predict --package scores with one",
}


def format_help() -> str:
    """The top-level ``lattice --help`` text: every command, LightningCLI's and lattice's own."""
    width = max(map(len, COMMANDS))
    lines = ["usage: lattice COMMAND [ARGS...]", "",
             "lattice: multi-domain, multi-objective recommendation on PyTorch Lightning.", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "`lattice COMMAND --help` shows a command's options. LATTICE_DEBUG=1 shows the Python traceback "
              "of an error."]
    return "\n".join(lines)


def _run(argv: list[str], from_sys_argv: bool) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(format_help())
        return
    command = argv[0]
    if command in ("data", "filter", "partition"):
        from lattice.commands import run_command

        run_command(argv)
        return
    if command == "plan":
        from lattice.train.plan_command import main as plan_main

        plan_main(argv)
        return
    if command == "sketch":
        from lattice.sketch.commands import main as sketch_main  # optional dependency: optuna

        sketch_main(argv)
        return
    if command == "export" or (command == "predict" and any(a.split("=")[0] == "--package" for a in argv)):
        from lattice.serve.commands import main as serve_main  # lattice export, lattice predict --package

        serve_main(argv)
        return
    if command not in _LIGHTNING_COMMANDS:
        if command.startswith("-"):
            raise UsageError(f"expected a command before {command!r}; one of {', '.join(COMMANDS)}")
        raise UsageError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    # LightningCLI reads sys.argv itself; passing the same list as ``args`` too only earns a warning.
    run_lightning(None if from_sys_argv else argv)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lattice`` console script.

    Bad input — a :class:`~lattice.data.errors.DataError`, a schema or config error, a missing file, a bad
    checkpoint — ends the command with one line, ``lattice: error: <message>``, on stderr and exit status 2
    (the Python traceback only with ``LATTICE_DEBUG=1``). When a rank of a multi-process run stops because a
    collective with a dead peer failed, the line :class:`~lattice.train.faults.PeerFailureReporter` printed is
    the whole report (exit status 1).
    """
    argv = list(sys.argv[1:] if args is None else args)
    try:
        _run(argv, from_sys_argv=args is None)
    except Exception as exc:  # noqa: BLE001 - sorted below; anything unexpected is re-raised with its traceback
        if os.environ.get("LATTICE_DEBUG", "") not in ("", "0"):
            raise
        if is_user_error(exc):
            sys.stderr.write(f"lattice: error: {error_line(exc)}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
        if faults.is_peer_failure(exc) and _distributed_world_size() > 1:
            raise SystemExit(1) from None
        raise


class UsageError(ValueError):
    """A command line lattice cannot run (an unknown command)."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input a person can fix from its message (data, schema, config, a path), as opposed to
    a fault in lattice or torch, which keeps its traceback."""
    if isinstance(exc, (ValueError, ArgumentError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError, MisconfigurationException)):
        return True
    return isinstance(exc, OSError) and exc.errno is not None and exc.filename is not None


def error_line(exc: BaseException) -> str:
    """``exc``'s message on one line (an ``OSError`` names its path)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    lines = [line.strip().removeprefix("- ") for line in text.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(_PARSER_NOISE))
    rank = _distributed_rank()
    return f"[rank {rank}] {text}" if rank else text


# jsonargparse's report of a failed union (LightningCLI's subclass mode) around the error that matters.
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:",
                 "Expected a <class 'NoneType'>", "Given value type:", "Given value:")


def _distributed_world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _distributed_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
