"""Reading lattice's YAML configs: the one parser behind ``lattice fit|validate|test|predict`` and
:func:`load_from_config`, which rebuilds ``(module, datamodule)`` from configs and a checkpoint for every
other caller (``lattice filter``, the online teacher, the benchmarks).

A ``--ckpt_path`` checkpoint's hyper-parameters (and class) are laid over the config's model section before
anything is built (:func:`checkpoint_model_spec`), so a checkpoint of a LatticeModule subclass trained with
other settings rebuilds as it was trained.
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Optional, Sequence, Union

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lattice.data.datamodule import LatticeDataModule
from lattice.dotted import import_dotted
from lattice.train.callbacks import MetricsTable
from lattice.train.checkpoint import load_checkpoint_file
from lattice.train.module import LatticeModule
from lattice.train.sharded_checkpoint import load_full_tables, tables_folder
from lattice.train.writer import ParquetPredictionWriter

__all__ = ["ConfigCLI", "checkpoint_model_spec", "load_from_config", "parse_config"]


class ConfigCLI(LightningCLI):
    """LightningCLI reading lattice configs: the data's schema linked into the network, the metrics table and
    the Parquet prediction writer as config sections, and a checkpoint's hyper-parameters merged into the
    model (see :func:`checkpoint_model_spec`)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.schema", "model.init_args.network.init_args.schema", apply_on="instantiate")
        parser.add_lightning_class_args(MetricsTable, "metrics_table")
        parser.add_lightning_class_args(ParquetPredictionWriter, "prediction_writer")
        # The Parquet reader shards row groups across ranks and workers itself (exactly-once reads).
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def _parse_ckpt_path(self) -> None:
        """Merges a subcommand's ``--ckpt_path`` hyper-parameters into its parsed model config.

        Lightning's own version re-parses the model from the checkpoint's hyper-parameters alone, as
        ``dict_kwargs`` over the class defaults; in subclass mode under a subcommand that loses what the
        config gave and the checkpoint does not keep — the network, which :class:`LatticeModule` leaves
        out of its hyper-parameters.
        """
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._merge_checkpoint(self.config[subcommand].get("ckpt_path"), subcommand)

    def _merge_checkpoint(self, ckpt_path: Optional[str], subcommand: Optional[str]) -> None:
        section = self.config[subcommand] if subcommand else self.config
        spec = checkpoint_model_spec(section.get("model"), ckpt_path)
        if spec is None:
            return
        update = {"model": spec}
        try:
            self.config = self.parser.parse_object({subcommand: update} if subcommand else update, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the hyper-parameters in ckpt_path {ckpt_path} failed!\n")
            raise


def checkpoint_model_spec(model: Union[Namespace, dict, None], ckpt_path: Optional[str]) -> Optional[dict]:
    """The model section ``{class_path, init_args}`` with the checkpoint's hyper-parameters laid over the
    config's: the checkpoint's class wins (as in Lightning), keeping only the config's arguments it accepts.
    ``None`` when there is no such checkpoint file or it records no hyper-parameters."""
    if not (ckpt_path and os.path.isfile(ckpt_path)):
        return None
    checkpoint = load_checkpoint_file(ckpt_path, weights_only=True, map_location="cpu")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    class_path = hparams.pop("_class_path", None)
    if not hparams and class_path is None:
        return None
    spec: dict[str, Any] = model.as_dict() if isinstance(model, Namespace) else dict(model or {})
    init_args = dict(spec.get("init_args") or {})
    if class_path is not None and class_path != spec.get("class_path"):
        accepted = _init_parameters(class_path)
        if accepted is not None:
            init_args = {k: v for k, v in init_args.items() if k in accepted}
        spec["class_path"] = class_path
    init_args.update(hparams)
    spec["init_args"] = init_args
    return spec


def _init_parameters(class_path: str) -> Optional[set[str]]:
    """The ``__init__`` parameter names of ``class_path`` (``None`` if it cannot be imported or takes ``**kwargs``;
    the parser then reports the problem)."""
    try:
        params = inspect.signature(import_dotted(class_path)).parameters
    except (ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


class _ConfigLoader(ConfigCLI):
    """:class:`ConfigCLI` without a subcommand or a Trainer: parses, optionally seeds, optionally builds the
    module and the data module."""

    def __init__(self, args: list[str], ckpt_path: Optional[str], instantiate: bool, seed: bool) -> None:
        self._ckpt_path, self._instantiate, self._seed = ckpt_path, instantiate, seed
        self.model = self.datamodule = None
        super().__init__(
            LatticeModule, LatticeDataModule, subclass_mode_model=True, args=args, run=False,
            save_config_callback=None, parser_kwargs={"default_env": False}, auto_configure_optimizers=False,
        )

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # the config.yaml a `lattice fit` run saves records its ckpt_path
        parser.add_argument("--ckpt_path", type=Optional[str], default=None)

    def _parse_ckpt_path(self) -> None:
        self._ckpt_path = self._ckpt_path or self.config.get("ckpt_path")
        self._merge_checkpoint(self._ckpt_path, None)

    def _set_seed(self) -> None:
        if self._seed:
            super()._set_seed()

    def instantiate_classes(self) -> None:
        if self._instantiate:
            self.config_init = self.parser.instantiate_classes(self.config)
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")


def _cli_args(configs: Union[str, Sequence[str]], overrides: Sequence[str]) -> list[str]:
    configs = [configs] if isinstance(configs, (str, os.PathLike)) else list(configs)
    if not configs:
        raise ValueError("load_from_config needs at least one config file")
    args: list[str] = []
    for path in configs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        args += ["--config", str(path)]
    return args + list(overrides)


def parse_config(configs: Union[str, Sequence[str]], overrides: Sequence[str] = ()) -> Namespace:
    """The configs (stacked like ``lattice fit --config A --config B``) and ``--key=value`` overrides, parsed and
    checked like ``lattice fit`` does, without building anything."""
    return _ConfigLoader(_cli_args(configs, overrides), None, instantiate=False, seed=False).config


def load_from_config(
    configs: Union[str, Sequence[str]],
    ckpt_path: Optional[str] = None,
    *,
    overrides: Sequence[str] = (),
    seed: bool = True,
) -> tuple[LatticeModule, LatticeDataModule]:
    """``(module, datamodule)`` exactly as ``lattice fit --config ...`` builds them, with ``ckpt_path``'s weights.

    Args:
        configs: one config path or several, stacked in order.
        ckpt_path: a Lightning checkpoint of the module; its hyper-parameters are laid over the config's model
            section and its ``state_dict`` loaded strictly (a sharded run's tables from the DCP folder beside it,
            whole: the module comes back unsharded). Default: the configs' ``ckpt_path`` if they give one.
        overrides: ``--key=value`` arguments applied after the configs (as on the command line).
        seed: seed everything from the configs' ``seed_everything`` first, as ``lattice fit`` does.
    """
    if ckpt_path is not None and not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"checkpoint {ckpt_path!r} does not exist")
    loader = _ConfigLoader(_cli_args(configs, overrides), ckpt_path, instantiate=True, seed=seed)
    module, datamodule = loader.model, loader.datamodule
    if loader._ckpt_path:
        state = load_checkpoint_file(loader._ckpt_path, map_location="cpu", weights_only=False)
        if "state_dict" not in state:
            raise ValueError(f"checkpoint {loader._ckpt_path!r} has no state_dict (is it a Lightning checkpoint?)")
        _load_weights(module, state, loader._ckpt_path)
    return module, datamodule


def _load_weights(module: LatticeModule, checkpoint: dict, ckpt_path: str) -> None:
    """``checkpoint``'s weights into ``module`` (strictly); the tables of a sharded run come from the DCP folder
    beside the file, whole, into the module's unsharded collections."""
    folder = tables_folder(checkpoint, ckpt_path)
    if folder is None:
        module.load_state_dict(checkpoint["state_dict"])
        return
    prefixes = tuple(f"{p}." for p in checkpoint["sharded_tables"]["plans"])
    result = module.load_state_dict(checkpoint["state_dict"], strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"loading {ckpt_path}: missing keys {missing[:10]}, unexpected keys "
                           f"{result.unexpected_keys[:10]}")
    load_full_tables(module, folder)
