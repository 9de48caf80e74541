"""Distillation benchmark on the planted world: does a small per-domain student inherit a big teacher's quality
without its bias and staleness (ExFM, arXiv 2502.17494)? A teacher over every domain (and a stale one) logs its
logits out of fold for the student's rows; the same small student trains nine ways (labels only, soft labels,
auxiliary head, adapter, against the fresh and the stale teacher) and is tested on the student domain's future
rows. The study, its variants and its targets: :mod:`lattice.benchmark.distill`.

    python benchmarks/bench_distill.py --quick          # a small smoke run (minutes on 2 cores)
    python benchmarks/bench_distill.py --seeds 5        # the full run, students averaged over 5 seeds
    python benchmarks/bench_distill.py --seeds 5 --variants stale_soft_label,stale_soft_adapter  # a subset

Writes JSON to ``--out`` (default ``benchmarks/results/bench_distill.json``).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from typing import Any, Dict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks._common import quiet_lightning, write_json  # noqa: E402
from lattice.benchmark.distill import ADAPTER_HALF_LIFE_DAYS, RATE_DRIFT, STUDENTS, run  # noqa: E402


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small world, few epochs: a smoke run")
    p.add_argument("--domain", default="shop", help="the student's domain")
    p.add_argument("--seed", type=int, default=0, help="world and teacher seed")
    p.add_argument("--seeds", type=int, default=1, help="student seeds to average over")
    p.add_argument("--drift", type=float, default=0.6, help="planted drift of user factors / item popularity over time")
    p.add_argument("--rate-drift", type=float, default=RATE_DRIFT,
                   help="planted base-rate drift: logit change of every task's rate over the span (staleness "
                        "a student adapter can correct)")
    p.add_argument("--stale-fraction", type=float, default=0.4)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--teacher-folds", type=int, default=2,
                   help="cross-fit folds for out-of-sample teacher logging (1: in-sample, the teacher scores rows "
                        "it trained on)")
    p.add_argument("--teacher-epochs", type=int, default=None)
    p.add_argument("--student-epochs", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.15,
                   help="hash-split share of each training slice held out to pick the best epoch")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--student-batch-size", type=int, default=64)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-weights", default="3,10",
                   help="comma-separated grid, e.g. 1,3: every distilled variant keeps the weight with the lowest "
                        "mean validation loss over its seeds; '' = --distill-weight only")
    p.add_argument("--variants", default=",".join(name for name, _, _ in STUDENTS),
                   help="comma-separated students to train (default: all); a target whose variants are left out "
                        "is reported as not measured, and a teacher no chosen variant uses is not trained")
    p.add_argument("--aux-hidden-dims", default="",
                   help="hidden sizes of the auxiliary head's per-task MLPs, comma-separated (default '': a linear "
                        "head on the shared hidden layer)")
    p.add_argument("--aux-input", default="head_hidden", choices=["backbone", "head_hidden"],
                   help="where the auxiliary head branches off (DistillationModule.aux_input; the aux_head_backbone "
                        "variant always uses 'backbone')")
    p.add_argument("--adapter-half-life-days", type=float, default=ADAPTER_HALF_LIFE_DAYS,
                   help="the student adapter learns from the freshest labels: row weight 2^(-age/half-life), age "
                        "from the newest event seen (DistillationModule.adapter_half_life); 0: every row alike")
    p.add_argument("--teacher-network", default="LatticeNetwork", help="a lattice.models class")
    p.add_argument("--student-network", default="LatticeNetwork", help="a lattice.models class")
    p.add_argument("--sparse-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "sgd", "none"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed at the end)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_distill.json"))
    args = p.parse_args(argv)
    known = [name for name, _, _ in STUDENTS]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in known]
    if unknown or not variants:
        p.error(f"--variants: {unknown or 'none given'} not among {known}")
    students = [s for s in STUDENTS if s[0] in variants]
    try:
        aux_hidden = [int(h) for h in args.aux_hidden_dims.split(",") if h.strip()]
    except ValueError:
        p.error(f"--aux-hidden-dims must be comma-separated integers, got {args.aux_hidden_dims!r}")
    if any(h <= 0 for h in aux_hidden):
        p.error(f"--aux-hidden-dims must be > 0, got {args.aux_hidden_dims!r}")
    try:
        weights = ([float(w) for w in args.distill_weights.split(",") if w.strip()] if args.distill_weights.strip()
                   else [args.distill_weight])
    except ValueError:
        p.error(f"--distill-weights must be comma-separated numbers, got {args.distill_weights!r}")
    if not weights or any(not (math.isfinite(w) and w >= 0) for w in weights):
        p.error(f"--distill-weights must be numbers >= 0, got {args.distill_weights!r}")
    if not (math.isfinite(args.adapter_half_life_days) and args.adapter_half_life_days >= 0):
        p.error(f"--adapter-half-life-days must be >= 0, got {args.adapter_half_life_days}")
    if args.teacher_folds < 1:
        p.error(f"--teacher-folds must be >= 1, got {args.teacher_folds}")
    args.teacher_epochs = args.teacher_epochs or 3
    args.student_epochs = args.student_epochs or 8
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_lightning()

    work = args.work or tempfile.mkdtemp(prefix="bench_distill-")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    report = run(args, work, students, weights, aux_hidden)
    write_json(report, args.out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
