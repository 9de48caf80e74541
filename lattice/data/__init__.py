"""The data layer: schema, Batch, streaming Parquet/CSV reader, consolidation, Lattice Zipper, the planted
synthetic world and the LightningDataModule.

- :class:`Schema` (:class:`FeatureSpec`, :class:`TaskSpec`, :class:`WindowSpec`, :class:`DomainSpec`)
- :class:`Batch` -- what every model consumes
- :class:`ParquetBatchDataset` / :class:`LatticeDataLoader` -- the sharded, shuffled, resumable reader
- :func:`union_schema` / :func:`consolidate` -- per-domain datasets to one union schema
- :func:`assign_windows` / :func:`window_labels` -- Lattice Zipper
- :class:`SyntheticConfig` / :class:`SyntheticWorld` -- the planted world
- :class:`LatticeDataModule`
- :class:`TeacherTable` / :func:`write_teacher_outputs` -- teacher outputs joined by example_id
"""
from lattice.data.errors import DataError, SchemaError
from lattice.data.schema import DomainSpec, FeatureSpec, Schema, TaskSpec, WindowSpec
from lattice.batch import Batch
from lattice.data.builder import BatchBuilder, ChunkContext
from lattice.data.sources import CsvOptions, DataSource
from lattice.data.splits import RowFilter, hash_split, time_split
from lattice.data.dataset import ParquetBatchDataset
from lattice.data.loader import LatticeDataLoader, identity_collate
from lattice.data.zipper import assign_windows, window_labels
from lattice.data.infer import infer_schema
from lattice.data.consolidate import consolidate, union_schema
from lattice.data.synthetic import SyntheticConfig, SyntheticDomain, SyntheticTask, SyntheticWorld
from lattice.data.teacher import TeacherTable, write_teacher_outputs
from lattice.data.datamodule import LatticeDataModule

__all__ = [
    "DataError", "SchemaError",
    "Schema", "FeatureSpec", "TaskSpec", "WindowSpec", "DomainSpec",
    "Batch", "BatchBuilder", "ChunkContext",
    "DataSource", "CsvOptions",
    "RowFilter", "hash_split", "time_split",
    "ParquetBatchDataset", "LatticeDataLoader", "identity_collate",
    "assign_windows", "window_labels",
    "infer_schema", "union_schema", "consolidate",
    "SyntheticConfig", "SyntheticDomain", "SyntheticTask", "SyntheticWorld",
    "TeacherTable", "write_teacher_outputs",
    "LatticeDataModule",
]
