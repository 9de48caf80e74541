"""Lattice Filter acceptance on the planted world: does feature selection find the planted noise, and does a model
retrained on the kept features lose nothing? Everything goes through lattice's own command line (``lattice fit``,
``lattice filter``, ``lattice fit`` on the kept features, ``lattice test``); the study, its targets and its
diagnostics: :mod:`lattice.benchmark.filter`.

    python benchmarks/bench_filter.py --quick      # small world and model: a smoke run (~30 s of CPU)
    python benchmarks/bench_filter.py              # configs/mdmo.yaml as shipped (about an hour on 2 busy cores)
    python benchmarks/bench_filter.py --epochs 2   # fewer epochs than the config (reported)
    python benchmarks/bench_filter.py --reanalyse benchmarks/results/bench_filter.json   # re-print a run

Targets are printed as PASS/FAIL, never asserted. Writes JSON to ``--out`` (default
``benchmarks/results/bench_filter.json``, ``bench_filter_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks._common import write_json  # noqa: E402
from lattice.benchmark.filter import reanalyse, run  # noqa: E402
from lattice.benchmark.timing import cpu_seconds  # noqa: E402


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small world and model (a smoke run, ~1 min)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "mdmo.yaml"),
                   help="training config (its world, model, seed and epochs); ignored with --quick")
    p.add_argument("--epochs", type=int, default=None, help="override the config's max_epochs (both models)")
    p.add_argument("--seeds", type=int, default=1, help="train both models with this many seeds, average AUCs")
    p.add_argument("--repeats", type=int, default=None, help="filter: permutations per feature (3; 2 with --quick)")
    p.add_argument("--filter-seed", type=int, default=0, help="filter: seed of permutations and random fill")
    p.add_argument("--max-rows", type=int, default=None, help="filter: validation rows (default: the command's)")
    p.add_argument("--auc-tolerance", type=float, default=0.002)
    p.add_argument("--no-plot", action="store_true", help="skip the filter's PNG")
    p.add_argument("--cache-dir", default=None, help="where the planted world is generated (default lattice's cache)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--work", default=None, help="scratch folder kept afterwards (default: temporary, removed)")
    p.add_argument("--verbose", action="store_true", help="show Lightning's and the CLI's own output")
    p.add_argument("--out", default=None)
    p.add_argument("--reanalyse", default=None, metavar="JSON",
                   help="recompute and print the analysis of a saved run's JSON (no training)")
    args = p.parse_args(argv)
    if args.reanalyse:
        return reanalyse(args.reanalyse, args.out, ROOT)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.out is None:
        args.out = os.path.join(HERE, "results", "bench_filter_quick.json" if args.quick else "bench_filter.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.verbose:
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*")
        warnings.filterwarnings("ignore", ".*Unable to serialize instance.*")  # the saved config.yaml; not used here
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
    t_start, cpu_start = time.perf_counter(), cpu_seconds()
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench_filter-"))
    os.makedirs(work, exist_ok=True)
    try:
        report = run(args, work, ROOT)
        report["total_wall_s"] = time.perf_counter() - t_start
        report["total_cpu_s"] = cpu_seconds() - cpu_start
        print(f"\ntotal {report['total_wall_s']:.0f} s wall, {report['total_cpu_s']:.0f} s CPU (wall: fit full "
              f"{sum(report['full']['fit_s']):.0f} s, filter {report['filter']['seconds']:.0f} s, fit filtered "
              f"{sum(report['filtered']['fit_s']):.0f} s)")
        write_json(report, os.path.abspath(args.out))
        return report
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
