"""Benchmark of lattice's fused jagged embedding pooling on CPU against torch and FBGEMM baselines: forward,
forward + backward and a full training step of the embeddings, with bandwidth references timed in the same
interleaved rounds. The study, its workload and what each printed figure means: :mod:`lattice.benchmark.pooling`.
Each configuration is first checked against torch on its own tensors; a disagreement makes the exit status 1.
Nothing is asserted about time.

    python benchmarks/bench_pooling.py                # full run (needs ~15 GB free for 1M x 128)
    python benchmarks/bench_pooling.py --quick        # small smoke run
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lattice  # noqa: E402
from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.pooling import (HAVE_FBGEMM, Workload, measure_config, mem_available_bytes,  # noqa: E402
                                       stream_read_bandwidth, stream_update_bandwidth)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["forward", "fwd+bwd", "step"],
                   choices=["forward", "fwd+bwd", "step"])
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-torch reference")
    p.add_argument("--no-loop", action="store_true", help="skip the nn.EmbeddingBag loop")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1- vs N-thread measurement")
    p.add_argument("--stream-gib", type=float, default=1.0, help="buffer size of the bandwidth probe")
    p.add_argument("--memory-fraction", type=float, default=0.7,
                   help="skip a configuration (or its extra-copy baselines) above this share of MemAvailable")
    p.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_pooling.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dims, args.batch, args.repeats, args.warmup = [20_000], [64], 256, 3, 1
        args.stream_gib = min(args.stream_gib, 0.25)

    torch.set_num_threads(args.threads)
    print(f"lattice {lattice.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fbgemm_gpu {'available' if HAVE_FBGEMM else 'not importable (baseline skipped)'}")
    stream = stream_read_bandwidth(args.stream_gib, max(3, args.repeats))
    print(f"streaming read bandwidth (torch.sum over {stream['bytes'] / 2**30:.2f} GiB): {stream['gbps']:.2f} GB/s "
          f"(best {stream['best_gbps']:.2f})")
    update = stream_update_bandwidth(args.stream_gib, max(3, args.repeats))
    print(f"streaming read-modify-write bandwidth (in-place add_, bytes read + written): {update['gbps']:.2f} GB/s "
          f"(best {update['best_gbps']:.2f})")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "fbgemm": HAVE_FBGEMM},
        "args": vars(args),
        "stream_read": stream,
        "stream_update": update,
        "configs": [],
    }
    all_agree = True
    for rows in args.rows:
        for D in args.dims:
            table_bytes = args.tables * rows * D * 4
            avail = mem_available_bytes()
            entry = {"tables": args.tables, "rows": rows, "dim": D, "batch": args.batch, "max_len": args.max_len}
            # the weights once, plus ~1 GB of inputs, gradients and temporaries
            if avail is not None and table_bytes + (1 << 30) > args.memory_fraction * avail:
                print(f"\n=== rows={rows:,} D={D}: skipped, needs ~{(table_bytes + (1 << 30)) / 1e9:.1f} GB, "
                      f"{avail / 1e9:.1f} GB available ===")
                entry["skipped"] = "memory"
                report["configs"].append(entry)
                continue
            w = Workload(args.tables, rows, D, args.batch, args.max_len)
            extra_copy_ok = avail is None or 2 * table_bytes + (1 << 30) <= args.memory_fraction * avail
            entry.update(measure_config(w, args.modes, args.repeats, args.warmup, args.threads, args.stream_gib,
                                        stream, update, loop=not args.no_loop, reference=not args.no_reference,
                                        scaling=not args.no_scaling, extra_copy_ok=extra_copy_ok))
            all_agree = all_agree and entry["agreement"]["ok"]
            report["configs"].append(entry)
            del w
            gc.collect()
    print()
    write_json(report, args.out)
    if not all_agree:
        print("lattice's kernels DISAGREE with torch on at least one configuration (see 'agreement' above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
