"""Where rows come from: datasets (a file, a directory, a glob; Parquet or CSV), their files and the
chunks (Parquet row groups, CSV blocks) the reader streams. Every read error names the file and row
group."""
from __future__ import annotations

import glob
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lattice.data.errors import DataError

__all__ = ["CsvOptions", "DataSource", "FileInfo", "discover", "ChunkReader", "as_sources"]

_CSV_EXT = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".txt.gz")


@dataclass
class CsvOptions:
    """How to parse CSV input (through ``pyarrow.csv``).

    Args:
        delimiter: field separator (``"\\t"`` for TSV).
        column_names: names for a file without a header row (``None``: the first row is the header).
        skip_rows: rows to skip before the header (or the data, with ``column_names``).
        null_values: strings read as null (``None``: pyarrow's defaults, including the empty string).
        block_size: bytes per parsed block; a block is the unit the reader shards and streams.
    """

    delimiter: str = ","
    column_names: Optional[List[str]] = None
    skip_rows: int = 0
    null_values: Optional[List[str]] = None
    block_size: int = 1 << 22

    def open(self, path: str, column_types: Optional[Dict[str, pa.DataType]] = None) -> pacsv.CSVStreamingReader:
        read = pacsv.ReadOptions(
            column_names=self.column_names, skip_rows=self.skip_rows, block_size=self.block_size, use_threads=False
        )
        parse = pacsv.ParseOptions(delimiter=self.delimiter)
        kwargs = {"column_types": column_types or {}}
        if self.null_values is not None:
            kwargs["null_values"] = list(self.null_values)
            kwargs["strings_can_be_null"] = True
        else:
            kwargs["strings_can_be_null"] = True
        return pacsv.open_csv(path, read_options=read, parse_options=parse,
                              convert_options=pacsv.ConvertOptions(**kwargs))


@dataclass
class DataSource:
    """One dataset: a file, a directory or a glob (or a list of them), in Parquet or CSV.

    Args:
        path: file / directory / glob, or a list of those.
        domain: the domain of every row of this dataset (per-domain datasets; the schema's
            ``domain_column`` is then not needed); ``None``: read the domain column.
        format: ``parquet``, ``csv`` or ``auto`` (by extension: ``.csv/.tsv/.txt`` are CSV).
        csv: CSV parsing options.
    """

    path: Union[str, List[str]]
    domain: Optional[str] = None
    format: Literal["auto", "parquet", "csv"] = "auto"
    csv: Optional[CsvOptions] = None

    def __post_init__(self) -> None:
        if self.domain is not None:
            self.domain = str(self.domain)
        if isinstance(self.csv, dict):
            self.csv = CsvOptions(**self.csv)
        if self.format not in ("auto", "parquet", "csv"):
            raise ValueError(f"DataSource.format must be auto, parquet or csv, got {self.format!r}")

    @property
    def paths(self) -> List[str]:
        return [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)


def as_sources(obj) -> List[DataSource]:
    """Normalize a path, a list of paths, a DataSource, a mapping or a list of those to DataSources."""
    if obj is None:
        return []
    if isinstance(obj, DataSource):
        return [obj]
    if isinstance(obj, (str, os.PathLike)):
        return [DataSource(str(obj))]
    if isinstance(obj, dict):
        return [DataSource(**obj)]
    out: List[DataSource] = []
    for item in obj:
        if isinstance(item, (str, os.PathLike)):
            out.append(DataSource(str(item)))
        else:
            out.extend(as_sources(item))
    return out


@dataclass
class FileInfo:
    """One input file and its chunks. ``chunk_rows[i]`` rows in chunk ``i`` (a Parquet row group or a CSV
    block), which starts at row ``chunk_starts[i]`` of the file."""

    path: str
    format: str
    source_index: int
    file_index: int
    domain: Optional[str]
    arrow_schema: pa.Schema
    chunk_rows: List[int]
    csv: Optional[CsvOptions] = None
    chunk_starts: List[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.chunk_starts:
            starts, acc = [], 0
            for r in self.chunk_rows:
                starts.append(acc)
                acc += r
            self.chunk_starts = starts

    @property
    def num_rows(self) -> int:
        return sum(self.chunk_rows)

    @property
    def columns(self) -> List[str]:
        return list(self.arrow_schema.names)

    def chunk_label(self, chunk: int) -> Optional[int]:
        """The row group number for messages (CSV blocks have none)."""
        return chunk if self.format == "parquet" else None


def _is_csv(path: str, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "csv"
    return path.lower().endswith(_CSV_EXT)


def _expand(path: str, fmt: str) -> List[str]:
    if any(c in path for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no files match the glob {path!r}")
        return files
    if os.path.isdir(path):
        fmt_dir = "csv" if fmt == "csv" else "parquet"
        try:
            files = sorted(ds.dataset(path, format=fmt_dir, exclude_invalid_files=False).files)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot list dataset directory: {err}", file=path) from None
        if not files:
            raise DataError("dataset directory holds no data files", file=path)
        return files
    if not os.path.exists(path):
        raise DataError("no such file or directory", file=path)
    return [path]


def _parquet_info(path: str) -> Tuple[pa.Schema, List[int]]:
    if os.path.getsize(path) == 0:
        raise DataError("empty file (0 bytes)", file=path)
    try:
        pf = pq.ParquetFile(path)
        md = pf.metadata
        schema = pf.schema_arrow
        rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"not a readable Parquet file (truncated or corrupt?): {err}", file=path) from None
    if sum(rows) == 0:
        raise DataError("empty file (no rows)", file=path)
    return schema, rows


def _csv_info(path: str, opts: CsvOptions) -> Tuple[pa.Schema, List[int]]:
    if os.path.getsize(path) == 0:
        raise DataError("empty file (0 bytes)", file=path)
    rows: List[int] = []
    try:
        reader = opts.open(path)
        schema = reader.schema
        for batch in reader:
            if batch.num_rows:
                rows.append(batch.num_rows)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cannot parse CSV: {err}", file=path, row=sum(rows) if rows else None) from None
    if not rows:
        raise DataError("empty file (no data rows)", file=path)
    return schema, rows


def discover(sources: Sequence[DataSource]) -> List[FileInfo]:
    """Every file of every source, with its chunk row counts (Parquet footers; CSV files are parsed
    once to count rows). Files keep source order, then sorted path order; ``file_index`` numbers
    them globally."""
    infos: List[FileInfo] = []
    for si, src in enumerate(sources):
        files: List[str] = []
        for p in src.paths:
            files.extend(_expand(str(p), src.format))
        seen = set()
        for path in files:
            if path in seen:
                continue
            seen.add(path)
            if _is_csv(path, src.format):
                opts = src.csv or CsvOptions(delimiter="\t" if path.lower().endswith((".tsv", ".tsv.gz")) else ",")
                schema, rows = _csv_info(path, opts)
                infos.append(FileInfo(path, "csv", si, len(infos), src.domain, schema, rows, csv=opts))
            else:
                schema, rows = _parquet_info(path)
                infos.append(FileInfo(path, "parquet", si, len(infos), src.domain, schema, rows))
    if not infos:
        raise DataError("no input files")
    return infos


class ChunkReader:
    """Reads raw chunks (row groups / CSV blocks), keeping a few files open. One per process."""

    def __init__(self, max_open: int = 8) -> None:
        self._parquet: "OrderedDict[str, pq.ParquetFile]" = OrderedDict()
        self._csv: Dict[str, Tuple[pacsv.CSVStreamingReader, int]] = {}
        self._max_open = max_open

    def read(self, info: FileInfo, chunk: int, columns: Sequence[str]) -> pa.Table:
        try:
            if info.format == "parquet":
                return self._read_parquet(info, chunk, columns)
            return self._read_csv(info, chunk, columns)
        except DataError:
            raise
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"cannot read: {err}", file=info.path, row_group=info.chunk_label(chunk),
                            row=None if info.format == "parquet" else info.chunk_starts[chunk]) from None

    def _read_parquet(self, info: FileInfo, chunk: int, columns: Sequence[str]) -> pa.Table:
        pf = self._parquet.get(info.path)
        if pf is None:
            pf = pq.ParquetFile(info.path)
            self._parquet[info.path] = pf
            while len(self._parquet) > self._max_open:
                self._parquet.popitem(last=False)
        else:
            self._parquet.move_to_end(info.path)
        table = pf.read_row_group(chunk, columns=list(columns), use_threads=True)
        if table.num_rows != info.chunk_rows[chunk]:
            raise DataError(f"row group has {table.num_rows} rows, its footer says {info.chunk_rows[chunk]}",
                            file=info.path, row_group=chunk)
        return table

    def _read_csv(self, info: FileInfo, chunk: int, columns: Sequence[str]) -> pa.Table:
        state = self._csv.get(info.path)
        if state is None or state[1] > chunk:
            reader = info.csv.open(info.path, {c: info.arrow_schema.field(c).type for c in info.arrow_schema.names})
            state = (reader, 0)
        reader, pos = state
        batch = None
        while pos <= chunk:
            batch = reader.read_next_batch()
            if batch.num_rows == 0:
                continue
            pos += 1
        self._csv[info.path] = (reader, pos)
        if batch.num_rows != info.chunk_rows[chunk]:
            raise DataError(f"CSV block has {batch.num_rows} rows, expected {info.chunk_rows[chunk]} "
                            f"(file changed while reading?)", file=info.path, row=info.chunk_starts[chunk])
        table = pa.Table.from_batches([batch])
        return table.select([c for c in columns if c in table.column_names])
