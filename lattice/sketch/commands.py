"""``lattice sketch``: budgeted search over a config space on Optuna, or (``--lr-find``) a learning-rate range test.

::

    lattice sketch --space configs/sketch/quickstart.yaml --n-trials 12 --budget 10m
    lattice sketch --space S.yaml --config configs/mdmo.yaml --budget 20m --n-jobs 2 --out runs/sketch
    lattice sketch --lr-find --config configs/quickstart.yaml
"""
from __future__ import annotations

import argparse
import re
from typing import Optional, Sequence

__all__ = ["main", "parse_budget"]


def parse_budget(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"--budget {text!r}: expected a wall time such as 600, 90s, 10m or 1.5h")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lattice sketch", exit_on_error=False,
                                description="Budgeted search over a lattice config space (Optuna), or --lr-find.")
    p.add_argument("--space", help="the sketch file: space, base configs, objective, constraints")
    p.add_argument("--config", action="append", default=[],
                   help="base lattice config (repeat to stack, as for lattice fit); replaces the sketch file's base")
    p.add_argument("--out", default="runs/sketch", help="output folder (default runs/sketch)")
    p.add_argument("--n-trials", type=int, help="total trials of the study (a resumed study runs the rest)")
    p.add_argument("--budget", help="wall time of this run: 600, 90s, 10m, 1.5h (checked between trials)")
    p.add_argument("--storage", help="study storage: a database URL (default sqlite:///OUT/study.db) or a .journal "
                                     "file (default OUT/study.journal with --n-jobs > 1)")
    p.add_argument("--study-name", default="sketch")
    p.add_argument("--n-jobs", type=int, help="trials at once, each in its own process (default 1)")
    p.add_argument("--seed", type=int, help="sampler seed (worker i uses seed + i; default 0)")
    p.add_argument("--sampler", help="tpe (default) or random")
    p.add_argument("--n-startup-trials", type=int,
                   help="TPE's random trials before it models the results (default Optuna's, 10); >= 0")
    p.add_argument("--pruner", help="sha (successive halving, default), hyperband, median or none")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: the base config's); kept in best.yaml")
    p.add_argument("--reports-per-epoch", type=int, help="validations per epoch the pruner sees (default 2)")
    p.add_argument("--limit-train-batches", type=float, help="Lightning's limit_train_batches for trials")
    # every search option also has a default in the sketch file's `search:` section
    p.add_argument("--limit-val-batches", type=float, help="Lightning's limit_val_batches for trials")
    p.add_argument("--lr-find", action="store_true", help="run a learning-rate range test on --config instead")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--lr-steps", type=int, default=100, help="training steps of the range test")
    return p


def _limit(value: Optional[float]):
    return int(value) if value is not None and value > 1 and float(value).is_integer() else value


def main(argv: Sequence[str]) -> None:
    """Runs ``lattice sketch ARGS`` (``argv`` starts with ``"sketch"``); bad input raises ``ValueError``."""
    args = _parser().parse_args(list(argv)[1:])
    if args.lr_find:
        from lattice.sketch.lr_find import find_lr

        if not args.config:
            raise ValueError("lattice sketch --lr-find needs --config")
        found = find_lr(args.config, args.out, args.min_lr, args.max_lr, args.lr_steps)
        print(f"suggested learning rate: {found['suggestion']}")
        print(f"apply it with: lattice fit --config ... {found['override']}")
        print(f"wrote {found['plot']}")
        return
    if not args.space:
        raise ValueError("lattice sketch needs --space (a sketch file), or --lr-find")
    from lattice.sketch.results import best_trial, write_results
    from lattice.sketch.search import SearchOptions, run_search, trial_counts
    from lattice.sketch.spec import SEARCH_KEYS, SketchSpec

    spec = SketchSpec.load(args.space, args.config)
    chosen = dict(spec.search)  # the sketch file's defaults; the command line wins
    chosen.update({k: v for k in SEARCH_KEYS if (v := getattr(args, k)) is not None})
    budget = chosen.pop("budget", None)
    for name in ("limit_train_batches", "limit_val_batches"):
        chosen[name] = _limit(chosen.get(name))
    options = SearchOptions(out_dir=args.out, storage=args.storage, study_name=args.study_name,
                            timeout_s=None if budget is None else parse_budget(str(budget)), **chosen)
    study = run_search(spec, options)
    written = write_results(study, options.out_dir, spec.objective, spec.constraints.flops_per_sample is not None)
    counts = trial_counts(study)
    print(f"study {options.study_name!r} in {options.storage}: "
          + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())))
    best = best_trial(study)
    if best is None:
        print("no trial completed within the constraints: no best.yaml")
    else:
        print(f"best: trial {best.number}, {spec.objective.label} {best.value:.5f}, params {best.params}")
    for path in written.values():
        print(f"wrote {path}")
