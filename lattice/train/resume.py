"""Which checkpoint a resumed fit loads, when the newest one may be truncated or damaged.

Lightning resolves ``ckpt_path="last"`` to the newest ``last*.ckpt`` of the trainer's ``ModelCheckpoint``
callbacks and loads it; a damaged file then fails deep inside ``torch.load`` without naming it, and an
absent one starts training from scratch. :func:`resolve_ckpt_path` resolves ``"last"`` first:

- Lightning's choice, if it is a complete checkpoint (:func:`~lattice.train.checkpoint.verify_checkpoint`);
- otherwise, with a warning naming each damaged file, the newest complete checkpoint (by modification
  time, as Lightning orders them) among every ``*.ckpt`` in those callbacks' folders;
- :class:`~lattice.train.checkpoint.CheckpointError` naming the damaged files when none is complete;
- with a warning, the checkpoints of the newest earlier ``version_N`` run when this run's folder is empty (a
  versioned logger, such as the configs' CSVLogger, gives every run a new folder);
- ``None``, with a warning that training starts from scratch, when there is no checkpoint at all.

An explicit path is checked the same way and raises :class:`CheckpointError` when damaged. Other values
(``"best"``, ``"hpc"``, ``None``) are Lightning's to resolve and pass through.

``lattice fit --ckpt_path last`` resolves through this; a script calling ``trainer.fit`` itself passes
``ckpt_path=resolve_ckpt_path(trainer, "last")``.

Without ``--ckpt_path``, ``lattice validate|test|predict`` and ``lattice export`` use the best checkpoint
(:func:`resolve_best_checkpoint`): the one the first ``ModelCheckpoint`` with a ``monitor`` (the shipped configs'
``val/mean_auc``) kept. Lightning's ``ckpt_path="best"`` only knows it inside the process that trained; every
checkpoint a run writes carries that callback's state, ``best_model_path`` and ``best_model_score`` as they
were when it was written, so the newest complete checkpoint in the callback's folder (or, as for ``"last"``, the
newest earlier ``version_N`` run's) names the best. It is then taken as an explicit ``--ckpt_path`` would be (its hyper-parameters merged into the
model before it is built, :mod:`lattice.train.loading`).
"""
from __future__ import annotations

import glob
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn

from lattice.train.checkpoint import CheckpointError, load_checkpoint_file, verify_checkpoint

__all__ = ["BestCheckpoint", "best_checkpoint_for_configs", "best_checkpoint_for_trainer_config", "default_ckpt_path",
           "resolve_best_checkpoint", "resolve_ckpt_path", "resolve_last_checkpoint"]


def resolve_ckpt_path(trainer: "pl.Trainer", ckpt_path: Optional[str]) -> Optional[str]:
    """``ckpt_path`` as ``trainer.fit|validate|test|predict`` should receive it (see the module docstring)."""
    if ckpt_path is None:
        return None
    ckpt_path = os.fspath(ckpt_path)
    if ckpt_path == "last":
        return resolve_last_checkpoint(trainer)
    if ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry"):
        return ckpt_path
    if get_filesystem(ckpt_path).isfile(ckpt_path):
        verify_checkpoint(ckpt_path)
    return ckpt_path  # a missing file: Lightning's FileNotFoundError names it


def resolve_last_checkpoint(trainer: "pl.Trainer") -> Optional[str]:
    """The complete checkpoint ``ckpt_path="last"`` should resume from, or ``None`` when there is none at all.

    Raises:
        CheckpointError: checkpoints exist but every one is damaged (the message lists them).
    """
    last = _last_candidates(trainer)
    others = [p for p in _folder_checkpoints(trainer) if p not in last]
    if not last and not others:
        # A logger that versions its runs (CSVLogger's version_N) gives this run a new, empty folder; the run to
        # resume is the newest earlier version that holds checkpoints.
        last, others = _earlier_version_checkpoints(trainer)
        if last or others:
            rank_zero_warn(f"lattice: this run's checkpoint folder is empty; resuming from the newest earlier run's "
                           f"checkpoints in {os.path.dirname(next(iter(last or others)))}.")
    damaged: list[CheckpointError] = []
    for path in [*_newest_first(last), *_newest_first(others)]:
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            damaged.append(error)
            continue
        if damaged:
            rank_zero_warn(
                f"lattice: not resuming from {', '.join(e.path for e in damaged)} "
                f"({'; '.join(e.reason for e in damaged)}); resuming from {path}, the newest complete checkpoint."
            )
        return path
    if damaged:
        raise CheckpointError(
            damaged[0].path,
            f"{damaged[0].reason}; no complete checkpoint to resume from instead"
            + (f" (also damaged: {', '.join(f'{e.path} ({e.reason})' for e in damaged[1:])})" if damaged[1:] else "")
            + ". Delete the damaged files to start from scratch, or pass --ckpt_path PATH.",
        )
    folders = sorted(_checkpoint_folders(trainer))
    rank_zero_warn(f"lattice: --ckpt_path last found no checkpoint (looked in {', '.join(folders) or 'no folder'}); "
                   "training starts from scratch.")
    return None


@dataclass(frozen=True)
class BestCheckpoint:
    """The checkpoint a ``ModelCheckpoint`` kept as best: its ``path``, the ``monitor`` and its ``score``."""

    path: str
    monitor: str
    score: Optional[float]

    def describe(self) -> str:
        score = "" if self.score is None else f" = {self.score:.6g}"
        return f"the best checkpoint by {self.monitor}{score}, {self.path}"


def resolve_best_checkpoint(trainer: "pl.Trainer") -> BestCheckpoint:
    """The checkpoint the trainer's first ``ModelCheckpoint`` with a ``monitor`` kept as best in its last run.

    Looks in the callback's folder, or the newest earlier ``version_N`` run's when this run's holds no checkpoint
    (a versioned logger gives ``lattice test`` a new folder of its own). The newest complete checkpoint there that
    records the callback's state names the best (by ``best_model_path``: the file itself, or the file of that
    name in the folder when the run was moved); damaged files are passed over with a warning.

    Raises:
        ValueError: the trainer keeps no best checkpoint (no ``ModelCheckpoint`` has a ``monitor``), or none
            exists: no run wrote one, or no checkpoint records one (the message names the folders).
    """
    callback = next((cb for cb in trainer.checkpoint_callbacks
                     if isinstance(cb, ModelCheckpoint) and cb.monitor is not None), None)
    if callback is None:
        raise ValueError("the config keeps no best checkpoint (no trainer.callbacks ModelCheckpoint has a monitor, "
                         "as the shipped configs' monitor: val/mean_auc does); pass --ckpt_path")
    folder = os.path.normpath(callback._ModelCheckpoint__resolve_ckpt_dir(trainer))
    files = _checkpoints_in(folder)
    if not files:
        last, others = _earlier_version_checkpoints(trainer, [folder])
        files = last | others
    damaged: list[CheckpointError] = []
    for path in _newest_first(files):
        try:
            verify_checkpoint(path)
            state = _callback_state(path, callback)
        except CheckpointError as error:
            damaged.append(error)
            continue
        best = _recorded_best(state, os.path.dirname(path))
        if best is None:
            continue
        try:
            if best != path:
                verify_checkpoint(best)
        except CheckpointError as error:
            damaged.append(error)
            continue
        if damaged:
            rank_zero_warn(f"lattice: passed over damaged checkpoints: "
                           f"{'; '.join(f'{e.path} ({e.reason})' for e in damaged)}")
        score = state.get("best_model_score")
        score = float(score) if score is not None and math.isfinite(float(score)) else None
        return BestCheckpoint(best, callback.monitor, score)
    where = os.path.dirname(next(iter(files))) if files else folder
    found = (f"none of the {len(files)} checkpoint(s) in {where} records a best one" if files
             else f"no checkpoint in {folder}" + (" or an earlier version_N run beside it"
                                                  if re.search(r"version_\d+", folder) else ""))
    also = f" (damaged: {', '.join(f'{e.path} ({e.reason})' for e in damaged)})" if damaged else ""
    raise ValueError(f"no best checkpoint by {callback.monitor}: {found}{also}; run `lattice fit` with this config "
                     "first, or pass --ckpt_path")


def default_ckpt_path(trainer_config: Any, command: str) -> str:
    """The best checkpoint for ``lattice <command>`` run without ``--ckpt_path``: :func:`resolve_best_checkpoint`
    for the run of a parsed ``trainer`` config section; rank 0 prints which one it is."""
    best = best_checkpoint_for_trainer_config(trainer_config)
    if rank_zero_only.rank == 0:
        print(f"lattice {command}: no --ckpt_path given; using {best.describe()}", flush=True)
    return best.path


def best_checkpoint_for_configs(configs: Sequence[str]) -> BestCheckpoint:
    """:func:`resolve_best_checkpoint` for the run of ``configs`` (stacked like ``lattice fit``'s)."""
    from lattice.train.loading import parse_config

    return best_checkpoint_for_trainer_config(parse_config(configs).get("trainer"))


def best_checkpoint_for_trainer_config(trainer_config: Any) -> BestCheckpoint:
    """:func:`resolve_best_checkpoint` for a parsed ``trainer`` config section (a jsonargparse ``Namespace``),
    before anything is built: a Trainer with the section's ``ModelCheckpoint`` callbacks, logger and root folder
    places the run's checkpoints as the real one would."""
    from lattice.dotted import import_dotted

    callbacks = []
    for spec in _as_list(trainer_config.get("callbacks")):
        cls = import_dotted(spec.class_path) if hasattr(spec, "class_path") else None
        if cls is not None and issubclass(cls, ModelCheckpoint):
            callbacks.append(cls(**_init_args(spec)))
    logger = trainer_config.get("logger")
    if logger is not None and not isinstance(logger, bool):
        logger = [import_dotted(spec.class_path)(**_init_args(spec)) for spec in _as_list(logger)]
    # quietly: the run's own Trainer prints its device and logger notes
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        trainer = pl.Trainer(callbacks=callbacks, logger=logger, default_root_dir=trainer_config.get("default_root_dir"),
                             accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False)
    finally:
        lightning_log.setLevel(level)
    return resolve_best_checkpoint(trainer)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _init_args(spec: Any) -> dict[str, Any]:
    args = spec.get("init_args") if hasattr(spec, "get") else None
    return {} if args is None else dict(args.as_dict() if hasattr(args, "as_dict") else args)


def _callback_state(path: str, callback: ModelCheckpoint) -> dict[str, Any]:
    """``callback``'s state in checkpoint ``path`` (by its state key, else the ``ModelCheckpoint`` state with the same
    monitor); ``{}`` when the file holds none (a weights-only checkpoint)."""
    # mmap: only the pickled dictionaries are read, not the tensors' bytes
    checkpoint = load_checkpoint_file(path, map_location="cpu", weights_only=False, mmap=True)
    states = (checkpoint.get("callbacks") or {}) if isinstance(checkpoint, dict) else {}
    if callback.state_key in states:
        return states[callback.state_key]
    return next((s for key, s in states.items() if str(key).startswith(ModelCheckpoint.__name__)
                 and isinstance(s, dict) and s.get("monitor") == callback.monitor), {})


def _recorded_best(state: dict[str, Any], folder: str) -> Optional[str]:
    """The existing file ``state``'s ``best_model_path`` names: the path itself, else its name in ``folder``."""
    recorded = state.get("best_model_path")
    if not recorded:
        return None
    for path in (recorded, os.path.join(folder, os.path.basename(recorded))):
        if get_filesystem(path).isfile(path):
            return os.path.normpath(path)
    return None


def _earlier_version_checkpoints(trainer: "pl.Trainer",
                                 folders: Optional[Sequence[str]] = None) -> tuple[set[str], set[str]]:
    """``(last*.ckpt, other *.ckpt)`` of the newest ``version_N`` folder beside this run's that holds any (this
    run's: ``folders``, default every ``ModelCheckpoint``'s)."""
    by_version: dict[int, set[str]] = {}
    for folder in (_checkpoint_folders(trainer) if folders is None else folders):
        version_dir = os.path.dirname(folder)
        match = re.fullmatch(r"version_(\d+)", os.path.basename(version_dir))
        if not match:
            continue
        for sibling in glob.glob(os.path.join(os.path.dirname(version_dir), "version_*")):
            number = re.fullmatch(r"version_(\d+)", os.path.basename(sibling))
            files = glob.glob(os.path.join(sibling, os.path.basename(folder), "*" + ModelCheckpoint.FILE_EXTENSION))
            if number and files:
                by_version.setdefault(int(number.group(1)), set()).update(os.path.normpath(f) for f in files)
    if not by_version:
        return set(), set()
    files = by_version[max(by_version)]
    last = {f for f in files if os.path.basename(f).startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST)}
    return last, files - last


def _last_candidates(trainer: "pl.Trainer") -> set[str]:
    """Lightning's candidates for ``"last"``: ``last*.ckpt`` of every ``ModelCheckpoint``, and the
    ``OnExceptionCheckpoint`` files."""
    paths = {cb.ckpt_path for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            paths |= callback._find_last_checkpoints(trainer)
    return {p for p in paths if p and get_filesystem(p).exists(p)}


def _checkpoint_folders(trainer: "pl.Trainer") -> set[str]:
    """The folders the trainer's ``ModelCheckpoint`` callbacks write to."""
    # The same folder Lightning's own "last" search looks in (there is no public accessor for it).
    return {os.path.normpath(callback._ModelCheckpoint__resolve_ckpt_dir(trainer))
            for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)}


def _folder_checkpoints(trainer: "pl.Trainer") -> set[str]:
    """Every ``*.ckpt`` file in the folders the trainer's ``ModelCheckpoint`` callbacks write to."""
    found: set[str] = set()
    for folder in _checkpoint_folders(trainer):
        found |= _checkpoints_in(folder)
    return found


def _checkpoints_in(folder: str) -> set[str]:
    fs = get_filesystem(folder)
    if not fs.isdir(folder):
        return set()
    return {os.path.normpath(p) for p in fs.ls(folder, detail=False)
            if str(p).endswith(ModelCheckpoint.FILE_EXTENSION) and fs.isfile(p)}


def _newest_first(paths) -> list[str]:
    return sorted(paths, key=lambda p: (get_filesystem(p).modified(p), p), reverse=True)
