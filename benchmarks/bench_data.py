"""Data-loading throughput: lattice's streaming reader vs a naive ``to_pylist`` + Python-collate loader.

Both build the same :class:`lattice.data.Batch` es from the same Parquet file: a planted-world dataset
with 20 sparse, 10 dense and 2 sequence features (1M rows by default). The naive loader (the row-by-row
reference :func:`lattice.data.reference.reference_batch`, i.e. ``to_pylist`` + a Python loop per row +
Python collate) is measured on the first ``--naive-rows`` rows and reported as rows/s.

    python benchmarks/bench_data.py            # 1M rows
    python benchmarks/bench_data.py --quick    # 100k rows, a smoke run

Prints a table of medians and ratios and writes JSON (``--out``, default
``benchmarks/results/bench_data.json``). Never asserts on time. Targets (issue 4): >= 20x the naive
loader and >= 300k rows/s on 2 cores. Besides wall-clock rows/s it reports rows per CPU-second
(this process and its DataLoader workers), which other load on the machine disturbs far less.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.data import ensure_dataset, naive_rate, time_epochs  # noqa: E402
from lattice.data import LatticeDataLoader, ParquetBatchDataset  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100k rows, fewer repeats")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--naive-rows", type=int, default=20_000)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--read-threads", type=int, default=1, help="read-ahead threads of the reader")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_data.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.repeats, args.naive_rows = 100_000, 1, min(args.naive_rows, 8192)
    torch.set_num_threads(1)

    world, schema, data_dir, gen_seconds = ensure_dataset(args.rows, args.cache_dir)
    sources = world.sources(data_dir)
    path = os.path.join(data_dir, "all", "part-00000.parquet")
    results = []

    def ours(name, shuffle, workers):
        ds = ParquetBatchDataset(sources, schema, batch_size=args.batch_size, shuffle=shuffle, shuffle_buffer=65536,
                                 read_threads=args.read_threads)
        if workers == 0:
            make = lambda r: ds.iter_shard(r, 0, 1, 0, 1)  # noqa: E731
        else:
            loader = LatticeDataLoader(ds, num_workers=workers)
            make = lambda r: loader  # noqa: E731  (each pass is the next epoch)
        secs, cpu, rows = time_epochs(make, args.repeats)
        assert rows == args.rows, (rows, args.rows)
        results.append({"name": name, "rows": rows, "seconds": secs, "rows_per_s": rows / secs,
                        "cpu_seconds": cpu, "rows_per_cpu_s": rows / cpu, "shuffle": shuffle, "workers": workers})

    for w in args.workers:
        ours(f"lattice reader, {w} workers, in order", False, w)
        ours(f"lattice reader, {w} workers, shuffled", True, w)
    naive, naive_cpu, naive_rows = naive_rate(path, schema, args.batch_size, args.naive_rows,
                                              max(1, min(args.repeats, 2)))
    results.append({"name": "naive to_pylist + Python collate", "rows": naive_rows, "seconds": naive_rows / naive,
                    "rows_per_s": naive, "cpu_seconds": naive_rows / naive_cpu, "rows_per_cpu_s": naive_cpu})
    for r in results:
        r["x_naive"] = r["rows_per_s"] / naive

    best = max(r["rows_per_s"] for r in results[:-1])
    print(f"\nbench_data: {args.rows:,} rows, 20 sparse / 10 dense / 2 sequence features, batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs")
    if gen_seconds is not None:
        print(f"planted world generated in {gen_seconds:.1f} s ({args.rows / gen_seconds:,.0f} rows/s)")
    print(f"{'loader':<44}{'rows':>11}{'median s':>11}{'rows/s':>13}{'x naive':>10}{'rows/CPU-s':>13}")
    for r in results:
        print(f"{r['name']:<44}{r['rows']:>11,}{r['seconds']:>11.3f}{r['rows_per_s']:>13,.0f}{r['x_naive']:>10.1f}"
              f"{r['rows_per_cpu_s']:>13,.0f}")
    best_row = max(results[:-1], key=lambda r: r["rows_per_s"])
    print(f"best: {best:,.0f} rows/s = {best / naive:.1f}x naive ({best_row['name']}; "
          f"targets: >= 300,000 rows/s, >= 20x)")
    print("rows/CPU-s: rows per second of CPU time of the process and its DataLoader workers (robust to other load)")
    report = {
        "benchmark": "bench_data",
        "rows": args.rows, "batch_size": args.batch_size, "features": {"sparse": 20, "dense": 10, "sequence": 2},
        "generation_seconds": gen_seconds,
        "results": results,
        "best_rows_per_s": best, "best_x_naive": best / naive, "best_loader": best_row["name"],
        "read_threads": args.read_threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "torch": torch.__version__},
    }
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
