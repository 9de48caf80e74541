"""What the data holds: features, tasks (labels) and domains.

A :class:`Schema` is the union over all domains. It is written as YAML (inside a data config or on its
own), read back with :meth:`Schema.from_yaml`, or inferred from a Parquet/CSV dataset with
:func:`lattice.data.infer.infer_schema`. Example::

    example_id_column: example_id
    domain_column: domain
    features:
      - {name: user, kind: sparse, num_embeddings: 100000, embedding_dim: 16}
      - {name: price, kind: dense}
      - {name: hist_items, kind: sequence, num_embeddings: 50000, shared_table: item,
         max_length: 64, timestamps_column: hist_ts}
    tasks:
      - {name: click, kind: binary}
      - name: conversion
        delay_column: conversion_delay
        windows:
          - {name: 90min, seconds: 5400, probability: 0.3}
          - {name: 1d, seconds: 86400, probability: 0.3}
          - {name: 7d, seconds: 604800, probability: 0.4}
    domains:
      - {name: feed}
      - {name: search, features: [user, price], tasks: [click]}

Column order: ``dense_features``, ``sparse_features`` and ``sequence_features`` keep the order of
``features``; the batch tensors (``Batch.dense [B, Fd]``, the KeyedJaggedTensor keys) follow it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

import numpy as np

from lattice.data.errors import SchemaError

__all__ = ["FeatureSpec", "WindowSpec", "TaskSpec", "DomainSpec", "Schema"]

FeatureKind = Literal["dense", "sparse", "sequence"]
TaskKind = Literal["binary", "regression"]

_ID_KINDS = ("sparse", "sequence")
_NAN_POLICIES = ("error", "missing")


def _as_name(value: Any) -> Any:
    """Column/feature names written as YAML numbers (``301``) are names, not numbers."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return value


def _check_name(name: Any, what: str) -> None:
    if not isinstance(name, str) or not name:
        raise SchemaError(f"{what} name must be a non-empty string, got {name!r}")


@dataclass
class FeatureSpec:
    """One input feature.

    Args:
        name: feature name (the key in ``Batch.sparse``/``Batch.sequences``, the column of ``Batch.dense``).
        kind: ``dense`` (one float per row; null = absent), ``sparse`` (a bag of ids: ``list<int>``, a
            scalar int, or a string column, hashed), ``sequence`` (``list<int>``, oldest first).
        num_embeddings: id range / hash size of a sparse or sequence feature: ids must lie in
            ``[0, num_embeddings)``.
        embedding_dim: embedding width (``None``: the model's default).
        shared_table: name of the embedding table to share (e.g. a history-of-items sequence sharing the
            item table); ``None``: the feature's own table, named after the feature.
        max_length: keep at most this many ids per row (sparse: the first ones; sequence: the most
            recent ones, i.e. the last ones, since sequences are stored oldest first).
        pooling: ``sum`` or ``mean`` for the bag embedding.
        oov: what an id outside ``[0, num_embeddings)`` does: ``error`` (a :class:`DataError` naming
            file, column, row group and row) or ``hash`` (mixed into range; in-range ids are kept).
        timestamps_column: for a sequence, a parallel ``list<int64>`` column of event timestamps.
        column: source column when it differs from ``name``.
        nan: what a NaN in a dense feature means: ``error`` (a :class:`DataError` naming file, column,
            row group and row) or ``missing`` (an absent value: ``dense_mask`` off, as a null);
            ``None``: the schema's ``dense_nan``. Infinities are always an error.
    """

    name: str
    kind: FeatureKind = "sparse"
    num_embeddings: Optional[int] = None
    embedding_dim: Optional[int] = None
    shared_table: Optional[str] = None
    max_length: Optional[int] = None
    pooling: Literal["sum", "mean"] = "sum"
    oov: Literal["error", "hash"] = "error"
    timestamps_column: Optional[str] = None
    column: Optional[str] = None
    nan: Optional[Literal["error", "missing"]] = None

    def __post_init__(self) -> None:
        self.name, self.column, self.shared_table, self.timestamps_column = (
            _as_name(x) for x in (self.name, self.column, self.shared_table, self.timestamps_column))
        _check_name(self.name, "feature")
        where = f"feature {self.name!r}"
        if self.kind not in ("dense", "sparse", "sequence"):
            raise SchemaError(f"{where}: kind must be dense, sparse or sequence, got {self.kind!r}")
        if self.pooling not in ("sum", "mean"):
            raise SchemaError(f"{where}: pooling must be sum or mean, got {self.pooling!r}")
        if self.oov not in ("error", "hash"):
            raise SchemaError(f"{where}: oov must be error or hash, got {self.oov!r}")
        if self.nan is not None:
            if self.nan not in _NAN_POLICIES:
                raise SchemaError(f"{where}: nan must be error or missing, got {self.nan!r}")
            if self.kind != "dense":
                raise SchemaError(f"{where}: nan is only for dense features (kind is {self.kind})")
        if self.kind == "dense":
            for attr in ("num_embeddings", "embedding_dim", "shared_table", "max_length", "timestamps_column"):
                if getattr(self, attr) is not None:
                    raise SchemaError(f"{where}: {attr} is only for sparse/sequence features (kind is dense)")
        else:
            if self.num_embeddings is None or int(self.num_embeddings) <= 0:
                raise SchemaError(
                    f"{where}: a {self.kind} feature needs num_embeddings > 0 (its id range / hash size), "
                    f"got {self.num_embeddings!r}"
                )
            self.num_embeddings = int(self.num_embeddings)
        if self.embedding_dim is not None and int(self.embedding_dim) <= 0:
            raise SchemaError(f"{where}: embedding_dim must be > 0, got {self.embedding_dim!r}")
        if self.max_length is not None and int(self.max_length) <= 0:
            raise SchemaError(f"{where}: max_length must be > 0, got {self.max_length!r}")
        if self.timestamps_column is not None and self.kind != "sequence":
            raise SchemaError(f"{where}: timestamps_column is only for sequence features")

    @property
    def source(self) -> str:
        """The data column this feature is read from."""
        return self.column or self.name

    @property
    def table(self) -> str:
        """The embedding table this feature looks up (its own name unless shared)."""
        return self.shared_table or self.name


@dataclass
class WindowSpec:
    """One Lattice Zipper attribution window: label = converted within ``seconds`` of the impression.
    ``probability`` is the share of impressions routed to this window."""

    name: str
    seconds: float
    probability: float

    def __post_init__(self) -> None:
        _check_name(self.name, "window")
        if not (float(self.seconds) > 0 and math.isfinite(float(self.seconds))):
            raise SchemaError(f"window {self.name!r}: seconds must be > 0, got {self.seconds!r}")
        if not (0.0 <= float(self.probability) <= 1.0):
            raise SchemaError(f"window {self.name!r}: probability must be in [0, 1], got {self.probability!r}")


@dataclass
class TaskSpec:
    """One prediction task (objective).

    Args:
        name: task name (``labels[:, t]``; heads and metrics use it).
        kind: ``binary`` (labels in {0, 1}) or ``regression``.
        weight: loss weight.
        windows: Lattice Zipper attribution windows, sorted by length (the last, longest one is the
            "oracle" window used for serving and evaluation); their probabilities sum to 1.
        column: label column when it differs from ``name``; null = no label for that row (masked).
        delay_column: for a windowed task, the seconds from impression to the positive event (null
            where the label is 0).
    """

    name: str
    kind: TaskKind = "binary"
    weight: float = 1.0
    windows: Optional[List[WindowSpec]] = None
    column: Optional[str] = None
    delay_column: Optional[str] = None

    def __post_init__(self) -> None:
        self.name, self.column, self.delay_column = (_as_name(x) for x in (self.name, self.column, self.delay_column))
        _check_name(self.name, "task")
        where = f"task {self.name!r}"
        if self.kind not in ("binary", "regression"):
            raise SchemaError(f"{where}: kind must be binary or regression, got {self.kind!r}")
        if not (math.isfinite(float(self.weight)) and float(self.weight) >= 0):
            raise SchemaError(f"{where}: weight must be finite and >= 0, got {self.weight!r}")
        if self.windows is not None:
            self.windows = [w if isinstance(w, WindowSpec) else WindowSpec(**dict(w)) for w in self.windows]
            if not self.windows:
                raise SchemaError(f"{where}: windows is empty; leave it out for a task without windows")
            if self.kind != "binary":
                raise SchemaError(f"{where}: attribution windows need a binary task")
            if self.delay_column is None:
                raise SchemaError(f"{where}: a task with windows needs delay_column (seconds to the event)")
            names = [w.name for w in self.windows]
            if len(set(names)) != len(names):
                raise SchemaError(f"{where}: duplicate window names {names}")
            secs = [float(w.seconds) for w in self.windows]
            if any(b <= a for a, b in zip(secs, secs[1:])):
                raise SchemaError(f"{where}: windows must be listed shortest first, got seconds {secs}")
            total = sum(float(w.probability) for w in self.windows)
            if abs(total - 1.0) > 1e-6:
                raise SchemaError(f"{where}: window probabilities must sum to 1, got {total}")
        elif self.delay_column is not None:
            raise SchemaError(f"{where}: delay_column given but no windows")

    @property
    def source(self) -> str:
        return self.column or self.name

    @property
    def num_windows(self) -> int:
        return len(self.windows) if self.windows else 0


@dataclass
class DomainSpec:
    """One domain (surface). ``features`` / ``tasks``: the ones this domain has (``None``: all);
    the others are absent there (masked), never faked as zero."""

    name: str
    features: Optional[List[str]] = None
    tasks: Optional[List[str]] = None

    def __post_init__(self) -> None:
        self.name = _as_name(self.name)
        _check_name(self.name, "domain")
        if self.features is not None:
            self.features = [_as_name(f) for f in self.features]
        if self.tasks is not None:
            self.tasks = [_as_name(t) for t in self.tasks]


def _from_mapping(cls, obj: Any, where: str):
    if isinstance(obj, cls):
        return obj
    if cls is DomainSpec and isinstance(_as_name(obj), str):
        return DomainSpec(_as_name(obj))
    if not isinstance(obj, Mapping):
        raise SchemaError(f"{where}: expected a mapping, got {obj!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise SchemaError(f"{where}: unknown key(s) {unknown}; known keys are {sorted(known)}")
    try:
        return cls(**dict(obj))
    except TypeError as err:
        raise SchemaError(f"{where}: {err}") from None


_SCHEMA_FIELDS = ("features", "tasks", "domains", "example_id_column", "domain_column", "user_id_column",
                  "item_id_column", "timestamp_column", "dense_nan")


class Schema:
    """The union schema of a (multi-domain) dataset.

    Args:
        features: every feature, in column order.
        tasks: every task, in label order (``labels[:, t]``).
        domains: every domain, in index order (``Batch.domain``); default one domain ``default``.
        example_id_column: unique int64 row id (the teacher-output join key); ``None``: derived from the
            file and row position.
        domain_column: string or int column naming the domain; ``None``: one domain, or each source
            names its domain.
        user_id_column / item_id_column: int or string ids (strings are hashed); ``None``: zeros.
        timestamp_column: int seconds; ``None``: zeros.
        dense_nan: what a NaN in a dense feature means where the feature sets no ``nan`` of its own:
            ``error`` or ``missing`` (see :class:`FeatureSpec`).

    Specs may be given as mappings. A plain class (not a dataclass) on purpose: jsonargparse then takes a
    ``schema: Schema`` parameter as one value (a YAML mapping, a YAML path, or a linked Schema object --
    the CLI links the data's schema into the model), see the ``register_type`` call below.
    """

    def __init__(
        self,
        features: Sequence[Union[FeatureSpec, Mapping[str, Any]]] = (),
        tasks: Sequence[Union[TaskSpec, Mapping[str, Any]]] = (),
        domains: Sequence[Union[DomainSpec, Mapping[str, Any], str]] = (),
        example_id_column: Optional[str] = "example_id",
        domain_column: Optional[str] = "domain",
        user_id_column: Optional[str] = "user_id",
        item_id_column: Optional[str] = "item_id",
        timestamp_column: Optional[str] = "timestamp",
        dense_nan: Literal["error", "missing"] = "error",
    ) -> None:
        self.example_id_column = _as_name(example_id_column)
        self.domain_column = _as_name(domain_column)
        self.user_id_column = _as_name(user_id_column)
        self.item_id_column = _as_name(item_id_column)
        self.timestamp_column = _as_name(timestamp_column)
        if dense_nan not in _NAN_POLICIES:
            raise SchemaError(f"schema: dense_nan must be error or missing, got {dense_nan!r}")
        self.dense_nan = dense_nan
        self.features: List[FeatureSpec] = [_from_mapping(FeatureSpec, f, f"features[{i}]")
                                            for i, f in enumerate(features or [])]
        self.tasks: List[TaskSpec] = [_from_mapping(TaskSpec, t, f"tasks[{i}]") for i, t in enumerate(tasks or [])]
        self.domains: List[DomainSpec] = [_from_mapping(DomainSpec, d, f"domains[{i}]")
                                          for i, d in enumerate(domains or [])]
        if not self.domains:
            self.domains = [DomainSpec("default")]
        self._validate()

    def replace(self, **changes: Any) -> "Schema":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - set(_SCHEMA_FIELDS))
        if unknown:
            raise SchemaError(f"schema: unknown field(s) {unknown}")
        values = {k: getattr(self, k) for k in _SCHEMA_FIELDS}
        values.update(changes)
        return Schema(**values)

    def restrict(self, features: Sequence[str]) -> "Schema":
        """A copy with only ``features`` (in this schema's order); each domain's explicit feature list is
        cut to them. Tasks, domains and the id columns are unchanged; a name not in the schema is an error."""
        keep = set(features)
        unknown = sorted(keep - set(self.feature_names))
        if unknown:
            raise SchemaError(f"kept feature(s) {unknown} are not in the schema (features: {self.feature_names})")
        domains = [d if d.features is None else dataclasses.replace(d, features=[f for f in d.features if f in keep])
                   for d in self.domains]
        return self.replace(features=[f for f in self.features if f.name in keep], domains=domains)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schema):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in _SCHEMA_FIELDS)

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return (f"Schema(features={self.feature_names}, tasks={self.task_names}, domains={self.domain_names}, "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in _SCHEMA_FIELDS[3:]) + ")")

    def nan_policy(self, feature: Union[str, FeatureSpec]) -> str:
        """``error`` or ``missing``: what a NaN in dense ``feature`` means (its own ``nan``, else
        the schema's ``dense_nan``)."""
        f = self.feature(feature) if isinstance(feature, str) else feature
        return f.nan or self.dense_nan

    # ---- validation ---------------------------------------------------------------------------
    def _validate(self) -> None:
        for what, names in (
            ("feature", [f.name for f in self.features]),
            ("task", [t.name for t in self.tasks]),
            ("domain", [d.name for d in self.domains]),
        ):
            seen = set()
            for n in names:
                if n in seen:
                    raise SchemaError(f"duplicate {what} name {n!r}")
                seen.add(n)
        if not self.tasks:
            raise SchemaError("a schema needs at least one task")
        feature_names = {f.name for f in self.features}
        task_names = {t.name for t in self.tasks}
        for d in self.domains:
            for f in d.features or []:
                if f not in feature_names:
                    raise SchemaError(f"domain {d.name!r} lists unknown feature {f!r}")
            for t in d.tasks or []:
                if t not in task_names:
                    raise SchemaError(f"domain {d.name!r} lists unknown task {t!r}")
        # source columns must be distinct: one column feeds one feature or label
        owners: Dict[str, str] = {}
        special = {
            "example_id_column": self.example_id_column,
            "domain_column": self.domain_column,
            "user_id_column": self.user_id_column,
            "item_id_column": self.item_id_column,
            "timestamp_column": self.timestamp_column,
        }
        for key, col in special.items():
            if col is not None:
                if col in owners:
                    raise SchemaError(f"column {col!r} is both {owners[col]} and {key}")
                owners[col] = key
        for f in self.features:
            if f.source in owners and owners[f.source] not in ("user_id_column", "item_id_column", "timestamp_column"):
                raise SchemaError(f"column {f.source!r} is both {owners[f.source]} and feature {f.name!r}")
            owners.setdefault(f.source, f"feature {f.name!r}")
        for t in self.tasks:
            if t.source in owners:
                raise SchemaError(f"column {t.source!r} is both {owners[t.source]} and the label of task {t.name!r}")
            owners[t.source] = f"task {t.name!r}"
        # features sharing a table must agree on its size
        tables: Dict[str, FeatureSpec] = {}
        for f in self.features:
            if f.kind == "dense":
                continue
            other = tables.get(f.table)
            if other is None:
                tables[f.table] = f
                continue
            if other.num_embeddings != f.num_embeddings:
                raise SchemaError(
                    f"features {other.name!r} and {f.name!r} share table {f.table!r} but have "
                    f"num_embeddings {other.num_embeddings} and {f.num_embeddings}"
                )
            if other.embedding_dim is not None and f.embedding_dim is not None and other.embedding_dim != f.embedding_dim:
                raise SchemaError(
                    f"features {other.name!r} and {f.name!r} share table {f.table!r} but have "
                    f"embedding_dim {other.embedding_dim} and {f.embedding_dim}"
                )
        for f in self.features:
            if f.shared_table is not None and f.shared_table in feature_names:
                owner = self.feature(f.shared_table)
                if owner.kind == "dense":
                    raise SchemaError(f"feature {f.name!r} shares the table of dense feature {owner.name!r}")

    # ---- views ----------------------------------------------------------------------------------
    def _of_kind(self, kind: str) -> List[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    @property
    def dense_features(self) -> List[FeatureSpec]:
        return self._of_kind("dense")

    @property
    def sparse_features(self) -> List[FeatureSpec]:
        return self._of_kind("sparse")

    @property
    def sequence_features(self) -> List[FeatureSpec]:
        return self._of_kind("sequence")

    @property
    def feature_names(self) -> List[str]:
        return [f.name for f in self.features]

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def domain_names(self) -> List[str]:
        return [d.name for d in self.domains]

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def feature(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in the schema (features: {self.feature_names})")

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in the schema (tasks: {self.task_names})")

    def domain_index(self, name: str) -> int:
        for i, d in enumerate(self.domains):
            if d.name == str(name):
                return i
        raise KeyError(f"no domain {name!r} in the schema (domains: {self.domain_names})")

    def feature_presence(self, kind: str) -> np.ndarray:
        """``[D, F_kind]`` bool: does domain d have feature f (features of ``kind``, in column order)."""
        feats = self._of_kind(kind)
        out = np.ones((len(self.domains), len(feats)), dtype=bool)
        for i, d in enumerate(self.domains):
            if d.features is not None:
                have = set(d.features)
                out[i] = [f.name in have for f in feats]
        return out

    def task_presence(self) -> np.ndarray:
        """``[D, T]`` bool: does domain d have task t (else its labels are masked there)."""
        out = np.ones((len(self.domains), len(self.tasks)), dtype=bool)
        for i, d in enumerate(self.domains):
            if d.tasks is not None:
                have = set(d.tasks)
                out[i] = [t.name in have for t in self.tasks]
        return out

    def domain_has_feature(self, domain: str, feature: str) -> bool:
        d = self.domains[self.domain_index(domain)]
        return d.features is None or feature in d.features

    def domain_has_task(self, domain: str, task: str) -> bool:
        d = self.domains[self.domain_index(domain)]
        return d.tasks is None or task in d.tasks

    # ---- (de)serialization ----------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """Plain mapping (for YAML/JSON); leaves out fields at their defaults."""

        def compact(obj) -> Dict[str, Any]:
            out: Dict[str, Any] = {}
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                default = f.default if f.default is not dataclasses.MISSING else None
                if f.name == "name" or value != default:
                    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                        value = [compact(v) for v in value]
                    out[f.name] = value
            return out

        out: Dict[str, Any] = {}
        for key in ("example_id_column", "domain_column", "user_id_column", "item_id_column", "timestamp_column"):
            out[key] = getattr(self, key)
        if self.dense_nan != "error":  # left out at its default: existing fingerprints stay
            out["dense_nan"] = self.dense_nan
        out["features"] = [compact(f) for f in self.features]
        out["tasks"] = [compact(t) for t in self.tasks]
        out["domains"] = [compact(d) for d in self.domains]
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Schema":
        """From a mapping as written by :meth:`to_dict` (unknown keys are an error naming them)."""
        if isinstance(obj, Schema):
            return obj
        if not isinstance(obj, Mapping):
            raise SchemaError(f"a schema must be a mapping, got {type(obj).__name__}")
        known = set(_SCHEMA_FIELDS)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise SchemaError(f"schema: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(obj))

    def to_yaml(self, path: Optional[Union[str, os.PathLike]] = None) -> str:
        """YAML text; also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_yaml(cls, source: Union[str, os.PathLike]) -> "Schema":
        """From a YAML file path or YAML text. The schema may be the whole document, or sit under a
        ``schema:`` key, or inside a data config (``init_args: {schema: ...}`` or ``data: ...``)."""
        import yaml

        text = str(source)
        if os.path.exists(text):
            with open(text) as fh:
                doc = yaml.safe_load(fh)
            where = text
        else:
            if "\n" not in text and text.endswith((".yaml", ".yml")):
                raise FileNotFoundError(f"schema file not found: {text}")
            doc = yaml.safe_load(text)
            where = "<yaml text>"
        found = _find_schema(doc)
        if found is None:
            raise SchemaError(f"{where}: no schema found (expected 'features' and 'tasks', or a 'schema:' key)")
        if isinstance(found, str):
            base = os.path.dirname(text) if os.path.exists(text) else ""
            return cls.from_yaml(os.path.join(base, found) if base and not os.path.isabs(found) else found)
        return cls.from_dict(found)

    @classmethod
    def coerce(cls, obj: Union["Schema", Mapping[str, Any], str, os.PathLike]) -> "Schema":
        """A Schema from a Schema, a mapping, a YAML path or YAML text."""
        if isinstance(obj, Schema):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        return cls.from_yaml(obj)

    def fingerprint(self) -> str:
        """Stable short hash of the schema (cache keys, resume checks)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def required_columns(self) -> List[str]:
        """Every column a source may be asked for (features, labels, ids, delays, timestamps)."""
        cols: List[str] = []
        for key in ("example_id_column", "domain_column", "user_id_column", "item_id_column", "timestamp_column"):
            c = getattr(self, key)
            if c is not None:
                cols.append(c)
        for f in self.features:
            cols.append(f.source)
            if f.timestamps_column:
                cols.append(f.timestamps_column)
        for t in self.tasks:
            cols.append(t.source)
            if t.delay_column:
                cols.append(t.delay_column)
        return list(dict.fromkeys(cols))


def _find_schema(doc: Any) -> Any:
    if not isinstance(doc, Mapping):
        return None
    if "features" in doc and "tasks" in doc:
        return doc
    for key in ("schema", "init_args", "data"):
        if key in doc:
            inner = doc[key]
            if key == "schema":
                return inner
            found = _find_schema(inner)
            if found is not None:
                return found
    return None


# What a model or command accepts for a schema: a Schema, a mapping, or a YAML path / YAML text.
SchemaLike = Union[Schema, str, Dict[str, Any]]


def _register_with_jsonargparse() -> None:
    """Let jsonargparse read a ``Schema``-typed argument from a YAML mapping or path (and pass a linked
    Schema object through as it is)."""
    try:
        from jsonargparse.typing import register_type
    except ImportError:  # pragma: no cover - jsonargparse is a dependency, but the data layer does not need it
        return
    try:
        register_type(Schema, serializer=Schema.to_dict, deserializer=Schema.coerce)
    except ValueError:  # already registered (module reloaded)
        pass


_register_with_jsonargparse()
