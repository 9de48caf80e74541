"""Quality benchmark on the planted world of configs/mdmo.yaml: does one consolidated LatticeNetwork beat
per-domain models (a), the multi-task baselines (b: SharedBottom, MMoE, PLE) and InterFormer (c), and how close
does it get to the oracle? Every model is built by the ``lattice`` CLI parser from mdmo.yaml stacked with its own
config, trained for the same epochs, keeps its best validation epoch and is tested per (domain, task) beside the
planted truth's oracle AUC. The study, its targets and its options: :mod:`lattice.benchmark.quality`.

    python benchmarks/bench_quality.py --quick          # smoke run on a tiny world (about a minute)
    python benchmarks/bench_quality.py                  # the full run
    python benchmarks/bench_quality.py --models lr lattice --epochs 2 --threads 2
    python benchmarks/bench_quality.py --network-arg standardize_dense=true wide=true
    python benchmarks/bench_quality.py --models lattice interformer --epochs 2 --seed 0 1 2 3

Writes JSON to ``--out`` (default benchmarks/results/bench_quality.json). Times are wall-clock on
whatever machine runs it; nothing is asserted on them.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks._common import quiet_lightning, write_json  # noqa: E402
from lattice.benchmark.quality import MODELS, network_overrides, run  # noqa: E402


def parse_network_arg(text: str) -> Tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"--network-arg takes NAME=VALUE, got {text!r}")
    return name, value




def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny world, one epoch: a smoke run")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--epochs", type=int, default=None, help="epochs for every model (default: the config's max_epochs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--config-dir", default=os.path.join(ROOT, "configs"))
    p.add_argument("--config", default="mdmo.yaml", help="the base config (world, data, LatticeNetwork, optimizer)")
    p.add_argument("--per-domain-config", default=None,
                   help="config stacked onto the base for the per-domain models (default: the base's LatticeNetwork)")
    p.add_argument("--per-domain-min-steps", type=int, default=64,
                   help="a per-domain model's batch halves (to 64 at least) until an epoch has this many steps")
    p.add_argument("--eval-rows", type=int, default=None,
                   help="test rows per domain at least (default 20000, --quick 1000); see lattice.benchmark.quality")
    p.add_argument("--margin", type=float, default=0.01, help="target (2): the AUC margin on the data-poor domain")
    p.add_argument("--gap-target", type=float, default=0.8, help="target (3): share of the LR -> oracle gap")
    p.add_argument("--seed", type=int, nargs="+", default=None,
                   help="seed_everything (default: the config's). Several seeds train every model once per seed; "
                        "the tables and targets then use the means over the seeds, and the report adds each "
                        "model's standard error and lattice's paired difference to every rival")
    p.add_argument("--network-arg", nargs="+", action="extend", type=parse_network_arg, default=[],
                   metavar="NAME=VALUE",
                   help="an init argument given to every model's network that accepts it (the same help for all, "
                        "e.g. standardize_dense=true wide=true); an argument no selected model accepts is an error")
    p.add_argument("--cache-dir", default=None, help="where the world is generated (default: lattice's cache)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_quality.json"))
    args = p.parse_args(argv)
    unused = {k for k, _ in args.network_arg} - {
        k for key in args.models for k in network_overrides(args, args.per_domain_config if MODELS[key][3]
                                                             else MODELS[key][2])[1]}
    if unused:
        p.error(f"--network-arg {sorted(unused)}: no selected model's network accepts it")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_rows is None:
        args.eval_rows = 1000 if args.quick else 20000
    quiet_lightning(logging.ERROR)
    keep_work = args.work is not None
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="bench_quality-"))
    os.makedirs(args.work, exist_ok=True)
    t_start = time.perf_counter()

    result = run(args, t_start)
    write_json(result, args.out)
    if not keep_work:
        shutil.rmtree(args.work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
