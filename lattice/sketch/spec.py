"""The sketch file: what to search (``space``), on which base configs (``base``), for what (``objective``) and
under which limits (``constraints``)::

    base: [../quickstart.yaml]          # lattice configs, stacked as by `lattice fit`; relative to this file
    objective: mean_auc                 # or ne, or {task_mix: {click: 1.0, conversion: 2.0}}
    space:
      model.optimizer.init_args.lr: {low: 1.0e-3, high: 3.0e-2, log: true}
      model.network.class_path: {choices: [lattice.models.LatticeNetwork, lattice.models.MMoE]}
    constraints: {flops_per_sample: 2.0e6, num_parameters: 5.0e6, latency_ms: {max: 20, batch_size: 256}}
    search: {n_trials: 10, budget: 10m, max_epochs: 2}   # defaults of the `lattice sketch` options of that name

``search`` takes ``n_trials``, ``budget``, ``n_jobs``, ``seed``, ``sampler``, ``n_startup_trials``, ``pruner``,
``max_epochs``, ``reports_per_epoch``, ``limit_train_batches``, ``limit_val_batches``; the command line overrides
them.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import yaml

from lattice.sketch.constraints import Constraints
from lattice.sketch.objective import Objective

__all__ = ["SEARCH_KEYS", "SketchSpec", "plain"]

_KEYS = {"base", "objective", "space", "constraints", "search"}
SEARCH_KEYS = ("n_trials", "budget", "n_jobs", "seed", "sampler", "n_startup_trials", "pruner", "max_epochs",
               "reports_per_epoch", "limit_train_batches", "limit_val_batches")


@dataclass
class SketchSpec:
    """A parsed sketch file; ``base`` holds absolute config paths."""

    space: dict
    base: list = field(default_factory=list)
    objective: Objective = field(default_factory=Objective)
    constraints: Constraints = field(default_factory=Constraints)
    search: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str, base: Optional[Sequence[str]] = None) -> "SketchSpec":
        """Reads the sketch file ``path``; ``base`` (the ``--config`` files) replaces the file's ``base``."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sketch file {path!r} does not exist")
        with open(path) as f:
            try:
                raw = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise ValueError(f"sketch file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"sketch file {path!r}: expected a mapping with space (and base, objective, constraints)")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ValueError(f"sketch file {path!r}: unknown keys {sorted(unknown)} (expected {sorted(_KEYS)})")
        if not isinstance(raw.get("space"), Mapping) or not raw["space"]:
            raise ValueError(f"sketch file {path!r}: 'space' must be a non-empty mapping of field -> distribution")
        if base:
            configs = [os.path.abspath(p) for p in base]
        else:
            listed = raw.get("base") or []
            listed = [listed] if isinstance(listed, str) else list(listed)
            here = os.path.dirname(os.path.abspath(path))
            configs = [os.path.normpath(os.path.join(here, p)) for p in listed]
        if not configs:
            raise ValueError(f"sketch file {path!r} names no base config: add 'base: [...]' or pass --config")
        for config in configs:
            if not os.path.isfile(config):
                raise FileNotFoundError(f"base config {config!r} (of sketch file {path!r}) does not exist")
        search = raw.get("search") or {}
        if not isinstance(search, Mapping) or set(search) - set(SEARCH_KEYS):
            bad = sorted(set(search) - set(SEARCH_KEYS)) if isinstance(search, Mapping) else search
            raise ValueError(f"sketch file {path!r}: search: unknown options {bad} (expected {list(SEARCH_KEYS)})")
        return cls(space=dict(raw["space"]), base=configs, objective=Objective.parse(raw.get("objective")),
                   constraints=Constraints.parse(raw.get("constraints")), search=dict(search))


def plain(obj: Any) -> Any:
    """``obj`` (a parsed config, as ``Namespace.as_dict()`` gives it) as plain YAML/JSON data: dataclasses become
    mappings, tuples lists, paths strings."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
