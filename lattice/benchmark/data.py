"""Data-loading throughput: lattice's streaming reader vs a naive ``to_pylist`` + Python-collate loader over the
same planted-world Parquet file (benchmarks/bench_data.py). The naive loader is the row-by-row reference
:func:`lattice.data.reference.reference_batch` (``to_pylist`` + a Python loop per row + Python collate). Besides
wall-clock rows/s, rows per CPU-second (this process and its DataLoader workers), which other load on the
machine disturbs far less."""
from __future__ import annotations

import os
import statistics
import time

import pyarrow.parquet as pq

from lattice.benchmark.timing import cpu_seconds
from lattice.data import Schema, SyntheticConfig, SyntheticDomain, SyntheticWorld
from lattice.data.cache import cache_root
from lattice.data.reference import reference_batch


def world_config(rows: int) -> SyntheticConfig:
    """8 + 12 noise = 20 sparse, 5 + 5 noise = 10 dense, 2 sequence features; one domain with all of them."""
    return SyntheticConfig(
        seed=0, num_users=100_000, num_items=50_000, num_clusters=32,
        domains=[SyntheticDomain("all", rows)],
        num_noise_sparse=12, num_noise_dense=5, max_sequence_length=32, mean_sequence_length=12.0,
        dense_missing_rate=0.02, row_group_size=65536,
    )


def ensure_dataset(rows: int, cache_dir: str | None):
    cfg = world_config(rows)
    world = SyntheticWorld(cfg)
    out = os.path.join(cache_root(cache_dir), "bench_data", cfg.fingerprint())
    gen = None
    if not os.path.exists(os.path.join(out, "world.json")):
        t0 = time.perf_counter()
        world.write(out, overwrite=True)
        gen = time.perf_counter() - t0
    schema = world.schema()
    assert len(schema.sparse_features) == 20 and len(schema.dense_features) == 10
    assert len(schema.sequence_features) == 2
    return world, schema, out, gen


def time_epochs(make_iter, repeats: int):
    """Median wall seconds, median CPU seconds and rows of a full pass (warm-up pass excluded)."""
    times, cpus, rows = [], [], 0
    for r in range(repeats + 1):
        t0, c0 = time.perf_counter(), cpu_seconds()
        rows = 0
        for batch in make_iter(r):
            rows += batch.batch_size
        if r:  # the first pass warms the page cache and the allocator
            times.append(time.perf_counter() - t0)
            cpus.append(cpu_seconds() - c0)
    return statistics.median(times), statistics.median(cpus), rows


def naive_rate(path: str, schema: Schema, batch_size: int, max_rows: int, repeats: int):
    """rows/s of reading the same row groups + to_pylist + per-row Python + Python collate."""
    def run():
        pf = pq.ParquetFile(path)
        done = 0
        t0, c0 = time.perf_counter(), cpu_seconds()
        for rg in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(rg)
            for off in range(0, table.num_rows, batch_size):
                chunk = table.slice(off, min(batch_size, max_rows - done))
                reference_batch(chunk, schema, domain="all", truth=True)
                done += chunk.num_rows
                if done >= max_rows:
                    return done, time.perf_counter() - t0, cpu_seconds() - c0
        return done, time.perf_counter() - t0, cpu_seconds() - c0

    results = [run() for _ in range(repeats)]
    rows = results[0][0]
    return rows / statistics.median(t for _, t, _ in results), rows / statistics.median(c for _, _, c in results), rows
