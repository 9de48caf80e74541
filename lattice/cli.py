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

import sys
from typing import Sequence

from lightning.pytorch.plugins.io import CheckpointIO

from lattice.data.datamodule import LatticeDataModule
from lattice.train.checkpoint import AtomicCheckpointIO
from lattice.train.loading import ConfigCLI
from lattice.train.module import LatticeModule
from lattice.train.resume import resolve_ckpt_path
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

    def _prepare_subcommand_kwargs(self, subcommand):
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") is not None:  # "last" past damaged files, a damaged file named (train/resume.py)
            kwargs["ckpt_path"] = resolve_ckpt_path(self.trainer, kwargs["ckpt_path"])
        return kwargs

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
