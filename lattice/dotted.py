"""Objects named by dotted paths (``package.module.Name``), as the YAML configs name their classes.

The one importer of such paths in lattice (configs, the online teacher, the student network, the CLI's
argument checks, the benchmarks). Imports nothing of lattice, so any layer may use it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

__all__ = ["import_dotted", "init_arguments"]


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


def init_arguments(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(...)`` accepts, following ``**kwargs`` up the base classes' ``__init__`` as
    jsonargparse does (a network's shared options live in :class:`~lattice.models.LatticeModel`'s signature).

    ``None`` when a ``**kwargs`` reaches a base that does not name what it takes (``object``, ``nn.Module``): any
    argument may then be valid.
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        if klass is object or (klass.__module__ == "torch.nn.modules.module" and klass.__name__ == "Module"):
            return None
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names
    return None
