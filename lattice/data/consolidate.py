"""Domain consolidation: per-domain datasets whose columns differ -> one union schema with a domain column.

A feature a domain's files lack is *absent* there (``DomainSpec.features`` leaves it out, so the
reader masks it), never a zero; a label a domain lacks is masked. Two ways to use it:

- lazily: :func:`union_schema` gives the union schema of per-domain :class:`DataSource` s and the reader
  streams them as they are (``ParquetBatchDataset(sources, union_schema(sources))``);
- eagerly: :func:`consolidate` writes one merged Parquet dataset (union columns, nulls where absent,
  a string ``domain`` column, row groups sized for streaming, the schema embedded) -- the
  ``lattice data consolidate`` command.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from lattice.data.builder import TRUTH_PREFIX, BatchBuilder, ChunkContext
from lattice.data.errors import DataError
from lattice.data.infer import SCHEMA_METADATA_KEY, embedded_schema, infer_schema
from lattice.data.plan import check_file
from lattice.data.schema import DomainSpec, Schema
from lattice.data.sources import ChunkReader, FileInfo, as_sources, discover

__all__ = ["union_schema", "consolidate"]

log = logging.getLogger(__name__)


def union_schema(sources, schema: Optional[Schema] = None, tasks: Optional[Sequence[str]] = None) -> Schema:
    """The union schema of per-domain sources.

    With ``schema`` given, its features and tasks are kept and each fixed-domain source's domain gets
    exactly the features/tasks whose columns its files have; otherwise the schema is inferred
    (embedded lattice schemas first, see :func:`infer_schema`).
    """
    srcs = as_sources(sources)
    if schema is None:
        files = discover(srcs)
        embedded = [embedded_schema(f) for f in files]
        if embedded and all(e is not None for e in embedded) and tasks is None:
            schema = _merge_embedded(embedded)
        else:
            return infer_schema(srcs, tasks)
    files = discover(srcs)
    cols_by_domain: Dict[str, set] = {}
    for info in files:
        if info.domain is not None:
            cols_by_domain.setdefault(info.domain, set()).update(info.columns)
    domains = {d.name: d for d in schema.domains}
    for name in cols_by_domain:
        if name not in domains:
            domains[name] = DomainSpec(name)
    out = []
    for name, d in domains.items():
        have = cols_by_domain.get(name)
        if have is None:
            out.append(d)
            continue
        feats = [f.name for f in schema.features if f.source in have and (d.features is None or f.name in d.features)]
        tks = [t.name for t in schema.tasks if t.source in have and (d.tasks is None or t.name in d.tasks)]
        out.append(DomainSpec(name, None if len(feats) == len(schema.features) else feats,
                              None if len(tks) == len(schema.tasks) else tks))
    return schema.replace(domains=out)


def _merge_embedded(schemas: List[Schema]) -> Schema:
    first = schemas[0]
    feats = {f.name: f for s in schemas for f in s.features}
    tasks = {t.name: t for s in schemas for t in s.tasks}
    doms: Dict[str, DomainSpec] = {}
    for s in schemas:
        for d in s.domains:
            doms.setdefault(d.name, d)
    return first.replace(features=list(feats.values()), tasks=list(tasks.values()), domains=list(doms.values()))


def _target_schema(files: List[FileInfo], schema: Schema) -> pa.Schema:
    """Union Arrow schema of the columns the schema uses (types promoted across files)."""
    wanted = set(schema.required_columns()) | {TRUTH_PREFIX + t.name for t in schema.tasks}
    domain_col = schema.domain_column or "domain"
    wanted.discard(domain_col)
    per_file = []
    for info in files:
        fields = [f for f in info.arrow_schema if f.name in wanted]
        per_file.append(pa.schema(fields))
    try:
        merged = pa.unify_schemas(per_file, promote_options="permissive")
    except (pa.ArrowException, TypeError) as err:
        raise DataError(f"the datasets' column types cannot be unified: {err}") from None
    order = [c for c in schema.required_columns() if c in merged.names and c != domain_col]
    order += sorted(c for c in merged.names if c not in order)
    fields = [merged.field(c) for c in order]
    return pa.schema([pa.field(domain_col, pa.string())] + [f.with_nullable(True) for f in fields])


def consolidate(
    sources,
    out_dir: str,
    schema: Optional[Schema] = None,
    *,
    tasks: Optional[Sequence[str]] = None,
    row_group_size: int = 65536,
    rows_per_file: Optional[int] = None,
    compression: str = "zstd",
    validate: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Merge ``sources`` (per-domain datasets, or any datasets) into one Parquet dataset in ``out_dir``.

    Every row is kept (its domain in a string ``domain`` column); union columns are null where a
    source lacks them; with ``validate`` each chunk is checked against the schema first (a bad row is
    a :class:`DataError` naming file, column and row group; nothing is written then). Writes
    ``part-NNNNN.parquet`` files (row groups of ``row_group_size`` rows) and ``_schema.yaml`` (the leading
    underscore keeps dataset readers from taking it for data); returns
    ``{"path", "rows", "rows_per_domain", "files", "schema"}``.
    """
    srcs = as_sources(sources)
    schema = union_schema(srcs, schema, tasks)
    if schema.domain_column is None:
        schema = schema.replace(domain_column="domain")
    files = discover(srcs)
    for info in files:
        check_file(info, schema)
    target = _target_schema(files, schema)
    schema_yaml = schema.to_yaml()
    target = target.with_metadata({SCHEMA_METADATA_KEY: schema_yaml.encode()})
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty (pass overwrite=True to replace it)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".lattice-consolidate-", dir=parent)
    builder = BatchBuilder(schema, truth=True) if validate else None
    reader = ChunkReader()
    rows_per_domain: Dict[str, int] = {}
    written: List[str] = []
    state = {"writer": None, "rows_in_file": 0, "pending": [], "pending_rows": 0}

    def open_writer():
        path = os.path.join(tmp, f"part-{len(written):05d}.parquet")
        written.append(path)
        state["writer"] = pq.ParquetWriter(path, target, compression=compression)
        state["rows_in_file"] = 0

    def flush(final: bool = False):
        while state["pending_rows"] >= row_group_size or (final and state["pending_rows"]):
            table = pa.concat_tables(state["pending"])
            n = min(row_group_size, table.num_rows)
            if rows_per_file is not None and state["writer"] is not None and state["rows_in_file"] >= rows_per_file:
                state["writer"].close()
                state["writer"] = None
            if state["writer"] is None:
                open_writer()
            state["writer"].write_table(table.slice(0, n), row_group_size=row_group_size)
            state["rows_in_file"] += n
            rest = table.slice(n)
            state["pending"] = [rest] if rest.num_rows else []
            state["pending_rows"] = rest.num_rows

    domain_col = schema.domain_column
    try:
        for info in files:
            for chunk in range(len(info.chunk_rows)):
                cols = [c for c in info.columns if c in target.names or c == domain_col]
                raw = reader.read(info, chunk, cols)
                start = info.chunk_starts[chunk]
                ctx = ChunkContext(info.path, info.chunk_label(chunk), start, info.file_index, info.domain)
                prepared = builder.prepare(raw, ctx) if builder is not None else None
                if info.domain is not None:
                    dom = pa.array([info.domain] * raw.num_rows, type=pa.string())
                elif prepared is not None:
                    idx = prepared.column("_domain").to_numpy()
                    dom = pa.array([schema.domain_names[i] for i in range(len(schema.domains))]).take(pa.array(idx))
                elif domain_col in raw.column_names:
                    dom = raw.column(domain_col).cast(pa.string())
                else:
                    dom = pa.array([schema.domain_names[0]] * raw.num_rows, type=pa.string())
                arrays = [dom]
                for field in list(target)[1:]:
                    if field.name in raw.column_names:
                        try:
                            arrays.append(raw.column(field.name).cast(field.type))
                        except (pa.ArrowException, TypeError) as err:
                            raise DataError(f"cannot convert to {field.type}: {err}", file=info.path,
                                            column=field.name, row_group=info.chunk_label(chunk)) from None
                    else:
                        arrays.append(pa.nulls(raw.num_rows, type=field.type))
                table = pa.Table.from_arrays(arrays, schema=target)
                for name, count in zip(*_value_counts(dom)):
                    rows_per_domain[name] = rows_per_domain.get(name, 0) + count
                state["pending"].append(table)
                state["pending_rows"] += table.num_rows
                flush()
        flush(final=True)
        if state["writer"] is not None:
            state["writer"].close()
        with open(os.path.join(tmp, "_schema.yaml"), "w") as fh:
            fh.write(schema_yaml)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        if state["writer"] is not None:
            state["writer"].close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(rows_per_domain.values())
    log.info("consolidated %d rows (%s) into %s", total, rows_per_domain, out_dir)
    return {
        "path": out_dir,
        "rows": total,
        "rows_per_domain": rows_per_domain,
        "files": [os.path.join(out_dir, os.path.basename(p)) for p in written],
        "schema": schema,
    }


def _value_counts(arr: pa.Array):
    vc = arr.value_counts()
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
