"""The search space of a sketch: distributions over dotted config fields, checked against a parsed base config.

A field is written as on the ``lattice fit`` command line, without the ``--``: ``model.optimizer.init_args.lr``,
``model.network.init_args.dim``, ``model.network.class_path``, ``data.batch_size``. ``init_args`` may be left out
(``model.network.dim``). A distribution is one of::

    {low: 1.0e-3, high: 3.0e-2, log: true}     # float (any bound written as a float)
    {low: 1, high: 4, step: 1}                  # int (both bounds ints)
    {choices: [16, 32, 64]}                     # categorical (also class paths)

A class path among choices (``model.network.class_path``) is sampled first; a field of that section is sampled
only when the chosen class accepts it (define-by-run), and the base config's arguments the chosen class does not
accept are dropped.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from lattice.dotted import import_dotted
from lattice.sketch._numbers import as_number

__all__ = ["Distribution", "SearchSpace", "accepted_parameters"]

# The sections a sketch may search (the scope: model fields, the batch size, the optimizer).
_SEARCHABLE = ("model.", "data.batch_size")


@dataclass(frozen=True)
class Distribution:
    """One field's distribution: ``kind`` is ``"float"``, ``"int"`` or ``"categorical"``."""

    name: str
    kind: str
    low: Any = None
    high: Any = None
    log: bool = False
    step: Any = None
    choices: tuple = ()

    @classmethod
    def parse(cls, name: str, spec: Any) -> "Distribution":
        """Reads ``{low, high[, log, step]}`` or ``{choices: [...]}``; raises ``ValueError`` naming ``name``."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"search space field {name!r}: expected a mapping {{low, high}} or {{choices}}, got {spec!r}")
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise ValueError(f"search space field {name!r}: unknown keys {sorted(unknown)} "
                             "(expected low, high, log, step or choices)")
        if "choices" in spec:
            choices = spec["choices"]
            if not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"search space field {name!r}: choices is empty (give at least one value)")
            if set(spec) - {"choices"}:
                raise ValueError(f"search space field {name!r}: choices cannot be combined with low/high/log/step")
            return cls(name, "categorical", choices=tuple(choices))
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"search space field {name!r}: a range needs both low and high")
        low = as_number(f"search space field {name!r} low", spec["low"])
        high = as_number(f"search space field {name!r} high", spec["high"])
        if low > high:
            raise ValueError(f"search space field {name!r}: empty range, low {low!r} > high {high!r}")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise ValueError(f"search space field {name!r}: a log range needs low > 0, got {low!r}")
        step = None if spec.get("step") is None else as_number(f"search space field {name!r} step", spec["step"])
        kind = "int" if isinstance(low, int) and isinstance(high, int) and not isinstance(step, float) else "float"
        if step is not None and (log or step <= 0):
            raise ValueError(f"search space field {name!r}: step must be > 0 and cannot be combined with log")
        return cls(name, kind, low=low, high=high, log=log, step=step)

    def suggest(self, trial) -> Any:
        """The value Optuna's ``trial`` samples for this field."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


def accepted_parameters(class_path: str) -> Optional[set[str]]:
    """The ``__init__`` parameter names of ``class_path``, following ``**kwargs`` up the base classes (as
    jsonargparse does); ``None`` when ``**kwargs`` reaches ``object`` or ``nn.Module`` (anything goes)."""
    try:
        cls = import_dotted(class_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"cannot import class {class_path!r}: {exc}") from None
    names: set[str] = set()
    for klass in inspect.getmro(cls) if inspect.isclass(cls) else [cls]:
        init = klass.__dict__.get("__init__") if inspect.isclass(klass) else klass
        if init is None:
            continue
        if klass in (object, torch.nn.Module):
            return None
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return names
    return None


def _is_class_spec(node: Any) -> bool:
    return isinstance(node, Mapping) and "class_path" in node


class SearchSpace:
    """Distributions over fields of a base config (the dict :func:`lattice.train.loading.parse_config` gives).

    Args:
        fields: ``{dotted field: distribution spec}`` as read from the sketch YAML's ``space``.
        base: the parsed base config as a plain dict; every field is checked against it (an unknown field, one
            outside ``model.*``/``data.batch_size``, or one no candidate class accepts is a ``ValueError``
            naming it).
    """

    def __init__(self, fields: Mapping[str, Any], base: Mapping[str, Any]) -> None:
        if not fields:
            raise ValueError("the sketch's space is empty: give at least one field to search")
        self.base = copy.deepcopy(dict(base))
        self.distributions = {}
        for name, spec in fields.items():
            if not isinstance(name, str) or not (name.startswith(_SEARCHABLE[0]) or name == _SEARCHABLE[1]):
                raise ValueError(f"search space field {name!r}: only model.* fields and data.batch_size can be searched")
            self.distributions[name] = Distribution.parse(name, spec)
        # class paths first: they decide which other fields apply (define-by-run)
        self.order = sorted(self.distributions, key=lambda n: (not n.endswith(".class_path"), n))
        for name in self.order:
            self._check(name)

    # ---- paths ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _keys(name: str) -> list[str]:
        return [k for k in name.split(".") if k != "init_args"]

    def _class_choices(self, section: str, node: Mapping) -> list[str]:
        """The class paths ``section`` (a dotted path to a class spec) can take in this space."""
        dist = self.distributions.get(f"{section}.class_path")
        return [str(c) for c in dist.choices] if dist is not None else [str(node["class_path"])]

    def _check(self, name: str) -> None:
        keys = self._keys(name)
        node: Any = self.base
        for i, key in enumerate(keys):
            section = ".".join(keys[:i])
            if _is_class_spec(node) and key != "class_path":
                choices = self._class_choices(section, node)
                init_args = node.get("init_args") or {}
                if i == len(keys) - 1:
                    accepted = [accepted_parameters(c) for c in choices]
                    if key in init_args or any(a is None or key in a for a in accepted):
                        return
                    raise ValueError(f"search space field {name!r}: unknown field {key!r}; "
                                     f"{' / '.join(choices)} takes no such argument")
                node = init_args
            if not isinstance(node, Mapping) or key not in node:
                raise ValueError(f"search space field {name!r}: unknown field {key!r} in the base config"
                                 + (f" section {section!r}" if section else ""))
            if key == "class_path":
                if i != len(keys) - 1 or not _is_class_spec(node):
                    raise ValueError(f"search space field {name!r}: class_path must end a class section")
                for choice in self.distributions[name].choices:
                    accepted_parameters(str(choice))  # importable
                return
            node = node[key]

    # ---- sampling ------------------------------------------------------------------------------------------------
    def sample(self, trial) -> dict[str, Any]:
        """``{field: value}`` for ``trial``: class paths first, then the fields the chosen classes accept."""
        values: dict[str, Any] = {}
        for name in self.order:
            if self._applies(name, values):
                values[name] = self.distributions[name].suggest(trial)
        return values

    def _applies(self, name: str, chosen: Mapping[str, Any]) -> bool:
        """Whether ``name`` is an argument of the class its section has under ``chosen`` (always, outside classes)."""
        keys = self._keys(name)
        node: Any = self.base
        for i, key in enumerate(keys[:-1]):
            node = (node.get("init_args") or {}) if _is_class_spec(node) else node
            node = node.get(key) if isinstance(node, Mapping) else None
            if node is None:
                return True
        if not _is_class_spec(node) or keys[-1] == "class_path":
            return True
        section = ".".join(keys[:-1])
        class_path = chosen.get(f"{section}.class_path", node["class_path"])
        accepted = accepted_parameters(str(class_path))
        return accepted is None or keys[-1] in accepted

    def apply(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of the base config with ``values`` set; a switched class keeps only the arguments it accepts."""
        config = copy.deepcopy(self.base)
        for name in sorted(values, key=lambda n: (not n.endswith(".class_path"), n)):
            keys = self._keys(name)
            node = config
            for key in keys[:-1]:
                node = node["init_args"] if _is_class_spec(node) else node
                node = node[key]
            last = keys[-1]
            if last == "class_path":
                if node["class_path"] != values[name]:
                    accepted = accepted_parameters(str(values[name]))
                    kept = {k: v for k, v in (node.get("init_args") or {}).items() if accepted is None or k in accepted}
                    node["class_path"], node["init_args"] = values[name], kept
                continue
            target = node.setdefault("init_args", {}) if _is_class_spec(node) else node
            target[last] = values[name]
        return config
