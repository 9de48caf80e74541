"""Objects named by dotted paths (``package.module.Name``), as the YAML configs name their classes.

The one importer of such paths in lattice (configs, the online teacher, the student network, the CLI's
argument checks, the benchmarks). Imports nothing of lattice, so any layer may use it.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_dotted"]


def import_dotted(path: str, what: str = "object") -> Any:
    """The object ``path`` names (``"lattice.models.LatticeNetwork"`` -> the class).

    Raises ValueError naming ``what`` and ``path`` when ``path`` is not a dotted path, its module cannot
    be imported, or the module has no such attribute.
    """
    module, _, name = path.rpartition(".") if isinstance(path, str) else ("", "", "")
    if not module or not name:
        raise ValueError(f"{what} must be a dotted path like 'lattice.models.LatticeNetwork', got {path!r}")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import {what} {path!r}: {err}") from None
