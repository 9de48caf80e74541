"""CPU benchmark of lattice's jagged attention kernel against padded ``scaled_dot_product_attention`` and the
pure-torch reference, forward and forward+backward, over cases (``summary``, ``self-causal``, ``full``,
``full-summary``) x B x H x Dh. The cases, baselines and FLOP convention: :mod:`lattice.benchmark.attention`.
Prints medians, ratios (baseline time / ours: > 1 means lattice is faster) and GFLOP/s beside the machine's
matmul GFLOP/s; writes JSON (``--out``). Never asserts on time.

    python benchmarks/bench_attention.py            # the full grid (minutes)
    python benchmarks/bench_attention.py --quick    # a smoke run (seconds)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lattice  # noqa: E402,F401  (registers torch.ops.lattice)
from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.attention import CASES, run  # noqa: E402


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["summary", "self-causal", "full"], choices=CASES)
    parser.add_argument("--batch", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--heads", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--dims", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--reference-max-gb", type=float, default=0.7,
                        help="skip the reference where one padded score tensor exceeds this (it keeps several)")
    parser.add_argument("--no-sdpa-is-causal", dest="sdpa_is_causal", action="store_false")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: CPU seconds of all threads (a steadier measure of work on a shared, "
                        "overloaded machine; it counts spinning threads and hides parallel inefficiency)")
    parser.add_argument("--quick", action="store_true", help="smoke run: B=64, H=2, Dh=32, 2 repeats")
    parser.add_argument("--out", default=os.path.join(here, "results", "bench_attention.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.heads, args.dims, args.repeat, args.matmul_size = [64], [2], [32], 2, 512
    result = run(**{k: v for k, v in vars(args).items() if k not in ("quick", "out")})
    write_json(result, args.out)


if __name__ == "__main__":
    main()
