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
"""
from __future__ import annotations

import glob
import os
import re
from typing import Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lattice.train.checkpoint import CheckpointError, verify_checkpoint

__all__ = ["resolve_ckpt_path", "resolve_last_checkpoint"]


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


def _earlier_version_checkpoints(trainer: "pl.Trainer") -> tuple[set[str], set[str]]:
    """``(last*.ckpt, other *.ckpt)`` of the newest ``version_N`` folder beside this run's that holds any."""
    by_version: dict[int, set[str]] = {}
    for folder in _checkpoint_folders(trainer):
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
        fs = get_filesystem(folder)
        if fs.isdir(folder):
            found |= {os.path.normpath(p) for p in fs.ls(folder, detail=False)
                      if str(p).endswith(ModelCheckpoint.FILE_EXTENSION) and fs.isfile(p)}
    return found


def _newest_first(paths) -> list[str]:
    return sorted(paths, key=lambda p: (get_filesystem(p).modified(p), p), reverse=True)
