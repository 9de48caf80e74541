"""Int8 row-wise quantized pooling forward against the fp32 forward on CPU (inference).

Workload: 26 tables x 100k rows x D=64, bag lengths uniform in [1, 40], uniformly random ids (bench_pooling's
``Workload``), at B=512 and 2048. ``torch.ops.lattice.jagged_embedding_pool`` over the fp32 table and
``jagged_embedding_pool_int8`` over the same table quantized (``quantize_rows_int8``) are timed in interleaved
rounds (one call of each per round, ``lattice.benchmark.timing.timeit_rounds``), so drift in the machine hits both
alike. Printed per batch size: medians, int8 time / fp32 time, table bytes int8 / fp32; the int8 output is
checked against the dequantized reference (a disagreement makes the exit status 1). JSON to ``--out``. Nothing is
asserted about time.

    python benchmarks/bench_pooling_int8.py            # the issue's workload
    python benchmarks/bench_pooling_int8.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.pooling import measure_int8  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="4 tables x 2k rows, B=64, 5 rounds")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_pooling_int8.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.tables, a.rows, a.batch, a.repeats, a.warmup = 4, 2000, [64], 5, 1
    results = [measure_int8(a.tables, a.rows, a.dim, B, a.max_len, a.repeats, a.warmup, seed=i)
               for i, B in enumerate(a.batch)]
    print(f"int8 vs fp32 pooling forward, {a.tables} tables x {a.rows} rows x D={a.dim}, "
          f"{torch.get_num_threads()} threads, medians of {a.repeats} interleaved rounds")
    print(f"{'B':>6} {'fp32 ms':>9} {'int8 ms':>9} {'int8/fp32':>10} {'bytes ratio':>12} {'agrees':>7}")
    for r in results:
        print(f"{r['B']:>6} {r['fp32_median_ms']:>9.3f} {r['int8_median_ms']:>9.3f} {r['int8_over_fp32_time']:>10.3f} "
              f"{r['table_bytes_ratio']:>12.4f} {str(r['agrees']):>7}")
    write_json({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "results": results}, a.out)
    return 0 if all(r["agrees"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
