"""Infer a :class:`Schema` from Parquet/CSV datasets.

Files written by lattice (the synthetic world, ``lattice data consolidate``) carry their schema in the
Parquet key-value metadata and are read back exactly. Other data is inferred column by column:
``list<int|string>`` -> sparse (sequence when a parallel ``<name>_ts``/``<name>_timestamps`` list column
exists), int/string scalars -> sparse, floats -> dense; label columns are the named ``tasks`` (binary when
every value is 0/1); ``p_<task>`` columns are truth, never features. Id ranges come from the data
(one pass over the id columns), hashed with ``oov: hash`` for strings and huge ranges.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lattice.data.builder import TRUTH_PREFIX, is_int, is_listlike, is_stringlike
from lattice.data.errors import DataError
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec
from lattice.data.sources import ChunkReader, FileInfo, as_sources, discover

__all__ = ["infer_schema", "embedded_schema"]

SCHEMA_METADATA_KEY = b"lattice.schema"
_RESERVED = ("example_id", "domain", "user_id", "item_id", "timestamp")


def embedded_schema(info: FileInfo) -> Optional[Schema]:
    """The schema lattice wrote into a Parquet file's metadata, if any."""
    meta = info.arrow_schema.metadata or {}
    text = meta.get(SCHEMA_METADATA_KEY)
    if text is None:
        return None
    return Schema.from_yaml(text.decode())


def _unwrap(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def infer_schema(
    sources,
    tasks: Optional[Sequence[str]] = None,
    *,
    regression_tasks: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_hash_size: int = 1 << 20,
    string_hash_size: int = 100_003,
) -> Schema:
    """A schema for ``sources`` (paths or :class:`DataSource` s).

    Args:
        tasks: label columns. ``None``: the schema embedded by lattice, else columns named like common
            labels (click, conversion, label, like, finish, purchase, rating, is_click).
        regression_tasks: labels to treat as regression.
        exclude: columns to ignore.
        max_hash_size: integer ids whose max exceeds this get ``num_embeddings = max_hash_size`` and
            ``oov: hash``.
        string_hash_size: ``num_embeddings`` of string-valued features (always hashed).
    """
    srcs = as_sources(sources)
    files = discover(srcs)
    if tasks is None:
        embedded = [embedded_schema(f) for f in files]
        if embedded and all(e is not None for e in embedded):
            first = embedded[0]
            if all(e.to_dict() == first.to_dict() for e in embedded):
                return first
    columns: Dict[str, pa.DataType] = {}
    per_source: Dict[int, set] = {}
    for info in files:
        for field in info.arrow_schema:
            columns.setdefault(field.name, field.type)
        per_source.setdefault(info.source_index, set()).update(info.arrow_schema.names)
    common = ("click", "conversion", "label", "like", "finish", "purchase", "rating", "is_click")
    if tasks is None:
        tasks = [c for c in common if c in columns]
        if not tasks:
            raise DataError(f"cannot infer the label columns; name them with tasks=[...] (columns: {sorted(columns)})")
    missing = [t for t in tasks if t not in columns]
    if missing:
        raise DataError(f"label column(s) {missing} not found (columns: {sorted(columns)})")
    reader = ChunkReader()
    stats = _scan(files, reader, columns)

    special = {k: (k if k in columns else None) for k in _RESERVED}
    skip = set(exclude) | set(tasks) | {c for c in special.values() if c} | {
        c for c in columns if c.startswith(TRUTH_PREFIX) and c[len(TRUTH_PREFIX):] in tasks}
    ts_cols = {c for c in columns if c.endswith(("_ts", "_timestamps"))}
    features: List[FeatureSpec] = []
    for name, t in columns.items():
        if name in skip or name in ts_cols:
            continue
        t = _unwrap(t)
        st = stats.get(name, {})
        if is_listlike(t) or pa.types.is_list_view(t):
            vt = _unwrap(t.value_type)
            ts_col = next((c for c in (name + "_ts", name + "_timestamps") if c in columns), None)
            kind = "sequence" if ts_col else "sparse"
            features.append(_id_feature(name, kind, vt, st, max_hash_size, string_hash_size, ts_col))
        elif is_int(t) or is_stringlike(t):
            features.append(_id_feature(name, "sparse", t, st, max_hash_size, string_hash_size, None))
        elif pa.types.is_floating(t) or pa.types.is_boolean(t):
            features.append(FeatureSpec(name, "dense"))
    task_specs = []
    for name in tasks:
        st = stats.get(name, {})
        binary = name not in regression_tasks and st.get("binary", False)
        task_specs.append(TaskSpec(name, "binary" if binary else "regression"))
    # domains
    domain_col = special["domain"]
    names = set()
    fixed = [s.domain for s in srcs if s.domain is not None]
    names.update(fixed)
    if domain_col is not None:
        names.update(stats.get(domain_col, {}).get("values", []))
    domain_names = sorted(names, key=lambda x: (len(x), x)) or ["default"]
    feature_names = [f.name for f in features]
    domains = []
    for d in domain_names:
        srcs_d = [i for i, s in enumerate(srcs) if s.domain == d]
        if srcs_d:
            have = set().union(*(per_source.get(i, set()) for i in srcs_d))
            feats = [f for f in features if f.source in have]
            tks = [t for t in task_specs if t.source in have]
            domains.append(DomainSpec(d, None if len(feats) == len(features) else [f.name for f in feats],
                                      None if len(tks) == len(task_specs) else [t.name for t in tks]))
        else:
            domains.append(DomainSpec(d))
    return Schema(features, task_specs, domains,
                  example_id_column=special["example_id"], domain_column=domain_col,
                  user_id_column=special["user_id"], item_id_column=special["item_id"],
                  timestamp_column=special["timestamp"])


def _id_feature(name, kind, t, st, max_hash_size, string_hash_size, ts_col) -> FeatureSpec:
    if is_stringlike(t):
        return FeatureSpec(name, kind, num_embeddings=string_hash_size, oov="hash", timestamps_column=ts_col)
    hi = int(st.get("max", 0))
    lo = int(st.get("min", 0))
    if hi + 1 > max_hash_size or lo < 0:
        return FeatureSpec(name, kind, num_embeddings=max_hash_size, oov="hash", timestamps_column=ts_col)
    return FeatureSpec(name, kind, num_embeddings=max(hi + 1, 1), timestamps_column=ts_col)


def _scan(files: List[FileInfo], reader: ChunkReader, columns: Dict[str, pa.DataType]) -> Dict[str, dict]:
    """min/max of integer (list) columns, 0/1-ness of numeric columns, distinct domain values."""
    stats: Dict[str, dict] = {}
    for info in files:
        for chunk in range(len(info.chunk_rows)):
            table = reader.read(info, chunk, info.columns)
            for name in table.column_names:
                arr = table.column(name)
                t = _unwrap(arr.type)
                st = stats.setdefault(name, {})
                if pa.types.is_dictionary(arr.type):
                    arr = arr.cast(t)
                if is_listlike(t):
                    arr = pc.list_flatten(arr)
                    t = _unwrap(arr.type)
                    if pa.types.is_dictionary(arr.type):
                        arr = arr.cast(t)
                if is_int(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                    num = arr.cast(pa.float64()) if not pa.types.is_floating(t) else arr
                    mm = pc.min_max(num)
                    if mm["min"].is_valid:
                        st["min"] = min(st.get("min", np.inf), mm["min"].as_py())
                        st["max"] = max(st.get("max", -np.inf), mm["max"].as_py())
                    nonbin = pc.sum(pc.and_(pc.not_equal(num, 0.0), pc.not_equal(num, 1.0))).as_py() or 0
                    st["binary"] = st.get("binary", True) and nonbin == 0
                if name == "domain":
                    vals = pc.unique(arr.cast(pa.string())).to_pylist()  # distinct domains: a handful
                    st.setdefault("values", set()).update(v for v in vals if v is not None)
    return stats
