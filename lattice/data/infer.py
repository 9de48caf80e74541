"""Infer a :class:`Schema` from Parquet/CSV datasets, with the reason for every decision.

Files written by lattice (the synthetic world, ``lattice data consolidate``) carry their schema in the
Parquet key-value metadata and are read back exactly (when no ``tasks`` are named). Other data is
inferred column by column, in one pass over the data:

- ``example_id``, ``domain``, ``user_id``, ``item_id``, ``timestamp``: the schema's id columns;
  ``user_id`` and ``item_id`` are also sparse features (``id_features=False``: only id columns).
- the named ``tasks`` are labels (binary when every value is 0/1); ``p_<task>`` (planted truth) and
  ``<task>_delay`` (known only once the label is) are never features.
- ``list<int>`` whose name or id range matches a scalar integer id column (``hist_items`` <->
  ``item_id``, ``hist_clusters`` <-> ``item_cluster``): a sequence sharing that column's embedding
  table, ``max_length`` from the lengths' ``length_quantile``; a parallel timestamp list
  (``<name>_ts``, or ``hist_ts`` beside ``hist_items``) becomes its ``timestamps_column``. Other
  lists: a pooled bag (mean pooling when lengths vary; a sequence of its own when it has a timestamp list).
- integer/string scalars: sparse (strings and huge ranges hashed with ``oov: hash``); floats and
  booleans: dense (``nan: missing`` when the column holds NaN).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lattice.data.arrow import is_int, is_list_or_view, is_listlike, is_stringlike
from lattice.data.builder import TRUTH_PREFIX
from lattice.data.errors import DataError
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec
from lattice.data.sources import ChunkReader, FileInfo, as_sources, discover

__all__ = ["infer_schema", "infer_with_reasons", "Inference", "embedded_schema"]

SCHEMA_METADATA_KEY = b"lattice.schema"
_RESERVED = ("example_id", "domain", "user_id", "item_id", "timestamp")
_ID_FEATURES = ("user_id", "item_id")
_COMMON_LABELS = ("click", "conversion", "label", "like", "finish", "purchase", "rating", "is_click")
_TS_SUFFIXES = ("_ts", "_timestamps")
_DELAY_SUFFIXES = ("_delay", "_delay_s", "_delay_seconds")
# a list's largest id over an id column's largest id (+1 both): within this band the list "spans" the
# column's id range (a history of items covers most items; item tags or clusters do not)
_RANGE_BAND = (0.8, 1.25)
_NAME_BAND = (0.5, 2.0)  # looser when the names already agree


def embedded_schema(info: FileInfo) -> Optional[Schema]:
    """The schema lattice wrote into a Parquet file's metadata, if any."""
    meta = info.arrow_schema.metadata or {}
    text = meta.get(SCHEMA_METADATA_KEY)
    if text is None:
        return None
    return Schema.from_yaml(text.decode())


@dataclass
class Inference:
    """An inferred schema and why: ``reasons[column]`` says what each data column became and why
    (every column of the data has one); ``embedded`` is True when the files carried lattice's schema."""

    schema: Schema
    reasons: Dict[str, str] = field(default_factory=dict)
    embedded: bool = False

    def to_yaml(self) -> str:
        """The schema as YAML with a comment per decision, ready to edit into a data config
        (:meth:`Schema.from_yaml` reads it back)."""
        return _commented_yaml(self)


def infer_schema(sources, tasks: Optional[Sequence[str]] = None, **options: Any) -> Schema:
    """A schema for ``sources`` (paths or :class:`DataSource` s); see :func:`infer_with_reasons`."""
    return infer_with_reasons(sources, tasks, **options).schema


def infer_with_reasons(
    sources,
    tasks: Optional[Sequence[str]] = None,
    *,
    regression_tasks: Sequence[str] = (),
    exclude: Sequence[str] = (),
    id_features: bool = True,
    length_quantile: float = 0.99,
    max_hash_size: int = 1 << 20,
    string_hash_size: int = 100_003,
) -> Inference:
    """Infer the schema of ``sources`` and the reason for each column's role.

    Args:
        tasks: label columns. ``None``: the schema embedded by lattice, else columns named like common
            labels (click, conversion, label, like, finish, purchase, rating, is_click).
        regression_tasks: labels to treat as regression.
        exclude: columns to ignore.
        id_features: make ``user_id`` and ``item_id`` sparse features too (not only id columns).
        length_quantile: a sequence's ``max_length`` is this quantile of its rows' lengths.
        max_hash_size: integer ids whose max exceeds this get ``num_embeddings = max_hash_size`` and
            ``oov: hash``.
        string_hash_size: ``num_embeddings`` of string-valued features (always hashed).
    """
    if not 0.0 < float(length_quantile) <= 1.0:
        raise ValueError(f"length_quantile must be in (0, 1], got {length_quantile!r}")
    srcs = as_sources(sources)
    files = discover(srcs)
    if tasks is None:
        embedded = [embedded_schema(f) for f in files]
        if embedded and all(e is not None for e in embedded):
            first = embedded[0]
            if all(e.to_dict() == first.to_dict() for e in embedded):
                reasons = {c: "as in the schema lattice embedded in the files" for c in _all_columns(files)}
                return Inference(first, reasons, embedded=True)
    columns = _all_columns(files)
    if tasks is None:
        tasks = [c for c in _COMMON_LABELS if c in columns]
        if not tasks:
            raise DataError(f"cannot infer the label columns; name them with tasks=[...] (columns: {sorted(columns)})")
    tasks = list(tasks)
    missing = [t for t in list(tasks) + list(regression_tasks) if t not in columns]
    if missing:
        raise DataError(f"label column(s) {missing} not found (columns: {sorted(columns)})")
    unknown = [t for t in regression_tasks if t not in tasks]
    if unknown:
        raise ValueError(f"regression_tasks {unknown} are not among the tasks {tasks}")
    ts_pairs = _timestamp_pairs(columns)
    stats = _scan(files, ChunkReader(), ts_pairs)
    return _Inferrer(srcs, files, columns, stats, ts_pairs, tasks, regression_tasks, exclude, id_features,
                     float(length_quantile), max_hash_size, string_hash_size).run()


def _all_columns(files: List[FileInfo]) -> Dict[str, pa.DataType]:
    columns: Dict[str, pa.DataType] = {}
    for info in files:
        for f in info.arrow_schema:
            columns.setdefault(f.name, f.type)
    return columns


def _unwrap(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _timestamp_pairs(columns: Dict[str, pa.DataType]) -> Dict[str, str]:
    """``{list column: timestamp list column}`` by name: ``<name>_ts`` / ``<name>_timestamps``, or the
    name's prefix (``hist_ts`` beside ``hist_items``). Checked against the data's lengths in the scan."""
    lists = [c for c, t in columns.items() if is_list_or_view(_unwrap(t)) and not c.endswith(_TS_SUFFIXES)]
    pairs = {}
    for name in lists:
        prefix = name.rsplit("_", 1)[0] if "_" in name else None
        candidates = [name + s for s in _TS_SUFFIXES] + ([prefix + s for s in _TS_SUFFIXES] if prefix else [])
        found = next((c for c in candidates if c in columns and is_list_or_view(_unwrap(columns[c]))), None)
        if found is not None:
            pairs[name] = found
    return pairs


def _tokens(name: str) -> List[str]:
    """Lower-case words of a column name, plural ``s`` dropped: ``hist_items`` -> [hist, item]."""
    out = []
    for w in re.split(r"[^0-9a-zA-Z]+", name.lower()):
        if not w:
            continue
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and not w.endswith("ss") and len(w) > 3:
            w = w[:-1]
        out.append(w)
    return out


def _stem(name: str) -> List[str]:
    """The entity an id column names: ``item_id`` -> [item], ``item_cluster`` -> [item, cluster]."""
    toks = _tokens(name)
    return toks[:-1] if len(toks) > 1 and toks[-1] in ("id", "ids") else toks


class _Inferrer:
    """One inference: the column-by-column decisions, kept apart from the public function's checks."""

    def __init__(self, srcs, files, columns, stats, ts_pairs, tasks, regression_tasks, exclude, id_features,
                 length_quantile, max_hash_size, string_hash_size):
        self.srcs, self.files, self.columns, self.stats = srcs, files, columns, stats
        self.ts_pairs = {k: v for k, v in ts_pairs.items() if stats.get(k, {}).get("ts_ok", {}).get(v, False)}
        self.tasks, self.regression_tasks, self.exclude = tasks, set(regression_tasks), set(exclude)
        self.id_features, self.q = id_features, length_quantile
        self.max_hash_size, self.string_hash_size = max_hash_size, string_hash_size
        self.reasons: Dict[str, str] = {}

    # ---- helpers --------------------------------------------------------------------------------
    def _type(self, name: str) -> pa.DataType:
        return _unwrap(self.columns[name])

    def _range(self, name: str) -> Optional[Tuple[int, int]]:
        st = self.stats.get(name, {})
        return (int(st["min"]), int(st["max"])) if "min" in st else None

    def _rows(self, name: str, what: str = "null") -> str:
        st = self.stats.get(name, {})
        rows, nulls = st.get("rows", 0), st.get("nulls", 0)
        return f", {nulls / rows:.1%} {what}" if rows and nulls else ""

    def _id_spec(self, name: str, kind: str, ts_col: Optional[str] = None, *, what: str
                 ) -> Tuple[FeatureSpec, str]:
        """A sparse/sequence spec for integer or string ids, and the reason for its size."""
        t = self._type(name)
        if is_list_or_view(t):
            t = _unwrap(t.value_type)
        if is_stringlike(t):
            return (FeatureSpec(name, kind, num_embeddings=self.string_hash_size, oov="hash", timestamps_column=ts_col),
                    f"{what} strings, hashed into {self.string_hash_size:,} rows (oov: hash)")
        rng = self._range(name)
        if rng is None:
            return FeatureSpec(name, kind, num_embeddings=1, timestamps_column=ts_col), f"{what}, no ids in the data"
        lo, hi = rng
        if hi + 1 > self.max_hash_size or lo < 0:
            why = f"ids in [{lo:,}, {hi:,}] exceed max_hash_size {self.max_hash_size:,}" if lo >= 0 else \
                f"negative ids (min {lo:,})"
            return (FeatureSpec(name, kind, num_embeddings=self.max_hash_size, oov="hash", timestamps_column=ts_col),
                    f"{what}, {why}: hashed (oov: hash)")
        return (FeatureSpec(name, kind, num_embeddings=hi + 1, timestamps_column=ts_col),
                f"{what}, ids in [{lo:,}, {hi:,}]: num_embeddings {hi + 1:,}")

    def _max_length(self, name: str) -> Tuple[int, str]:
        hist = self.stats.get(name, {}).get("lengths")
        if hist is None or hist.sum() == 0:
            return 1, "no rows"
        cdf = np.cumsum(hist) / hist.sum()
        qs = {p: int(np.searchsorted(cdf, p - 1e-12)) for p in (0.5, 0.9, self.q)}
        longest = int(np.flatnonzero(hist)[-1])
        max_len = max(1, qs[self.q])
        pct = f"{self.q * 100:g}"
        return max_len, (f"lengths p50 {qs[0.5]}, p90 {qs[0.9]}, p{pct} {qs[self.q]}, max {longest}: "
                         f"max_length {max_len} (p{pct}; longer rows keep their most recent {max_len})")

    # ---- the decisions -------------------------------------------------------------------------
    def run(self) -> Inference:
        cols = self.columns
        special = {k: (k if k in cols else None) for k in _RESERVED}
        self._explain_specials(special)
        for t in self.tasks:
            for c in [TRUTH_PREFIX + t] + [t + s for s in _DELAY_SUFFIXES]:
                if c in cols and c not in self.tasks:
                    self.reasons[c] = (f"planted truth of task {t!r}: never a feature" if c.startswith(TRUTH_PREFIX)
                                       else f"delay of task {t!r}: known only with the label, never a feature "
                                            f"(use it as the task's delay_column with attribution windows)")
        for c in self.exclude:
            if c in cols:
                self.reasons[c] = f"{self.reasons[c]}; excluded: not a feature" if c in self.reasons else "excluded"
        features_from = set(_ID_FEATURES) if self.id_features else set()
        taken = {c for c in self.reasons if c not in features_from} | set(self.exclude) | set(self.tasks)
        # scalar features first: lists may share their tables
        feats: Dict[str, FeatureSpec] = {}
        for name in cols:
            t = self._type(name)
            if name in taken or is_list_or_view(t):
                continue
            if name.endswith(_TS_SUFFIXES):
                self.reasons[name] = "timestamps (name ends in _ts/_timestamps): not a feature"
                continue
            if is_int(t) or is_stringlike(t):
                spec, why = self._id_spec(name, "sparse", what="scalar")
                feats[name] = spec
                prefix = self.reasons.get(name)
                self.reasons[name] = (f"{prefix}; also the sparse feature {name!r} ({why})" if prefix
                                      else f"sparse: {why}{self._rows(name)}")
            elif pa.types.is_floating(t) or pa.types.is_boolean(t):
                nans = self.stats.get(name, {}).get("nans", 0)
                spec = FeatureSpec(name, "dense", nan="missing" if nans else None)
                feats[name] = spec
                why = f"dense: {t}{self._rows(name)}"
                if nans:
                    why += f"; NaN in {nans:,} rows: nan: missing (read as absent)"
                self.reasons[name] = why
            else:
                self.reasons[name] = f"type {t} is not a feature type: not used"
        self._lists(feats, taken)
        features = [feats[c] for c in cols if c in feats]
        task_specs = [self._task(t) for t in self.tasks]
        domains = self._domains(features, task_specs, special["domain"])
        schema = Schema(features, task_specs, domains,
                        example_id_column=special["example_id"], domain_column=special["domain"],
                        user_id_column=special["user_id"], item_id_column=special["item_id"],
                        timestamp_column=special["timestamp"])
        for c in cols:
            self.reasons.setdefault(c, "not used")
        return Inference(schema, {c: self.reasons[c] for c in cols})

    def _explain_specials(self, special: Dict[str, Optional[str]]) -> None:
        what = {"example_id": "the unique row id (teacher-output join key)", "timestamp": "event time (not a feature)"}
        for key, col in special.items():
            if col is None:
                continue
            if key in _ID_FEATURES:
                self.reasons[col] = f"{key}_column"
                if not self.id_features:
                    self.reasons[col] += " (id_features off: not a feature)"
            elif key == "domain":
                values = sorted(self.stats.get(col, {}).get("values", ()))
                more = " ..." if len(values) > 8 else ""
                self.reasons[col] = f"{len(values)} domain(s): {', '.join(values[:8])}{more}"
            else:
                self.reasons[col] = what[key]

    def _lists(self, feats: Dict[str, FeatureSpec], taken: set) -> None:
        """Decide every list column: a sequence on a matched id column's table, or a bag."""
        ts_used = set(self.ts_pairs.values())
        for name in self.columns:
            if name in taken or name in ts_used or not is_list_or_view(self._type(name)):
                continue
            if name.endswith(_TS_SUFFIXES):
                self.reasons[name] = ("timestamps (name ends in _ts/_timestamps) of no list of the same lengths: "
                                      "not used")
                continue
            vt = _unwrap(self._type(name).value_type)
            if not (is_int(vt) or is_stringlike(vt)):
                self.reasons[name] = f"list of {vt}: not an id list, not used"
                continue
            ts_col = self.ts_pairs.get(name)
            nulls = self._rows(name, "null lists")
            hist = self.stats.get(name, {}).get("lengths", np.zeros(1))
            if len(hist) <= 2:  # at most one id per row: nothing to attend over
                owner, how = None, "at most one id per row"
            else:
                owner, how = self._match(name, feats) if is_int(vt) else (None, "string ids")
            if owner is not None:
                users = [spec for spec in feats.values() if spec.kind != "dense" and spec.table == owner]
                size = max([self._range(owner)[1] + 1, self._range(name)[1] + 1] + [u.num_embeddings for u in users])
                for spec in users:  # the table grows to hold every user's ids
                    spec.num_embeddings = size
                max_len, len_why = self._max_length(name)
                feats[name] = FeatureSpec(name, "sequence", num_embeddings=size, shared_table=owner,
                                          max_length=max_len, timestamps_column=ts_col)
                ts_why = f", timestamps {ts_col!r}" if ts_col else ""
                self.reasons[name] = (f"sequence on the table of {owner!r}: {how}; {len_why}{ts_why}{nulls}")
                continue
            if ts_col is not None:
                spec, why = self._id_spec(name, "sequence", ts_col, what="list")
                spec.max_length, len_why = self._max_length(name)
                feats[name] = spec
                self.reasons[name] = (f"sequence of its own table (timestamps {ts_col!r}; {how}): {why}; "
                                      f"{len_why}{nulls}")
                continue
            spec, why = self._id_spec(name, "sparse", what="list")
            lengths = np.flatnonzero(hist)
            pooled = f"lengths {lengths[0]}-{lengths[-1]}" if len(lengths) else "no rows"
            if len(lengths) > 1:  # lengths vary: a mean keeps the bag's scale apart from its length
                spec.pooling = "mean"
                pooled += ", mean pooling"
            feats[name] = spec
            self.reasons[name] = f"sparse bag ({pooled}; {how}): {why}{nulls}"
        for seq, ts in self.ts_pairs.items():
            if seq in feats and feats[seq].timestamps_column == ts:
                users = [f for f, spec in feats.items() if spec.timestamps_column == ts]
                self.reasons[ts] = f"timestamps of {', '.join(repr(u) for u in users)} (same lengths in every row)"

    def _match(self, name: str, feats: Dict[str, FeatureSpec]) -> Tuple[Optional[str], str]:
        """The scalar integer feature whose table the id list ``name`` shares, and why (or None, why not)."""
        rng = self._range(name)
        if rng is None or rng[0] < 0:
            return None, "no ids or negative ids"
        top = rng[1] + 1
        owners = [c for c, s in feats.items() if s.kind == "sparse" and s.oov == "error" and is_int(self._type(c))
                  and not is_list_or_view(self._type(c)) and self._range(c) is not None]
        # without id features the id columns still name tables (a sequence's own, sized by their ranges)
        owners += [c for c in _ID_FEATURES if c not in owners and c in self.columns and is_int(self._type(c))
                   and self._range(c) is not None and self._range(c)[0] >= 0]
        toks = set(_tokens(name))
        order = list(self.columns)
        named = []
        for c in owners:
            stem = _stem(c)
            if stem and stem[-1] in toks:
                # more words in common first, then the id columns, then the table present in more rows
                st = self.stats.get(c, {})
                named.append((-sum(w in toks for w in stem), c not in _ID_FEATURES,
                              -(st.get("rows", 0) - st.get("nulls", 0)), order.index(c), c))
        notes = []
        fits = [key for key in sorted(named)
                if _NAME_BAND[0] <= top / (self._range(key[-1])[1] + 1) <= _NAME_BAND[1]]
        for key in sorted(named):
            if key not in fits:
                c = key[-1]
                notes.append(f"name matches {c!r} but max id {rng[1]:,} vs its {self._range(c)[1]:,}")
        if fits:
            c = fits[0][-1]
            why = f"name matches {c!r} and its ids span its range (max {rng[1]:,} vs {self._range(c)[1]:,})"
            if len(fits) > 1 and fits[1][:2] == fits[0][:2]:
                why += f"; also matches {fits[1][-1]!r}, present in fewer rows"
            return c, why
        spans = [c for c in _ID_FEATURES if c in owners
                 and _RANGE_BAND[0] <= top / (self._range(c)[1] + 1) <= _RANGE_BAND[1]]
        if len(spans) == 1:
            c = spans[0]
            return c, f"its ids span the range of {c!r} (max {rng[1]:,} vs {self._range(c)[1]:,})"
        if len(spans) > 1:
            notes.append(f"ids span the ranges of both {spans[0]!r} and {spans[1]!r}: ambiguous")
        return None, "; ".join(notes) or "no id column matches its name or id range"

    def _task(self, name: str) -> TaskSpec:
        st = self.stats.get(name, {})
        if name not in self.regression_tasks and st.get("binary", False):
            pos = st.get("sum", 0.0) / max(1, st.get("rows", 0) - st.get("nulls", 0))
            self.reasons[name] = f"binary task: every value is 0 or 1 ({pos:.1%} positive{self._rows(name)})"
            return TaskSpec(name, "binary")
        why = "named in regression_tasks" if name in self.regression_tasks else "values other than 0/1"
        self.reasons[name] = f"regression task: {why}{self._rows(name)}"
        return TaskSpec(name, "regression")

    def _domains(self, features: List[FeatureSpec], task_specs: List[TaskSpec], domain_col: Optional[str]
                 ) -> List[DomainSpec]:
        per_source: Dict[int, set] = {}
        for info in self.files:
            per_source.setdefault(info.source_index, set()).update(info.arrow_schema.names)
        names = {s.domain for s in self.srcs if s.domain is not None}
        if domain_col is not None:
            names.update(self.stats.get(domain_col, {}).get("values", []))
        domains = []
        for d in sorted(names, key=lambda x: (len(x), x)) or ["default"]:
            srcs_d = [i for i, s in enumerate(self.srcs) if s.domain == d]
            if not srcs_d:
                domains.append(DomainSpec(d))
                continue
            have = set().union(*(per_source.get(i, set()) for i in srcs_d))
            feats = [f for f in features if f.source in have]
            tks = [t for t in task_specs if t.source in have]
            domains.append(DomainSpec(d, None if len(feats) == len(features) else [f.name for f in feats],
                                      None if len(tks) == len(task_specs) else [t.name for t in tks]))
        return domains


def _scan(files: List[FileInfo], reader: ChunkReader, ts_pairs: Dict[str, str]) -> Dict[str, dict]:
    """One pass: per column rows and nulls; min/max, sum and 0/1-ness of numbers (list values
    flattened); NaN counts of floats; a histogram of list lengths; whether each candidate timestamp
    list has its list's lengths in every row; the distinct domain values."""
    stats: Dict[str, dict] = {}
    for info in files:
        for chunk in range(len(info.chunk_rows)):
            table = reader.read(info, chunk, info.columns)
            for name in table.column_names:
                arr = table.column(name)
                st = stats.setdefault(name, {})
                st["rows"] = st.get("rows", 0) + len(arr)
                st["nulls"] = st.get("nulls", 0) + arr.null_count
                t = _unwrap(arr.type)
                if pa.types.is_dictionary(arr.type):
                    arr = arr.cast(t)
                if is_list_or_view(t):
                    if not is_listlike(t):
                        arr = arr.cast(pa.large_list(t.value_type))
                    lengths = pc.list_value_length(arr).drop_null().to_numpy(zero_copy_only=False)
                    hist = np.bincount(lengths.astype(np.int64)) if len(lengths) else np.zeros(1, np.int64)
                    old = st.get("lengths", np.zeros(1, np.int64))
                    size = max(len(old), len(hist))
                    st["lengths"] = np.pad(old, (0, size - len(old))) + np.pad(hist, (0, size - len(hist)))
                    ts = ts_pairs.get(name)
                    if ts is not None and ts in table.column_names:
                        same = pc.equal(pc.list_value_length(table.column(ts)), pc.list_value_length(arr))
                        ok = pc.all(pc.fill_null(same, True)).as_py()
                        st.setdefault("ts_ok", {})[ts] = st.get("ts_ok", {}).get(ts, True) and bool(ok is not False)
                    arr = pc.list_flatten(arr)
                    t = _unwrap(arr.type)
                    if pa.types.is_dictionary(arr.type):
                        arr = arr.cast(t)
                if is_int(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                    num = arr.cast(pa.float64())
                    if pa.types.is_floating(t):
                        st["nans"] = st.get("nans", 0) + (pc.sum(pc.is_nan(num)).as_py() or 0)
                        num = pc.if_else(pc.is_nan(num), pa.scalar(None, pa.float64()), num)
                    mm = pc.min_max(num)
                    if mm["min"].is_valid:
                        st["min"] = min(st.get("min", np.inf), mm["min"].as_py())
                        st["max"] = max(st.get("max", -np.inf), mm["max"].as_py())
                    st["sum"] = st.get("sum", 0.0) + (pc.sum(num).as_py() or 0.0)
                    nonbin = pc.sum(pc.and_(pc.not_equal(num, 0.0), pc.not_equal(num, 1.0))).as_py() or 0
                    st["binary"] = st.get("binary", True) and nonbin == 0
                if name == "domain":
                    vals = pc.unique(arr.cast(pa.string())).to_pylist()  # distinct domains: a handful
                    st.setdefault("values", set()).update(v for v in vals if v is not None)
    return stats


def _flow(mapping: Dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(mapping, default_flow_style=True, width=math.inf, sort_keys=False).strip()


def _commented_yaml(inf: Inference) -> str:
    """YAML of ``inf.schema``, one line per feature and task, each with its reason as a comment."""
    import yaml

    s = inf.schema
    d = s.to_dict()
    used = set()
    lines = ["# lattice data infer: the inferred schema; every column's role and why is in a comment.",
             "# Edit freely (kinds, num_embeddings, embedding_dim, pooling, max_length, windows), then use it",
             "# as a data config's schema (data.schema: this file)."]
    if inf.embedded:
        lines.append("# These files carry the schema lattice embedded in them: printed as is "
                     "(name --tasks to infer it column by column).")
    sources = {f.source for f in s.features}
    for key in ("example_id_column", "domain_column", "user_id_column", "item_id_column", "timestamp_column"):
        col = d[key]
        line = yaml.safe_dump({key: col}, default_flow_style=False, sort_keys=False).strip()
        if col is None:
            line += "  # no such column" + (" (each source names its domain)" if key == "domain_column" else "")
        elif not inf.embedded:
            used.add(col)
            line += "  # " + ("also a feature, see below" if col in sources else inf.reasons.get(col, ""))
        lines.append(line)
    if "dense_nan" in d:
        lines.append(f"dense_nan: {d['dense_nan']}")
    for section, specs in (("features", s.features), ("tasks", s.tasks)):
        lines.append(f"{section}:")
        for spec, item in zip(specs, d[section]):
            line = f"  - {_flow(item)}"
            if not inf.embedded:
                used.add(spec.source)
                line += f"  # {inf.reasons.get(spec.source, '')}"
            lines.append(line)
    lines.append("domains:")
    for item in d["domains"]:
        lines.append(f"  - {_flow(item)}")
    rest = [c for c in inf.reasons if c not in used]
    if rest and not inf.embedded:
        lines.append("# other columns:")
        lines += [f"#   {c}: {inf.reasons[c]}" for c in rest]
    return "\n".join(lines) + "\n"
