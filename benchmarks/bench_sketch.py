"""Lattice Sketch against the shipped config and random search on the mdmo planted world.

Three arms through the same trial machinery (lattice.sketch: one config per trial, trained with Lightning,
scored by the best validation mean AUC it reached, FLOPs per sample from the network):

- ``shipped``: ``configs/mdmo.yaml`` as it is (one trial whose space is the config's own learning rate);
- ``random``: random search over the space below, no pruning;
- ``sketch``: TPE with successive-halving pruning over the same space.

TPE draws its first ``--n-startup-trials`` trials at random (default 4 here, so that a small budget reaches the
model-guided trials; Optuna's own default is 10). Each arm's sampler has its own seed derived from ``--seed``
(recorded in the JSON): with one shared seed, TPE's random start-up trials would be random search's own draws.

The two searches run in interleaved rounds, one trial each per round (each arm's study resumes from its own
SQLite file), so a machine shared with other work slows both alike; an arm starts no new trial once its own
trials have used ``--budget / 2`` seconds, so its last trial may run past that. Both searches share a
FLOPs-per-sample bound of 4x the shipped model's. ``--budget 1200`` (the default) takes about 20 minutes plus
the shipped run; ``--smoke`` runs 2 trials each on a tiny world. Prints a table and writes JSON (``--out``).

    python benchmarks/bench_sketch.py                   # ~20 min + the shipped run
    python benchmarks/bench_sketch.py --scale 0.05 --budget 720 --max-epochs 1 --out sketch.json  # busy 2 cores
    python benchmarks/bench_sketch.py --smoke --out /tmp/sketch.json
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from typing import Any, Dict, Optional

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks._common import fmt, machine, print_table, quiet_lightning, write_json  # noqa: E402
from lattice.sketch.constraints import Constraints  # noqa: E402
from lattice.sketch.objective import Objective  # noqa: E402
from lattice.sketch.results import best_trial  # noqa: E402
from lattice.sketch.search import SearchOptions, base_config, run_search, trial_counts  # noqa: E402
from lattice.sketch.spec import SketchSpec  # noqa: E402

MDMO = os.path.join(ROOT, "configs", "mdmo.yaml")

SPACE = {
    "model.optimizer.init_args.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True},
    "model.network.init_args.dim": {"choices": [16, 32, 64]},
    "model.network.init_args.num_layers": {"low": 1, "high": 3},
    "model.network.class_path": {"choices": ["lattice.models.LatticeNetwork", "lattice.models.MMoE",
                                             "lattice.models.InterFormer"]},
    "data.batch_size": {"choices": [512, 1024, 2048]},
}

# --smoke: the mdmo config on a tiny world (stacked after it), one epoch.
SMOKE = {
    "trainer": {"max_epochs": 1},
    "data": {"batch_size": 128, "synthetic": {"num_users": 150, "num_items": 80, "domains": [
        {"name": "feed", "rows": 700}, {"name": "shop", "rows": 300, "absent_features": ["price"]}]}},
}


def _scaled_world(scale: float, work: str) -> str:
    """A config stacked after mdmo.yaml whose domains keep their fields but have ``scale`` times the rows."""
    if not 0.0 < scale <= 1.0:
        raise SystemExit(f"bench_sketch: --scale must be in (0, 1], got {scale}")
    with open(MDMO) as f:
        domains = yaml.safe_load(f)["data"]["synthetic"]["domains"]
    for domain in domains:
        domain["rows"] = max(200, round(domain["rows"] * scale))
    path = os.path.join(work, "scaled.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"data": {"synthetic": {"domains": domains}}}, f)
    return path


def _row(name: str, study, wall: float) -> Dict[str, Any]:
    best = best_trial(study)
    row: Dict[str, Any] = {"method": name, "wall_s": wall, "trials": trial_counts(study)}
    if best is not None:
        row.update(best_mean_auc=best.value, flops_per_sample=best.user_attrs.get("flops_per_sample"),
                   num_parameters=best.user_attrs.get("num_parameters"), params=best.params, trial=best.number)
    return row


def _interleaved(arms: Dict[str, tuple], budget_s: Optional[float], n_trials: Optional[int]) -> tuple:
    """Runs ``arms`` (name -> (spec, options)) one trial each per round until every arm has spent ``budget_s``
    seconds (or run ``n_trials`` trials). Returns ``([(round, name, seconds)], {name: study}, {name: seconds})``."""
    spent = {name: 0.0 for name in arms}
    studies: Dict[str, Any] = {}
    log = []
    for round_ in itertools.count():
        active = [name for name in arms if (n_trials is None or round_ < n_trials)
                  and (budget_s is None or spent[name] < budget_s)]
        if not active:
            return log, studies, spent
        for name in active:
            spec, options = arms[name]
            start = time.perf_counter()
            studies[name] = run_search(spec, dataclasses.replace(options, n_trials=round_ + 1))
            seconds = time.perf_counter() - start
            spent[name] += seconds
            log.append((round_, name, seconds))
            print(f"round {round_}: {name} trial {round_} took {seconds:.0f} s ({spent[name]:.0f} s spent)",
                  flush=True)


ARMS = ("shipped", "random", "sketch")


def arm_seeds(seed: int) -> Dict[str, int]:
    """Independent sampler seeds for the arms, derived from ``seed``. Adjacent integers would not do: a study resumed
    at round ``r`` seeds its sampler with ``seed + r`` (lattice.sketch.search), so arms seeded ``s`` and ``s + 1``
    would draw each other's trials one round apart. 31 bits, so that ``seed + r`` stays a valid NumPy seed."""
    children = np.random.SeedSequence(seed).spawn(len(ARMS))
    return {arm: int(child.generate_state(1)[0] >> 1) for arm, child in zip(ARMS, children)}


def main(argv: Optional[list] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=1200.0, help="seconds for the two searches together")
    p.add_argument("--smoke", action="store_true", help="tiny world, 2 trials per search")
    p.add_argument("--max-epochs", type=int, default=None, help="epochs of every run (default: mdmo.yaml's)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="the mdmo world with every domain's rows times this (the same users, items and tasks)")
    p.add_argument("--seed", type=int, default=0, help="the arms' sampler seeds are derived from it")
    p.add_argument("--n-startup-trials", type=int, default=4,
                   help="Sketch's random trials before TPE models the results (default 4)")
    p.add_argument("--work", default=None, help="scratch folder kept afterwards (default: temporary, removed)")
    p.add_argument("--out", default=None, help="JSON report path")
    args = p.parse_args(argv)
    quiet_lightning()
    seeds = arm_seeds(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or scratch
        os.makedirs(work, exist_ok=True)
        base = [MDMO]
        limits: Dict[str, Any] = {}
        if args.smoke:
            smoke = os.path.join(work, "smoke.yaml")
            SMOKE["data"]["cache_dir"] = os.path.join(work, "cache")
            with open(smoke, "w") as f:
                yaml.safe_dump(SMOKE, f)
            base.append(smoke)
            limits = {"limit_train_batches": 2, "limit_val_batches": 2}
        elif args.scale != 1.0:
            base.append(_scaled_world(args.scale, work))
        lr = base_config(SketchSpec(space={}, base=base))["model"]["init_args"]["optimizer"]["init_args"]["lr"]
        shipped_spec = SketchSpec(space={"model.optimizer.init_args.lr": {"choices": [lr]}}, base=base)
        start = time.perf_counter()
        shipped = _row("shipped mdmo.yaml", run_search(shipped_spec, SearchOptions(
            out_dir=os.path.join(work, "shipped"), n_trials=1, pruner="none", seed=seeds["shipped"],
            max_epochs=args.max_epochs, **limits)),
            time.perf_counter() - start)
        print(f"shipped mdmo.yaml: {shipped['wall_s']:.0f} s", flush=True)
        bound = 4.0 * shipped["flops_per_sample"]
        spec = SketchSpec(space=SPACE, base=base, objective=Objective(),
                          constraints=Constraints(flops_per_sample=bound))
        searches = {
            "random search": (spec, SearchOptions(
                out_dir=os.path.join(work, "random"), n_trials=1, sampler="random", pruner="none",
                seed=seeds["random"], max_epochs=args.max_epochs, **limits)),
            "sketch (TPE + SHA)": (spec, SearchOptions(
                out_dir=os.path.join(work, "sketch"), n_trials=1, sampler="tpe", pruner="sha",
                seed=seeds["sketch"], n_startup_trials=args.n_startup_trials, max_epochs=args.max_epochs, **limits)),
        }
        log, studies, spent = _interleaved(searches, None if args.smoke else args.budget / 2,
                                           2 if args.smoke else None)
        rows = [shipped, *(_row(name, studies[name], spent[name]) for name in searches)]

    world = " (smoke)" if args.smoke else (f" (rows x {args.scale:g})" if args.scale != 1.0 else "")
    print(f"\nmdmo world{world}; FLOPs bound {bound:.3g}/sample; search budget "
          f"{'2 trials' if args.smoke else f'{args.budget / 2:.0f} s'} each, interleaved one trial per round"
          f"{f'; {args.max_epochs} epoch(s) per run' if args.max_epochs else ''}")
    print_table(["method", "trials (complete/pruned)", "best val mean AUC", "FLOPs/sample", "params", "wall s"],
                [[r["method"], f"{r['trials'].get('COMPLETE', 0)}/{r['trials'].get('PRUNED', 0)}",
                  fmt(r.get("best_mean_auc")), f"{r.get('flops_per_sample', float('nan')):.3g}",
                  f"{r.get('num_parameters', float('nan')):.3g}", f"{r['wall_s']:.0f}"] for r in rows])
    report = {"benchmark": "sketch", "smoke": args.smoke, "scale": args.scale, "budget_s": args.budget,
              "max_epochs": args.max_epochs, "seed": args.seed, "arm_seeds": seeds,
              "n_startup_trials": args.n_startup_trials,
              "flops_bound": bound, "space": SPACE, "rows": rows,
              "rounds": [{"round": r, "method": m, "seconds": s} for r, m, s in log], "machine": machine()}
    if args.out:
        write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
