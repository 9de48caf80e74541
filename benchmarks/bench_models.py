"""Cost of every lattice network at a given size: parameters, analytic FLOPs per sample, and measured
forward / training-step time on batches of the planted synthetic world.

    python benchmarks/bench_models.py                      # the sizes of configs/*.yaml, batch 1024
    python benchmarks/bench_models.py --networks LatticeNetwork InterFormer --threads 2

Sizes come from the shipped configs (``model.network.init_args``): ``LatticeNetwork`` from
configs/quickstart.yaml, ``LatticeNetwork-mdmo`` from configs/mdmo.yaml, every other network from its
own config (configs/interformer.yaml, ...); ``--builtin`` uses the sizes in
:data:`lattice.benchmark.models.QUICKSTART` instead.

Prints a table (medians over ``--steps`` timed steps after ``--warmup``) and writes JSON to ``--out``.
Timings on a shared machine are noisy; the parameter and FLOP counts are exact.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.models import (CONFIGS, QUICKSTART, measure_network, network_from_config,  # noqa: E402
                                      planted_batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--builtin", action="store_true", help="use the built-in QUICKSTART sizes, not configs/")
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows-scale", type=float, default=0.1, help="fraction of the default world's rows to generate")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "models.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schema, batches = planted_batches(args.batch_size, args.warmup + args.steps, args.cache_dir, args.rows_scale)
    rows = []
    for name in args.networks:
        cls, kwargs = QUICKSTART[name.split("-")[0]] if args.builtin else network_from_config(name, args.config_dir)
        rows.append(measure_network(name, cls, kwargs, schema, batches, args.warmup, args.steps))
    header = f"{'network':<20}{'params':>10}{'dense':>10}{'MFLOP@maxlen':>13}{'MFLOP@meanlen':>14}{'fwd ms':>9}{'step ms':>9}{'samples/s':>11}"
    print(f"batch {args.batch_size}, {args.threads} threads, median of {args.steps} (FLOPs per sample)")
    print(header)
    for r in rows:
        print(
            f"{r['network']:<20}{r['params']:>10,}{r['dense_params']:>10,}{r['mflops_per_sample']:>13.3f}"
            f"{r['mflops_per_sample_mean_len']:>14.3f}{r['forward_ms']:>9.1f}{r['train_step_ms']:>9.1f}"
            f"{r['train_samples_per_s']:>11.0f}"
        )
    write_json(dict(batch_size=args.batch_size, threads=args.threads, steps=args.steps, results=rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
