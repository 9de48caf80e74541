"""``LatticeDataModule``: the LightningDataModule behind every lattice command."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Literal, Optional, Union

import lightning as L
import numpy as np
import pyarrow as pa

from lattice.batch import Batch
from lattice.data.cache import ensure_world, world_dir
from lattice.data.consolidate import union_schema
from lattice.data.errors import DataError
from lattice.data.dataset import ParquetBatchDataset, dist_rank_world
from lattice.data.loader import LatticeDataLoader, identity_collate
from lattice.data.schema import Schema
from lattice.data.sources import ChunkReader, CsvOptions, DataSource, as_sources, discover
from lattice.data.splits import RowFilter, hash_split, time_split
from lattice.data.synthetic import SyntheticConfig, SyntheticWorld
from lattice.data.teacher import TeacherTable

__all__ = ["LatticeDataModule"]

log = logging.getLogger(__name__)

Paths = Union[str, List[str]]


class LatticeDataModule(L.LightningDataModule):
    """Batches of the planted synthetic world (default) or of Parquet/CSV datasets.

    Args:
        paths: training data: file(s), director(ies) or glob(s) whose rows carry a domain column (or
            one domain). With neither ``paths`` nor ``sources``, the planted world of ``synthetic`` is
            generated into the cache on first use and read from there.
        sources: per-domain datasets instead (each :class:`DataSource` names its domain; their
            columns may differ -- consolidated lazily, absent features masked).
        schema: a :class:`Schema` (in YAML: the schema mapping, or a path to a schema YAML); default: the
            synthetic world's, the one lattice embedded in the files, or inferred (with ``tasks``).
        synthetic: the planted world's configuration (default :class:`SyntheticConfig`).
        cache_dir: where generated data lives (default ``$LATTICE_CACHE`` or ``~/.cache/lattice``).
        val_paths, test_paths, predict_paths: explicit evaluation/prediction data (no split then).
        split: carve val/test out of the training data: ``hash`` (of the example id), ``time`` (the
            latest rows are val, then test) or ``none``.
        val_fraction, test_fraction: split shares.
        split_seed: seed of the hash split (kept apart from ``seed``, so reshuffling never moves rows
            between splits).
        batch_size, eval_batch_size: rows per training / evaluation batch.
        num_workers: DataLoader worker processes (each reads its own share of row groups).
        shuffle, shuffle_buffer, seed: training-order shuffle (window of rows) and its seed; every
            epoch is reshuffled.
        drop_last: drop each worker's last partial training batch.
        even_batches: under DDP, stop every rank at the same batch count (the rows left out per epoch
            are logged).
        pin_memory: pin batches for faster host-to-GPU copies.
        csv: CSV parsing options for CSV ``paths``.
        tasks: label columns when the schema is inferred.
        teacher_paths: teacher outputs (``example_id`` + ``logit_<task>`` [+ ``embedding``]) joined onto
            training and validation batches by ``example_id``.
        predict_split: the rows ``predict`` reads without ``predict_paths``: ``all``, ``train``,
            ``val`` or ``test``.
        validate: read and check every training row in ``setup`` (errors before training starts).
        zipper_seed: seed of the Lattice Zipper window assignment.
    """

    def __init__(
        self,
        paths: Optional[Paths] = None,
        sources: Optional[List[DataSource]] = None,
        schema: Optional[Schema] = None,
        synthetic: Optional[SyntheticConfig] = None,
        cache_dir: Optional[str] = None,
        val_paths: Optional[Paths] = None,
        test_paths: Optional[Paths] = None,
        predict_paths: Optional[Paths] = None,
        split: Literal["hash", "time", "none"] = "hash",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        batch_size: int = 1024,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 65536,
        seed: int = 0,
        drop_last: bool = False,
        even_batches: bool = True,
        pin_memory: bool = False,
        csv: Optional[CsvOptions] = None,
        tasks: Optional[List[str]] = None,
        teacher_paths: Optional[Paths] = None,
        predict_split: Literal["all", "train", "val", "test"] = "all",
        validate: bool = False,
        zipper_seed: int = 0,
    ) -> None:
        super().__init__()
        if paths is not None and sources is not None:
            raise ValueError("give either paths or sources, not both")
        if split not in ("hash", "time", "none"):
            raise ValueError(f"split must be hash, time or none, got {split!r}")
        if predict_split not in ("all", "train", "val", "test"):
            raise ValueError(f"predict_split must be all, train, val or test, got {predict_split!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.csv = CsvOptions(**csv) if isinstance(csv, dict) else csv
        self.cache_dir = cache_dir
        self.split = split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.drop_last = drop_last
        self.even_batches = even_batches
        self.pin_memory = pin_memory
        self.teacher_paths = teacher_paths
        self.predict_split = predict_split
        self.validate = validate
        self.zipper_seed = zipper_seed
        self.world: Optional[SyntheticWorld] = None
        if paths is None and sources is None:
            cfg = synthetic if synthetic is not None else SyntheticConfig()
            if isinstance(cfg, dict):
                cfg = SyntheticConfig.from_dict(cfg)
            self.world = SyntheticWorld(cfg)
            self._sources: Optional[List[DataSource]] = None  # known once generated
        else:
            self._sources = self._with_csv(as_sources(paths if paths is not None else sources))
        self._val_sources = self._with_csv(as_sources(val_paths)) if val_paths is not None else None
        self._test_sources = self._with_csv(as_sources(test_paths)) if test_paths is not None else None
        self._predict_sources = self._with_csv(as_sources(predict_paths)) if predict_paths is not None else None
        if schema is not None:
            self._schema = Schema.coerce(schema)
        elif self.world is not None:
            self._schema = self.world.schema()
        else:
            self._schema = union_schema(self._sources, None, tasks)
        self._datasets: Dict[str, ParquetBatchDataset] = {}
        self._teacher: Optional[TeacherTable] = None
        self._filters: Optional[Dict[str, Optional[RowFilter]]] = None

    def _with_csv(self, sources: List[DataSource]) -> List[DataSource]:
        if self.csv is not None:
            for s in sources:
                if s.csv is None:
                    s.csv = self.csv
        return sources

    # ---- what the CLI links into the model ------------------------------------------------------
    @property
    def schema(self) -> Schema:
        return self._schema

    @property
    def domains(self) -> List[str]:
        return self._schema.domain_names

    @property
    def tasks(self) -> List[str]:
        return self._schema.task_names

    @property
    def num_domains(self) -> int:
        return self._schema.num_domains

    @property
    def num_tasks(self) -> int:
        return self._schema.num_tasks

    @staticmethod
    def collate(batch: Batch) -> Batch:
        """Identity: the reader yields whole :class:`Batch` es."""
        return identity_collate(batch)

    @property
    def data_dir(self) -> Optional[str]:
        """The synthetic world's folder (``None`` for user data)."""
        return world_dir(self.world.config, self.cache_dir) if self.world is not None else None

    def feature_roles(self) -> Optional[Dict[str, List[str]]]:
        """The planted world's informative and noise features (``None`` for user data)."""
        return self.world.feature_roles() if self.world is not None else None

    # ---- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.world is not None:
            ensure_world(self.world.config, self.cache_dir)

    @property
    def sources(self) -> List[DataSource]:
        if self._sources is None:
            out = ensure_world(self.world.config, self.cache_dir)
            self._sources = self.world.sources(out)
        return self._sources

    def setup(self, stage: Optional[str] = None) -> None:
        if self.teacher_paths is not None and self._teacher is None:
            self._teacher = TeacherTable(self.teacher_paths, self._schema.task_names)
        if stage in (None, "fit"):
            train = self.dataset("train")
            if self.validate:
                rows = train.validate()
                log.info("validated %d training rows", rows)
            rank, world = dist_rank_world()
            left = train.left_out_rows(world, self.num_workers)
            if left and rank == 0:
                log.warning("even_batches: %d training rows per epoch are left out so that every rank yields "
                            "%d batches", left, train.num_batches(self.num_workers))

    def split_filters(self) -> Dict[str, Optional[RowFilter]]:
        """The row filters of the train/val/test splits (``None``: no filter)."""
        if self._filters is not None:
            return self._filters
        explicit = self._val_sources is not None or self._test_sources is not None
        if self.split == "none" or explicit:
            self._filters = {"train": None, "val": None, "test": None}
        elif self.split == "hash":
            self._filters = hash_split(self.val_fraction, self.test_fraction, seed=self.split_seed)
        else:
            self._filters = time_split(*self._time_cutoffs())
        return self._filters

    def _time_cutoffs(self):
        col = self._schema.timestamp_column
        if col is None:
            raise ValueError("split='time' needs a timestamp column (schema.timestamp_column is null)")
        files = discover(self.sources)
        reader = ChunkReader()
        total = sum(info.num_rows for info in files)
        step = max(1, -(-total // 4_000_000))  # quantiles from at most ~4M timestamps (bounded memory)
        stamps = []
        for info in files:
            if col not in info.columns:
                raise DataError("missing timestamp column (needed by split='time')", file=info.path, column=col)
            for c in range(len(info.chunk_rows)):
                arr = reader.read(info, c, [col]).column(col)
                if pa.types.is_timestamp(arr.type):
                    arr = arr.cast(pa.timestamp("s")).cast(pa.int64())
                stamps.append(np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)[::step])
        ts = np.concatenate(stamps)
        q = np.quantile(ts, [1 - self.val_fraction - self.test_fraction, 1 - self.test_fraction])
        return float(np.ceil(q[0])), float(np.ceil(q[1]))

    def dataset(self, split: Literal["train", "val", "test", "predict"]) -> ParquetBatchDataset:
        """The dataset of a split (built once)."""
        if split in self._datasets:
            return self._datasets[split]
        filters = self.split_filters()
        train = split == "train"
        if split == "predict":
            if self._predict_sources is not None:
                srcs, flt = self._predict_sources, None
            elif self.predict_split == "all":
                srcs, flt = self.sources, None
            else:
                return self.dataset(self.predict_split)
        elif split == "val" and self._val_sources is not None:
            srcs, flt = self._val_sources, None
        elif split == "test" and self._test_sources is not None:
            srcs, flt = self._test_sources, None
        elif split in ("val", "test") and filters[split] is None:
            raise ValueError(f"no {split} data: set {split}_paths or a split (hash or time)")
        else:
            srcs, flt = self.sources, filters[split]
        ds = ParquetBatchDataset(
            srcs, self._schema,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=self.shuffle and train,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            drop_last=self.drop_last and train,
            row_filter=flt,
            zipper="assign" if train else "oracle",
            zipper_seed=self.zipper_seed,
            teacher=self._teacher if split in ("train", "val") else None,
            even_batches=self.even_batches and train,
        )
        self._datasets[split] = ds
        return ds

    def has_split(self, split: str) -> bool:
        if split == "val":
            return self._val_sources is not None or self.split_filters()["val"] is not None
        if split == "test":
            return self._test_sources is not None or self.split_filters()["test"] is not None
        return True

    def _loader(self, split: str) -> LatticeDataLoader:
        return LatticeDataLoader(self.dataset(split), num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> LatticeDataLoader:
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") if self.has_split("val") else []

    def test_dataloader(self):
        return self._loader("test") if self.has_split("test") else []

    def predict_dataloader(self) -> LatticeDataLoader:
        return self._loader("predict")

    def oracle(self) -> Optional[Dict[str, Any]]:
        """The synthetic world's per-domain oracle AUCs (from ``world.json``), or ``None``."""
        if self.world is None:
            return None
        import json

        path = os.path.join(ensure_world(self.world.config, self.cache_dir), "world.json")
        with open(path) as fh:
            return json.load(fh).get("oracle")
