"""How much of bench_quality's LR -> oracle AUC gap can a model learn from the mdmo world's training rows? The
oracle, its ablations (each planted term removed) and two generous learnability ceilings (user, then user and item
factors estimated from the training rows), per (domain, task): :mod:`lattice.benchmark.planted`.

    python benchmarks/quality_ceiling.py                 # mdmo.yaml's world and its train split
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lattice.benchmark.planted import ceilings, load_config  # noqa: E402
from lattice.data.synthetic import SyntheticWorld  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(HERE), "configs", "mdmo.yaml"))
    ap.add_argument("--train-fraction", type=float, default=0.8, help="the time split's training share")
    ap.add_argument("--test-rows", type=int, default=40000, help="test rows per domain (last 10 %% of the span)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    rows = ceilings(SyntheticWorld(cfg), args.train_fraction, args.test_rows)
    train_rows = sum(int(round(d.rows * args.train_fraction)) for d in cfg.domains)
    print(f"{train_rows} training rows ({args.train_fraction:.0%} of the span), "
          f"{args.test_rows} test rows per domain; mean AUC over {len(rows['oracle'])} (domain, task) pairs")
    for name, aucs in rows.items():
        print(f"  {name:34s} {np.mean(aucs):.4f}   " + " ".join(f"{a:.3f}" for a in aucs))
    return {name: float(np.mean(a)) for name, a in rows.items()}


if __name__ == "__main__":
    main()
