"""Failing fast in multi-process training: a rank whose peer or launcher died stops at once, saying why.

- Lightning's subprocess launcher kills every rank when a child rank dies; gloo and NCCL raise in the
  surviving ranks' next collective. :class:`PeerFailureReporter` turns that deep ``RuntimeError`` into a
  message naming this rank, the step and the likely cause.
- :func:`watch_launcher` covers the other direction: a rank whose launcher (rank 0's process, or
  torchrun's agent) was killed exits instead of waiting on a collective until its timeout.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

import lightning.pytorch as pl

__all__ = ["PeerFailureReporter", "is_peer_failure", "watch_launcher"]

_PEER_FAILURE_MARKERS = (
    "Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL", "ProcessGroup",
    "Socket Timeout", "timed out", "gloo",
)


def is_peer_failure(exception: BaseException) -> bool:
    """Whether ``exception`` is a failed collective (gloo/NCCL), the sign of a dead or killed peer rank."""
    text = f"{type(exception).__name__}: {exception}"
    return isinstance(exception, RuntimeError) and any(m in text for m in _PEER_FAILURE_MARKERS)


class PeerFailureReporter(pl.Callback):
    """When a collective fails under multi-process training (another rank died), writes one clear line to
    stderr before the traceback: this rank, the step, and the likely cause."""

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if trainer.world_size <= 1:
            return
        if not is_peer_failure(exception):  # the exception's own message says what happened
            return
        text = f"{type(exception).__name__}: {exception}"
        where = f"rank {trainer.global_rank} of {trainer.world_size}, global step {trainer.global_step}"
        message = (f"lattice: stopping ({where}): a collective with the other ranks failed, most likely because "
                   f"another rank died or was killed; its own log holds the first error. ({text.splitlines()[0][:300]})")
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


_WATCHER: Optional[threading.Thread] = None


def watch_launcher(poll_seconds: float = 1.0) -> bool:
    """In a rank that a launcher started (Lightning's subprocess launcher for local ranks > 0, or torchrun),
    exit as soon as the launcher dies, instead of hanging in the next collective until its timeout.

    Lightning's launcher already kills every rank when a child rank dies; this covers the other direction
    (rank 0 / the agent killed). Returns whether a watcher runs in this process.
    """
    global _WATCHER
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("LOCAL_RANK", "0") or 0) > 0
    if not launched:
        return False
    if _WATCHER is not None and _WATCHER.is_alive():
        return True
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:
                rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "?"))
                sys.stderr.write(f"[rank {rank}] lattice: the launching process (pid {parent}) died; "
                                 "exiting this rank instead of waiting on its peers.\n")
                sys.stderr.flush()
                os._exit(1)

    _WATCHER = threading.Thread(target=watch, name="lattice-launcher-watch", daemon=True)
    _WATCHER.start()
    return True
