"""Crash-safe checkpoint files: atomic writing, and checking that a file is a complete checkpoint.

A checkpoint is written to a temporary file beside its target, flushed and fsync'ed, then moved over the
target with an atomic rename (and the directory fsync'ed), so a crash at any point while saving leaves
the previous checkpoint at that path complete and loadable. A save that fails (a full disk, a quota)
raises :class:`CheckpointWriteError` naming the path, after removing its temporary file. Remote paths fall
back to Lightning's fsspec transaction.

:func:`verify_checkpoint` tells a complete checkpoint from a truncated or damaged one: ``torch.save``
writes a zip archive whose central directory comes last and which holds a CRC-32 of every record, so a
file is complete if the directory is there and every record matches its CRC. (``torch.load`` itself does
not check the CRCs: a flipped bit in a tensor loads silently.)
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointError", "CheckpointWriteError", "atomic_torch_save", "load_checkpoint_file",
           "verify_checkpoint"]

_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated or damaged. The message names the file."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota, a file size limit); the file at ``filename`` holds
    what it held before. ``errno`` is the failed write's, where it had one."""

    def __init__(self, path: str, cause: BaseException, previous: bool) -> None:
        kept = "the previous checkpoint at this path is left as it was" if previous else "no checkpoint was written"
        cause = _os_error_behind(cause)
        super().__init__(getattr(cause, "errno", None), f"could not write the checkpoint ({cause}); {kept}",
                         os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"

    def __reduce__(self):
        return (_rebuild_write_error, (self.errno, self.strerror, self.filename))


def _os_error_behind(error: BaseException) -> BaseException:
    """The ``OSError`` (with an errno) that ``error`` was raised during, else ``error``: torch's zip writer
    reports a failed write (ENOSPC) as a RuntimeError about the stream position, raised while handling it."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return error


def _rebuild_write_error(errno, strerror, filename) -> "CheckpointWriteError":
    error = CheckpointWriteError.__new__(CheckpointWriteError)
    OSError.__init__(error, errno, strerror, filename)
    return error


def _is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (temporary file + fsync + rename).

    Raises:
        CheckpointWriteError: the write failed (e.g. no space left); ``path`` holds what it held before.
    """
    path = os.fspath(path)
    if path.startswith("file://"):
        path = path[len("file://"):]
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not a write failure
            raise
        raise CheckpointWriteError(path, exc, previous=os.path.exists(path)) from exc
    _remove_stale_temporaries(directory, os.path.basename(path))
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Temporary files an earlier crash left while writing ``name`` (never a complete checkpoint)."""
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if entry.startswith(prefix) and entry.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:
                pass


def verify_checkpoint(path: str) -> None:
    """Checks that ``path`` is a complete ``torch.save`` archive, reading it once.

    Records saved without a CRC (``torch.serialization.set_crc32_options(False)``) are checked for
    completeness only.

    Raises:
        CheckpointError: naming ``path`` and what is wrong (missing, empty, truncated, not a torch
            checkpoint, or a record whose bytes do not match its CRC-32).
    """
    path = os.fspath(path)
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise CheckpointError(path, "no such file")
    try:
        with fs.open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                raise CheckpointError(path, "the file is empty")
            f.seek(0)
            try:
                archive = zipfile.ZipFile(f)
            except zipfile.BadZipFile as exc:
                raise CheckpointError(path, f"truncated or not a torch checkpoint ({size} bytes, no complete zip "
                                            f"archive: {exc})") from exc
            with archive:
                records = archive.infolist()
                if not any(r.filename.endswith("/data.pkl") or r.filename == "data.pkl" for r in records):
                    raise CheckpointError(path, "a zip archive without data.pkl, not a torch checkpoint")
                for record in records:
                    _check_record(archive, record, path)
    except CheckpointError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:
        raise CheckpointError(path, f"unreadable ({type(exc).__name__}: {exc})") from exc


def _check_record(archive: zipfile.ZipFile, record: zipfile.ZipInfo, path: str) -> None:
    if record.CRC == 0 and record.file_size > 0:
        return  # saved without CRC-32: the central directory being there says the save completed
    try:
        with archive.open(record) as stream:  # raises BadZipFile at the end on a CRC mismatch
            while stream.read(_CHUNK):
                pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"record {record.filename!r} is damaged ({exc})") from exc


def load_checkpoint_file(path: str, **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)``; when that fails on a damaged file, :class:`CheckpointError` names it."""
    try:
        return torch.load(path, **kwargs)
    except FileNotFoundError:
        raise
    except Exception:
        verify_checkpoint(os.fspath(path))  # raises when the file is damaged; otherwise the original error stands
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` whose local saves are atomic (see :func:`atomic_torch_save`) and whose loads
    name the file when it is damaged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception:
            verify_checkpoint(os.fspath(path))  # raises, naming the file, when the file is damaged
            raise
