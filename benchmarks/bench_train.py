"""Throughput of a full training step of ``configs/mdmo.yaml``: data -> forward -> backward -> fused sparse +
dense optimizer, through ``lattice fit``'s own pieces (the LightningCLI config, the Parquet reader, the
Trainer).

Measured in the same run, each in a fresh process group:

- 1 process with ``--threads`` threads, 1 process with 1 thread, and 2 processes under DDP with 1 thread
  each (``configs/ddp.yaml``: the fused embedding row exchange included);
- each with lattice's kernels and with every op swapped for its pure-torch reference
  (``LATTICE_OPS=reference``), which shows what the kernels buy end to end.

Samples/s = rows trained per second over ``--steps`` steps after ``--warmup`` (per-rank batch from the
config, so 2 processes train twice the rows per step). Prints a table of medians over ``--repeats`` runs
and ratios, writes JSON to ``--out``; never asserts on time.

    python benchmarks/bench_train.py                 # full run
    python benchmarks/bench_train.py --quick         # smoke run (few steps, small world)

``--study compile`` (issue 28) instead measures, for LatticeNetwork, InterFormer and MMoE at the mdmo size on
``--threads`` threads, eager against ``model.compile`` (inductor) in interleaved rounds: samples/s of the full
step, the compile time cold (an empty inductor cache) and warm (the same cache, second process), the graphs
compiled after warm-up (recompiles) and the mean validation AUC after the same steps. "Eager" is also the
eager of before issue 28 (commit 65fd8d5): the compile work left the eager step as it was.

    python benchmarks/bench_train.py --study compile
    python benchmarks/bench_train.py --study compile --smoke   # tiny world, MMoE, aot_eager: a test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchmarks._common import write_json  # noqa: E402

CASES = [  # (name, processes, threads per process or None for --threads)
    ("1 process", 1, None),
    ("1 process, 1 thread", 1, 1),
    ("2 processes DDP, 1 thread each", 2, 1),
]
QUICK_DATA = [
    "--data.synthetic.domains",
    '[{name: feed, rows: 6000}, {name: search, rows: 3000, absent_features: [item_tags]}, '
    '{name: shop, rows: 1000, absent_features: [query_cluster]}]',
]


# ---- worker: one measured fit (re-run by Lightning's launcher for rank 1) ----------------------------
def worker(args: argparse.Namespace, cli_args: list) -> None:
    import lightning.pytorch as pl
    import torch

    from lattice.cli import run_lightning

    torch.set_num_threads(args.threads)

    class StepTimer(pl.Callback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.rows = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step  # already incremented: steps completed
            if step == args.warmup:
                self.t0 = time.perf_counter()
            elif step > args.warmup:
                self.rows += batch.batch_size * trainer.world_size
                if step == args.warmup + args.steps:
                    self.t1 = time.perf_counter()
                    trainer.should_stop = True

    timer = StepTimer()
    overrides = [
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", args.run_dir, "--metrics_table.print_table", "false",
        "--metrics_table.output_dir", args.run_dir,
    ]
    cli = run_lightning([*cli_args, *overrides], run=False)  # exactly `lattice fit`'s parser and classes
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if cli.trainer.global_rank == 0:
        if timer.t1 is None:
            raise SystemExit(f"the epoch ended before {args.warmup + args.steps} steps; lower --steps")
        with open(args.result, "w") as f:
            json.dump({"seconds": timer.t1 - timer.t0, "rows": timer.rows, "steps": args.steps,
                       "world_size": cli.trainer.world_size}, f)


# ---- compile study (issue 28) --------------------------------------------------------------------------
STUDY_NETWORKS = {  # mdmo size: configs/mdmo.yaml's LatticeNetwork, and the other two at the same width
    "LatticeNetwork": {"class_path": "lattice.models.LatticeNetwork",
                       "init_args": {"dim": 32, "num_layers": 2, "num_heads": 2, "history_match": True}},
    "InterFormer": {"class_path": "lattice.models.InterFormer",
                    "init_args": {"dim": 32, "num_layers": 2, "num_heads": 2, "history_match": True}},
    "MMoE": {"class_path": "lattice.models.MMoE", "init_args": {"dim": 32, "history_match": True}},
}


def compile_worker(args: argparse.Namespace, cli_args: list) -> None:
    """One fit of ``--warmup + --steps`` steps, then a validation pass; writes the timings to ``--result``."""
    import lightning.pytorch as pl
    import torch

    from lattice.cli import run_lightning
    from lattice.train.compile import compiled_graph_count

    torch.set_num_threads(args.threads)

    class Timer(pl.Callback):
        def __init__(self):
            self.first = self.t0 = self.t1 = None
            self.graphs_after_warmup = None
            self.rows = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step == 1:
                self.first = time.perf_counter() - self.start
            if step == args.warmup:
                self.t0 = time.perf_counter()
                self.graphs_after_warmup = compiled_graph_count()
            elif step > args.warmup:
                self.rows += batch.batch_size
                if step == args.warmup + args.steps:
                    self.t1 = time.perf_counter()
                    self.recompiles = compiled_graph_count() - self.graphs_after_warmup  # before eval's own graph

    timer = Timer()
    overrides = [
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.limit_val_batches", str(args.val_batches),
        "--trainer.val_check_interval", str(args.warmup + args.steps), "--trainer.check_val_every_n_epoch", "null",
        "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "null",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", args.run_dir, "--metrics_table.print_table", "false",
        "--metrics_table.output_dir", args.run_dir,
    ]
    cli = run_lightning([*cli_args, *overrides], run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    if timer.t1 is None:
        raise SystemExit(f"the epoch ended before {args.warmup + args.steps} steps; lower --steps")
    seconds = timer.t1 - timer.t0
    with open(args.result, "w") as f:
        json.dump({"seconds": seconds, "rows": timer.rows, "steps": args.steps, "first_step_s": timer.first,
                   "recompiles": timer.recompiles,
                   "mean_auc": cli.model.eval_results.get("val", {}).get("mean_auc", float("nan"))}, f)


def run_compile_case(network: str, compile_arg: str, inductor_cache: str, args, cache: str) -> dict:
    cli_args = ["--config", os.path.join(ROOT, "configs", "mdmo.yaml"), "--data.cache_dir", cache,
                "--model.network", json.dumps(STUDY_NETWORKS[network]), "--model.compile", compile_arg]
    if args.smoke:
        cli_args += QUICK_DATA + ["--data.batch_size", "256"]
    with tempfile.TemporaryDirectory() as run_dir:
        result = os.path.join(run_dir, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHINDUCTOR_CACHE_DIR=inductor_cache,
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--compile-worker", "--threads", str(args.threads),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--val-batches", str(args.val_batches),
               "--run-dir", run_dir, "--result", result, "--", *cli_args]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_train compile worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        with open(result) as f:
            out = json.load(f)
    out["samples_per_s"] = out["rows"] / out["seconds"]
    out["step_s"] = out["seconds"] / out["steps"]
    return out


def compile_study(args: argparse.Namespace) -> dict:
    import torch

    backend = "aot_eager" if args.smoke else "inductor"
    compiled_arg = "true" if backend == "inductor" else json.dumps({"backend": backend})
    networks = ["MMoE"] if args.smoke else args.networks
    cache = args.cache_dir or tempfile.mkdtemp(prefix="lattice-bench-train-")
    rows = []
    for network in networks:
        inductor_cache = tempfile.mkdtemp(prefix="lattice-inductor-")  # empty: the first compiled run is cold
        runs = {"eager": [], "compiled": []}
        for r in range(args.repeats):  # interleaved: eager, compiled, eager, compiled...
            runs["eager"].append(run_compile_case(network, "false", inductor_cache, args, cache))
            runs["compiled"].append(run_compile_case(network, compiled_arg, inductor_cache, args, cache))
        if args.repeats < 2:  # the warm compile needs a second compiled process
            runs["compiled"].append(run_compile_case(network, compiled_arg, inductor_cache, args, cache))
        eager_step = statistics.median(x["step_s"] for x in runs["eager"])
        row = {"network": network, "backend": backend}
        for name, rs in runs.items():
            row[f"{name}_samples_per_s"] = statistics.median(x["samples_per_s"] for x in rs)
            row[f"{name}_runs"] = [x["samples_per_s"] for x in rs]
            row[f"{name}_mean_auc"] = statistics.median(x["mean_auc"] for x in rs)
        row["speedup"] = row["compiled_samples_per_s"] / row["eager_samples_per_s"]
        row["compile_s_cold"] = runs["compiled"][0]["first_step_s"] - eager_step
        row["compile_s_warm"] = statistics.median(x["first_step_s"] for x in runs["compiled"][1:]) - eager_step
        row["recompiles_after_warmup"] = max(x["recompiles"] for x in runs["compiled"])
        row["auc_delta"] = row["compiled_mean_auc"] - row["eager_mean_auc"]
        rows.append(row)
        print(f"  {network:15s} eager {row['eager_samples_per_s']:8.0f}  compiled {row['compiled_samples_per_s']:8.0f}"
              f" samples/s", flush=True)
    print(f"\nfull training step, compiled ({backend}) vs eager, {args.threads} threads: median of {args.repeats} "
          f"interleaved rounds x {args.steps} steps after {args.warmup}{' (smoke)' if args.smoke else ''}")
    header = (f"{'network':15s} {'eager/s':>9s} {'compiled/s':>10s} {'ratio':>6s} {'cold s':>7s} {'warm s':>7s} "
              f"{'recompiles':>10s} {'AUC eager':>9s} {'AUC comp':>9s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['network']:15s} {r['eager_samples_per_s']:9.0f} {r['compiled_samples_per_s']:10.0f} "
              f"{r['speedup']:5.2f}x {r['compile_s_cold']:7.1f} {r['compile_s_warm']:7.1f} "
              f"{r['recompiles_after_warmup']:10d} {r['eager_mean_auc']:9.4f} {r['compiled_mean_auc']:9.4f}")
    report = {
        "benchmark": "bench_train", "study": "compile", "config": "configs/mdmo.yaml", "smoke": args.smoke,
        "eager_before_commit": "65fd8d5", "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "results": rows,
    }
    write_json(report, args.out)
    return report


# ---- driver ------------------------------------------------------------------------------------------
def run_case(processes: int, threads: int, ops: str, args: argparse.Namespace, cache: str) -> dict:
    cli_args = ["--config", os.path.join(ROOT, "configs", "mdmo.yaml"), "--data.cache_dir", cache]
    if processes > 1:
        cli_args += ["--config", os.path.join(ROOT, "configs", "ddp.yaml"), "--trainer.devices", str(processes)]
    if args.quick:
        cli_args += QUICK_DATA
    with tempfile.TemporaryDirectory() as run_dir:
        result = os.path.join(run_dir, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), LATTICE_OPS=ops,
                   PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(threads),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--run-dir", run_dir, "--result", result,
               "--", *cli_args]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_train worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        with open(result) as f:
            out = json.load(f)
    out["samples_per_s"] = out["rows"] / out["seconds"]
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the 1-process case")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ops", nargs="+", default=["kernels", "reference"], choices=["kernels", "reference"])
    p.add_argument("--cache-dir", default=None, help="where the planted world is generated (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--quick", action="store_true", help="small world, few steps, one repeat")
    p.add_argument("--out", default=None, help="JSON report (default results/bench_train[_compile].json)")
    p.add_argument("--study", choices=["scaling", "compile"], default="scaling",
                   help="scaling: processes x threads x ops; compile: eager vs model.compile (issue 28)")
    p.add_argument("--networks", nargs="+", default=list(STUDY_NETWORKS), choices=list(STUDY_NETWORKS))
    p.add_argument("--val-batches", type=int, default=20, help="validation batches for the AUC (compile study)")
    p.add_argument("--smoke", action="store_true", help="compile study: tiny world, MMoE, aot_eager, few steps")
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    cli_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, cli_args = argv[:i], argv[i + 1:]
    args = p.parse_args(argv)
    if args.worker:
        return worker(args, cli_args)
    if args.compile_worker:
        return compile_worker(args, cli_args)
    if args.out is None:
        name = "bench_train_compile.json" if args.study == "compile" else "bench_train.json"
        args.out = os.path.join(HERE, "results", name)
    if args.study == "compile":
        if args.smoke:
            args.warmup, args.steps, args.repeats, args.val_batches = 1, 2, 1, 2
        return compile_study(args)
    if args.quick:
        args.warmup, args.steps, args.repeats = 2, 4, 1

    import torch

    cache = args.cache_dir or tempfile.mkdtemp(prefix="lattice-bench-train-")
    # The 1-process kernel run generates the world into the cache first (ranks never race to write it).
    rows = []
    for ops in args.ops:
        backend = "kernel" if ops == "kernels" else "reference"
        for name, processes, threads in CASES:
            threads = threads or args.threads
            runs = [run_case(processes, threads, backend, args, cache) for _ in range(args.repeats)]
            rates = [r["samples_per_s"] for r in runs]
            rows.append({"case": name, "ops": ops, "processes": processes, "threads_per_process": threads,
                         "samples_per_s": statistics.median(rates), "runs": rates,
                         "step_ms": 1e3 * statistics.median(r["seconds"] / r["steps"] for r in runs)})
            print(f"  {ops:9s} {name:32s} {rows[-1]['samples_per_s']:10.0f} samples/s", flush=True)

    def rate(case, ops):
        return next((r["samples_per_s"] for r in rows if r["case"] == case and r["ops"] == ops), None)

    print(f"\nfull training step of configs/mdmo.yaml{' (quick world)' if args.quick else ''}: "
          f"median of {args.repeats} runs x {args.steps} steps")
    header = f"{'case':34s} {'ops':10s} {'samples/s':>10s} {'step ms':>8s} {'vs 1 process':>12s} {'kernels vs reference':>21s}"
    print(header)
    print("-" * len(header))
    base = rate(CASES[0][0], "kernels") or rate(CASES[0][0], "reference")
    for r in rows:
        ref = rate(r["case"], "reference")
        r["speedup_vs_1_process"] = r["samples_per_s"] / base if base else None
        r["kernels_over_reference"] = (r["samples_per_s"] / ref if r["ops"] == "kernels" and ref else None)
        kr = f"{r['kernels_over_reference']:.2f}x" if r["kernels_over_reference"] else "-"
        print(f"{r['case']:34s} {r['ops']:10s} {r['samples_per_s']:10.0f} {r['step_ms']:8.1f} "
              f"{r['speedup_vs_1_process']:11.2f}x {kr:>21s}")
    report = {
        "benchmark": "bench_train",
        "config": "configs/mdmo.yaml",
        "quick": args.quick,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "results": rows,
    }
    write_json(report, args.out)
    return report


if __name__ == "__main__":
    main()
