"""``Predictor``: scores rows with a serving package (or, for debugging, a trained model in memory or rebuilt from
its configs and checkpoint).

Rows come as a ``pyarrow.Table``, a Parquet path or a list of dicts (one per row, column -> value). They go
through the data layer's own :class:`~lattice.data.builder.BatchBuilder` with the package's schema, so a
missing column, a wrong type, a null where none is allowed or an out-of-range id (``oov: error``) raises the
same :class:`~lattice.data.errors.DataError` naming the feature's column as in training; ``oov: hash`` ids
are hashed the same way. A column the schema does not know raises too: a misspelt feature is never silently
scored as absent. Label, delay and ``p_<task>`` columns are allowed and ignored (scoring a validation file
needs no edits); ids and the timestamp default to zeros and ``example_id`` to the data layer's derived id
when absent, since no network reads them.

Output: a ``pyarrow.Table`` with ``example_id`` (int64) and one float32 column per task (the probability of a
binary task, the prediction of a regression task), rows in input order. Large inputs are scored in batches
of ``batch_size`` rows. A Predictor may be shared by threads: each call builds its own tensors, and both
runners (the AOTInductor package and the eager inference module) are safe for concurrent calls.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from lattice.data.builder import TRUTH_PREFIX, BatchBuilder, ChunkContext
from lattice.data.errors import DataError
from lattice.data.schema import Schema
from lattice.serve.export import inference_module
from lattice.serve.inputs import flat_inputs
from lattice.serve.package import Manifest, read_package

__all__ = ["Predictor", "Rows"]

DOMAIN_METADATA_KEY = b"lattice.domain"
Rows = Union[pa.Table, str, os.PathLike, Sequence[Mapping[str, Any]]]


class Predictor:
    """Scores rows (see the module docstring). Build it with :meth:`from_package`, :meth:`from_model` or
    :meth:`from_checkpoint`.

    Args:
        runner: ``runner(*flat_inputs) -> [B, T]`` probabilities.
        schema: the schema the runner was exported for.
        teacher_embedding_dim: ``E`` when the runner is a KTAP student (it takes the teacher embedding).
        batch_size: rows per call of the runner.
        manifest: the package's manifest, when there is one.
    """

    def __init__(self, runner: Callable[..., Tensor], schema: Schema, *, teacher_embedding_dim: Optional[int] = None,
                 batch_size: int = 4096, manifest: Optional[Manifest] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.runner = runner
        self.schema = schema
        self.teacher_embedding_dim = teacher_embedding_dim
        self.batch_size = int(batch_size)
        self.manifest = manifest
        self.task_names = list(schema.task_names)
        # Serving never reads labels: the oracle zipper assigns no window at random, and labels are masked.
        self._builder = BatchBuilder(schema, zipper="oracle")
        self._builder.block_spec  # built once here, not lazily under concurrent calls
        self._known, self._ignored = _columns(schema)

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_package(cls, path: Union[str, os.PathLike], *, batch_size: int = 4096,
                     expected_schema: Optional[Schema] = None) -> "Predictor":
        """Load ``model.pt2`` (with ``model.schema.yaml`` and ``model.manifest.yaml`` beside it); raises
        :class:`~lattice.serve.package.PackageError` for a package of another lattice/torch version or schema."""
        schema, manifest = read_package(path, expected_schema)
        runner = torch._inductor.aoti_load_package(str(path))
        return cls(runner, schema, teacher_embedding_dim=manifest.teacher_embedding_dim, batch_size=batch_size,
                   manifest=manifest)

    @classmethod
    def from_model(cls, model: nn.Module, *, batch_size: int = 4096, quantization: str = "none") -> "Predictor":
        """Score with a trained network, LatticeModule or DistillationModule in eager mode (debugging: the same
        inputs and outputs as its package, without exporting), its tables in ``quantization`` (``"none"`` or
        ``"int8"``, as ``lattice export --quantize`` would serve them)."""
        module = inference_module(model, quantization)
        return cls(module, module.schema, teacher_embedding_dim=module.teacher_embedding_dim, batch_size=batch_size)

    @classmethod
    def from_checkpoint(cls, configs: Union[str, Sequence[str]], ckpt_path: Union[str, os.PathLike], *,
                        batch_size: int = 4096, quantization: str = "none") -> "Predictor":
        """Score with the module that training ``configs`` (stacked as for ``lattice fit``) and its checkpoint
        ``ckpt_path`` rebuild, in eager mode (:meth:`from_model`); the checkpoint of a sharded run is read with its
        tables folder, into whole tables on this one process."""
        from lattice.train.loading import load_from_config

        module, _ = load_from_config(configs, os.fspath(ckpt_path), seed=False)
        return cls.from_model(module.eval(), batch_size=batch_size, quantization=quantization)

    # ---- scoring -----------------------------------------------------------------------------------
    def predict(self, rows: Rows, domain: Optional[str] = None) -> pa.Table:
        """Scores of every row of ``rows`` (a Table, a Parquet path or a list of dicts), in order.

        The domain of a row comes from the schema's domain column, else from ``domain`` (every row's), else
        from the ``lattice.domain`` metadata of a per-domain Parquet file (as the planted world writes it).
        """
        tables = list(self.predict_batches(rows, domain))
        if not tables:
            return self.output_schema().empty_table()
        return pa.concat_tables(tables)

    def predict_batches(self, rows: Rows, domain: Optional[str] = None) -> Iterator[pa.Table]:
        """Like :meth:`predict`, one output table per ``batch_size`` rows (Parquet files are streamed)."""
        for table, ctx in _chunks(rows, self.batch_size):
            if domain is not None or (ctx.domain is not None and self.schema.domain_column in table.column_names):
                ctx.domain = domain  # an explicit domain wins; a domain column wins over file metadata
            yield self._score(table, ctx)

    def output_schema(self) -> pa.Schema:
        return pa.schema([pa.field("example_id", pa.int64())] + [pa.field(n, pa.float32()) for n in self.task_names])

    def _score(self, table: pa.Table, ctx: ChunkContext) -> pa.Table:
        prepared = self._builder.prepare(self._serving_view(table, ctx), ctx)
        batch = self._builder.build(prepared, shared=False)
        if batch.batch_size == 0:
            return self.output_schema().empty_table()
        inputs = flat_inputs(batch, self.schema, self.teacher_embedding_dim)
        with torch.inference_mode():
            probs = self.runner(*inputs)
        if isinstance(probs, (list, tuple)):  # an AOTInductor package returns its outputs as a list
            probs = probs[0]
        probs = probs.float().numpy()
        columns = {"example_id": pa.array(batch.example_id.numpy().astype(np.int64))}
        for t, name in enumerate(self.task_names):
            columns[name] = pa.array(np.ascontiguousarray(probs[:, t]))
        return pa.table(columns, schema=self.output_schema())

    def _serving_view(self, table: pa.Table, ctx: ChunkContext) -> pa.Table:
        """``table`` checked for unknown columns, without label columns (masked as null) and with zeros for
        id/timestamp columns that no network reads."""
        s = self.schema
        for name in table.column_names:
            if name not in self._known:
                raise DataError(f"column {name!r} is not in the model's schema (its columns: {sorted(self._known)})",
                                file=ctx.file, column=name)
        drop = [c for c in table.column_names if c in self._ignored]
        if drop:
            table = table.drop_columns(drop)
        n = table.num_rows
        names = set(table.column_names)
        features = {f.source for f in s.features}
        for col in (s.user_id_column, s.item_id_column, s.timestamp_column):
            if col is not None and col not in names and col not in features:
                table = table.append_column(col, pa.array(np.zeros(n, dtype=np.int64)))
                names.add(col)
        for t in s.tasks:
            if t.source not in names:
                table = table.append_column(t.source, pa.nulls(n, type=pa.float32()))
                names.add(t.source)
        return table


def _columns(schema: Schema) -> tuple[set[str], set[str]]:
    """``(known, ignored)`` column names: every column a request may carry, and those scoring ignores."""
    ignored = set()
    for t in schema.tasks:
        ignored.add(t.source)
        ignored.add(TRUTH_PREFIX + t.name)
        if t.delay_column:
            ignored.add(t.delay_column)
    known = set(ignored)
    for col in (schema.example_id_column, schema.domain_column, schema.user_id_column, schema.item_id_column,
                schema.timestamp_column):
        if col is not None:
            known.add(col)
    for f in schema.features:
        known.add(f.source)
        if f.timestamps_column:
            known.add(f.timestamps_column)
    return known, ignored - {c for f in schema.features for c in (f.source, f.timestamps_column) if c}


def _chunks(rows: Rows, batch_size: int) -> Iterable[tuple[pa.Table, ChunkContext]]:
    """``(table, context)`` pieces of at most ``batch_size`` rows, with the file and row offsets for errors."""
    if isinstance(rows, (str, os.PathLike)):
        path = Path(rows)
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise FileNotFoundError(f"no Parquet files under {str(path)!r}")
        for index, file in enumerate(files):
            if not file.is_file():
                raise FileNotFoundError(f"Parquet file {str(file)!r} does not exist")
            start = 0
            parquet = pq.ParquetFile(file)
            domain = _domain_metadata(parquet.schema_arrow)
            for record_batch in parquet.iter_batches(batch_size=batch_size):
                table = pa.Table.from_batches([record_batch])
                yield table, ChunkContext(file=str(file), row_offset=start, file_index=index, domain=domain)
                start += table.num_rows
        return
    if isinstance(rows, pa.Table):
        table, name = rows, "<table>"
    elif isinstance(rows, Sequence) and not isinstance(rows, (bytes, str)):
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise TypeError(f"rows[{bad}] is a {type(rows[bad]).__name__}; a list of rows must hold dicts")
        table, name = pa.Table.from_pylist(list(rows)), "<rows>"
    else:
        raise TypeError(f"rows must be a pyarrow.Table, a Parquet path or a list of dicts, got {type(rows).__name__}")
    domain = _domain_metadata(table.schema)
    for start in range(0, table.num_rows, batch_size):  # over batches, not rows
        yield table.slice(start, batch_size), ChunkContext(file=name, row_offset=start, domain=domain)


def _domain_metadata(schema: pa.Schema) -> Optional[str]:
    """The ``lattice.domain`` metadata of a per-domain file (the planted world's), if any."""
    value = (schema.metadata or {}).get(DOMAIN_METADATA_KEY)
    return value.decode() if value is not None else None
