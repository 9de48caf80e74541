"""The ``lattice`` command.

``lattice fit|validate|test|predict --config ...`` is a LightningCLI over :class:`LatticeModule` (or a
subclass of it) and :class:`LatticeDataModule`; the network is chosen by ``class_path`` and the data's
schema is linked into it. lattice's own commands: ``lattice data generate|consolidate``, ``lattice
filter``, ``lattice partition``.

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

import importlib
import inspect
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from lattice.data.datamodule import LatticeDataModule
from lattice.train.callbacks import MetricsTable
from lattice.train.checkpoint import AtomicCheckpointIO
from lattice.train.module import LatticeModule
from lattice.train.writer import ParquetPredictionWriter

_LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class LatticeCLI(LightningCLI):
    """LightningCLI with the schema link, the metrics table and the Parquet prediction writer wired in."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.schema", "model.init_args.network.init_args.schema", apply_on="instantiate")
        parser.add_lightning_class_args(MetricsTable, "metrics_table")
        parser.add_lightning_class_args(ParquetPredictionWriter, "prediction_writer")
        # The Parquet reader shards row groups across ranks and workers itself (exactly-once reads).
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # `lattice predict` streams to Parquet; keeping every batch's output in memory too would not scale.
            parser.set_defaults(return_predictions=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Merges a ``--ckpt_path`` checkpoint's hyper-parameters into the parsed model config.

        Lightning's own version re-parses the model from the checkpoint's hyper-parameters alone, as
        ``dict_kwargs`` over the class defaults; in subclass mode under a subcommand that loses what the
        config gave and the checkpoint does not keep — the network, which :class:`LatticeModule` leaves
        out of its hyper-parameters. Here the checkpoint's values (and its class, as in Lightning) are laid
        over the config's model section instead, and the result parsed as one complete spec.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams and class_path is None:
            return
        model = self.config[subcommand].get("model")
        spec: dict[str, Any] = model.as_dict() if isinstance(model, Namespace) else dict(model or {})
        init_args = dict(spec.get("init_args") or {})
        if class_path is not None and class_path != spec.get("class_path"):
            # The checkpoint's class wins (as in Lightning); keep only the config's arguments it accepts.
            accepted = _init_parameters(class_path)
            if accepted is not None:
                init_args = {k: v for k, v in init_args.items() if k in accepted}
            spec["class_path"] = class_path
        init_args.update(hparams)
        spec["init_args"] = init_args
        try:
            self.config = self.parser.parse_object({subcommand: {"model": spec}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyper-parameters in ckpt_path {ckpt_path} failed!\n")
            raise

    def _instantiate_trainer(self, config, callbacks):
        if self.subcommand != "predict":  # the prediction writer only belongs to `lattice predict`
            callbacks = [c for c in callbacks if not isinstance(c, ParquetPredictionWriter)]
        config = dict(config)
        config["plugins"] = with_atomic_checkpoint_io(config.get("plugins"))
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


def _init_parameters(class_path: str) -> set[str] | None:
    """The ``__init__`` parameter names of ``class_path`` (``None`` if it cannot be imported or takes ``**kwargs``;
    the parser then reports the problem)."""
    module, _, name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def run_lightning(args: Sequence[str] | None = None, run: bool = True) -> LatticeCLI:
    """Runs the LightningCLI part (fit/validate/test/predict) on ``args`` (default ``sys.argv[1:]``)."""
    return LatticeCLI(
        LatticeModule,
        LatticeDataModule,
        subclass_mode_model=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=False,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lattice`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("data", "filter", "partition"):
        from lattice.commands import run_command

        run_command(argv)
        return
    if argv and argv[0] not in _LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"lattice: unknown command {argv[0]!r}; expected one of "
              f"{', '.join(_LIGHTNING_COMMANDS + ('data', 'filter', 'partition'))}", file=sys.stderr)
        raise SystemExit(2)
    run_lightning(argv)


if __name__ == "__main__":  # pragma: no cover
    main()
