"""Where lattice keeps generated data: ``$LATTICE_CACHE`` or ``~/.cache/lattice``."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator, Optional

__all__ = ["cache_root", "world_dir", "ensure_world"]


def cache_root(cache_dir: Optional[str] = None) -> str:
    """The cache folder: ``cache_dir``, else ``$LATTICE_CACHE``, else ``~/.cache/lattice``."""
    root = cache_dir or os.environ.get("LATTICE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lattice")
    return os.path.abspath(root)


def world_dir(config, cache_dir: Optional[str] = None) -> str:
    """The folder of a synthetic world: ``<cache>/synthetic/<config fingerprint>``."""
    return os.path.join(cache_root(cache_dir), "synthetic", config.fingerprint())


@contextmanager
def _locked(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_world(config, cache_dir: Optional[str] = None) -> str:
    """Generate the synthetic world of ``config`` into the cache unless it is there; returns its folder.
    Safe to call from several processes at once (a file lock serializes generation)."""
    from lattice.data.synthetic import SyntheticWorld

    out = world_dir(config, cache_dir)
    if os.path.exists(os.path.join(out, "world.json")):
        return out
    with _locked(out + ".lock"):
        if not os.path.exists(os.path.join(out, "world.json")):
            SyntheticWorld(config).write(out, overwrite=True)
    return out
