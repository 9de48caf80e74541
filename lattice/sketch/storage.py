"""Where a study lives: Optuna's RDB storage (an SQLite file by default) or journal storage with a file backend
when several processes write at once (SQLite locks under concurrent writers)."""
from __future__ import annotations

import os
from typing import Optional

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

__all__ = ["default_storage", "open_storage"]

# A killed worker's trial stops sending heartbeats; after the grace period the next worker marks it failed and
# enqueues its parameters again once, so a resumed search re-runs what was cut off.
HEARTBEAT_S = 10
GRACE_S = 30


def default_storage(out_dir: str, n_jobs: int) -> str:
    """``sqlite:///<out_dir>/study.db`` for one process, ``<out_dir>/study.journal`` for several."""
    if n_jobs > 1:
        return os.path.join(out_dir, "study.journal")
    return "sqlite:///" + os.path.abspath(os.path.join(out_dir, "study.db"))


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage for a database URL (``sqlite:///``, ``postgresql://``, ``mysql://``...), a journal storage
    for a ``.journal`` file path (or ``journal:<path>``)."""
    journal: Optional[str] = None
    if url.startswith("journal:"):
        journal = url[len("journal:"):]
    elif "://" not in url:
        if not url.endswith(".journal"):
            raise ValueError(f"--storage {url!r}: expected a database URL (sqlite:///path.db, postgresql://...) "
                             "or a journal file path ending in .journal")
        journal = url
    if journal is not None:
        os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
        return JournalStorage(JournalFileBackend(journal))
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
    return RDBStorage(
        url,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
