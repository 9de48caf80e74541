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
``--threads`` threads, in interleaved rounds: the eager step before issue 28's eager cuts (this checkout's lattice
with the files of those cuts as of ``--before-commit``), the eager step now, and ``model.compile``
(inductor); for MMoE also the plain-PyTorch MMoE of ``lattice/benchmark/plain_mmoe.py`` over the same Parquet files.
Reported: samples/s of the full step (wall clock, and per CPU-second of the process, which a shared machine
disturbs less), the compile time cold (an empty inductor cache) and warm (the same cache, second process), the
graphs compiled after warm-up (recompiles) and the mean validation AUC after the same steps.

    python benchmarks/bench_train.py --study compile
    python benchmarks/bench_train.py --study compile --quick-world   # the mdmo networks and batch, 10k rows
    python benchmarks/bench_train.py --study compile --smoke   # tiny world, MMoE, aot_eager: a test of the script
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# The compile study's "eager before" runs import lattice from an export of BEFORE_COMMIT instead.
if os.environ.get("LATTICE_BENCH_LIBRARY"):
    sys.path.insert(0, os.environ["LATTICE_BENCH_LIBRARY"])

from benchmarks._common import fmt, print_table, write_json  # noqa: E402

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
                self.t0, self.cpu0 = time.perf_counter(), time.process_time()
                self.graphs_after_warmup = compiled_graph_count()
            elif step > args.warmup:
                self.rows += batch.batch_size
                if step == args.warmup + args.steps:
                    self.t1, self.cpu1 = time.perf_counter(), time.process_time()
                    self.recompiles = compiled_graph_count() - self.graphs_after_warmup  # before eval's own graph

    timer = Timer()
    overrides = [
        # max_steps alone ends the run, over several epochs of a small world, as the plain worker's loop does
        "--trainer.max_steps", str(args.warmup + args.steps), "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", str(args.val_batches),
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
        raise SystemExit(f"training ended before {args.warmup + args.steps} steps; lower --steps")
    seconds = timer.t1 - timer.t0
    with open(args.result, "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": timer.cpu1 - timer.cpu0, "rows": timer.rows,
                   "steps": args.steps, "first_step_s": timer.first, "recompiles": timer.recompiles,
                   "mean_auc": cli.model.eval_results.get("val", {}).get("mean_auc", float("nan"))}, f)


def plain_worker(args: argparse.Namespace, cli_args: list) -> None:
    """The plain-PyTorch MMoE (``lattice/benchmark/plain_mmoe.py``) on the world ``cli_args`` configure: the same
    Parquet files, batch size and steps; writes the timings and the mean validation AUC to ``--result``."""
    import torch

    from lattice.benchmark import plain_mmoe
    from lattice.cli import run_lightning
    from lattice.metrics import binary_auc

    torch.set_num_threads(args.threads)
    cli = run_lightning([*cli_args, "--trainer.logger", "false", "--trainer.default_root_dir", args.run_dir],
                        run=False)
    cli.datamodule.prepare_data()  # generates the world into the cache if it is not there yet
    out = plain_mmoe.train(cli.datamodule.data_dir, cli.datamodule.batch_size, args.warmup, args.steps,
                           args.val_batches)
    aucs = []
    for d in range(len(out["domains"])):
        for t in range(len(out["tasks"])):
            rows = (out["domain"] == d) & out["mask"][:, t]
            auc = binary_auc(out["logits"][rows, t], out["labels"][rows, t]) if bool(rows.any()) else float("nan")
            if auc == auc:
                aucs.append(auc)
    with open(args.result, "w") as f:
        json.dump({"seconds": out["seconds"], "cpu_seconds": out["cpu_seconds"], "rows": out["rows"],
                   "steps": args.steps, "first_step_s": None, "recompiles": 0,
                   "mean_auc": sum(aucs) / len(aucs) if aucs else float("nan")}, f)


BEFORE_COMMIT = "1b17987"  # main just before issue 28's eager cuts (f92ba64, 01a66cf)
EAGER_CUT_FILES = ("lattice/nn/attention.py", "lattice/nn/norms.py", "lattice/nn/processors.py",  # what they changed
                   "lattice/nn/match.py", "lattice/models/baselines.py")
VARIANTS = ("eager_before", "eager", "compiled", "plain")


def eager_before_library(commit: str) -> str:
    """A temporary copy of this checkout's ``lattice/`` (built kernels included) with the files of issue 28's eager
    cuts as they were at ``commit``: the library of the "eager before" runs, which differs from "eager" in those
    cuts only."""
    out = tempfile.mkdtemp(prefix=f"lattice-before-{commit}-")
    shutil.copytree(os.path.join(ROOT, "lattice"), os.path.join(out, "lattice"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in EAGER_CUT_FILES:
        old = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:{path}"], capture_output=True, text=True)
        if old.returncode != 0:
            raise SystemExit(f"bench_train: cannot read {path} at --before-commit {commit}: {old.stderr.strip()}")
        with open(os.path.join(out, path), "w") as f:
            f.write(old.stdout)
    return out


def run_compile_case(network: str, variant: str, compile_arg: str, inductor_cache: str, args, cache: str,
                     library: str | None = None) -> dict:
    cli_args = ["--config", os.path.join(ROOT, "configs", "mdmo.yaml"), "--data.cache_dir", cache,
                "--model.network", json.dumps(STUDY_NETWORKS[network]),
                "--model.compile", compile_arg if variant == "compiled" else "false"]
    if args.smoke:
        cli_args += QUICK_DATA + ["--data.batch_size", "256"]
    elif args.quick_world:
        cli_args += QUICK_DATA
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TORCHINDUCTOR_CACHE_DIR=inductor_cache)
    env.pop("LATTICE_BENCH_LIBRARY", None)
    if variant == "eager_before":
        env["LATTICE_BENCH_LIBRARY"] = library
    mode = "--plain-worker" if variant == "plain" else "--compile-worker"
    out = _run_worker(f"bench_train {variant}", [mode, "--threads", str(args.threads), "--warmup", str(args.warmup),
                                                 "--steps", str(args.steps), "--val-batches", str(args.val_batches)],
                      cli_args, env, args.timeout)
    out["samples_per_s"] = out["rows"] / out["seconds"]
    out["samples_per_cpu_s"] = out["rows"] / out["cpu_seconds"]
    out["step_s"] = out["seconds"] / out["steps"]
    return out


def compile_study_row(network: str, backend: str, compiled_arg: str, args, cache: str, library: str | None) -> dict:
    """Every variant of one network in interleaved rounds: medians, ratios, compile times, recompiles, AUC."""
    inductor_cache = tempfile.mkdtemp(prefix="lattice-inductor-")  # empty: the first compiled run is cold
    variants = [v for v in args.variants if v != "plain" or network == "MMoE"]
    runs = {v: [] for v in variants}
    for r in range(args.repeats):  # interleaved: one run of every variant per round
        for v in variants:
            runs[v].append(run_compile_case(network, v, compiled_arg, inductor_cache, args, cache, library))
    if "compiled" in runs and args.repeats < 2:  # the warm compile needs a second compiled process
        runs["compiled"].append(run_compile_case(network, "compiled", compiled_arg, inductor_cache, args, cache))
    row = {"network": network, "backend": backend}
    for name, rs in runs.items():
        row[f"{name}_samples_per_s"] = statistics.median(x["samples_per_s"] for x in rs)
        row[f"{name}_samples_per_cpu_s"] = statistics.median(x["samples_per_cpu_s"] for x in rs)
        row[f"{name}_runs"] = [x["samples_per_s"] for x in rs]
        row[f"{name}_mean_auc"] = statistics.median(x["mean_auc"] for x in rs)
    base = "eager_before" if "eager_before" in runs else "eager"
    for name in runs:
        row[f"{name}_vs_{base}"] = row[f"{name}_samples_per_s"] / row[f"{base}_samples_per_s"]
        row[f"{name}_vs_{base}_cpu"] = row[f"{name}_samples_per_cpu_s"] / row[f"{base}_samples_per_cpu_s"]
    if "plain" in runs:
        for name in ("eager", "compiled"):
            if name in runs:
                row[f"{name}_vs_plain"] = row[f"{name}_samples_per_s"] / row["plain_samples_per_s"]
    if "compiled" in runs:
        eager_step = statistics.median(x["step_s"] for x in runs.get("eager", runs["compiled"]))
        row["compile_s_cold"] = runs["compiled"][0]["first_step_s"] - eager_step
        row["compile_s_warm"] = statistics.median(x["first_step_s"] for x in runs["compiled"][1:]) - eager_step
        row["recompiles_after_warmup"] = max(x["recompiles"] for x in runs["compiled"])
        if "eager" in runs:
            row["auc_delta"] = row["compiled_mean_auc"] - row["eager_mean_auc"]
    print(f"  {network:15s} " + "  ".join(f"{v} {row[f'{v}_samples_per_s']:7.0f}" for v in runs) + " samples/s",
          flush=True)
    return row


def compile_study(args: argparse.Namespace) -> dict:
    import torch

    backend = "aot_eager" if args.smoke else "inductor"
    compiled_arg = "true" if backend == "inductor" else json.dumps({"backend": backend})
    networks = ["MMoE"] if args.smoke else args.networks
    cache = args.cache_dir or tempfile.mkdtemp(prefix="lattice-bench-train-")
    library = None
    if "eager_before" in args.variants:
        library = args.before_library or eager_before_library(args.before_commit)
    try:
        rows = [compile_study_row(network, backend, compiled_arg, args, cache, library) for network in networks]
    finally:
        if library and not args.before_library:
            shutil.rmtree(library, ignore_errors=True)
    world = "smoke" if args.smoke else ("quick world" if args.quick_world else "mdmo world")
    print(f"\nfull training step, {args.threads} threads, {world}: median of {args.repeats} interleaved rounds x "
          f"{args.steps} steps after {args.warmup}; compiled ({backend}) vs eager; ratios against the first variant")
    header = ["network", "variant", "samples/s", "ratio", "samples/CPU-s", "ratio", "mean AUC"]
    lines = []
    for r in rows:
        base = "eager_before" if "eager_before_samples_per_s" in r else "eager"
        for v in VARIANTS:
            if f"{v}_samples_per_s" not in r:
                continue
            lines.append([r["network"], v, f"{r[f'{v}_samples_per_s']:.0f}", f"{r[f'{v}_vs_{base}']:.2f}x",
                          f"{r[f'{v}_samples_per_cpu_s']:.0f}", f"{r[f'{v}_vs_{base}_cpu']:.2f}x",
                          fmt(r[f"{v}_mean_auc"])])
    print_table(header, lines)
    compiled = [r for r in rows if "compile_s_cold" in r]
    if compiled:
        print()
        print_table(["network", "compile cold s", "compile warm s", "recompiles after warm-up", "lattice vs plain"],
                    [[r["network"], f"{r['compile_s_cold']:.1f}", f"{r['compile_s_warm']:.1f}",
                      str(r["recompiles_after_warmup"]),
                      f"{r['eager_vs_plain']:.2f}x eager, {r['compiled_vs_plain']:.2f}x compiled"
                      if "compiled_vs_plain" in r else "-"] for r in compiled])
    report = {
        "benchmark": "bench_train", "study": "compile", "config": "configs/mdmo.yaml", "smoke": args.smoke,
        "quick_world": args.quick_world, "eager_before_commit": args.before_commit, "warmup": args.warmup,
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "results": rows,
    }
    write_json(report, args.out)
    return report


def _run_worker(label: str, worker_args: list, cli_args: list, env: dict, timeout: float) -> dict:
    """Runs this script as a worker (``worker_args`` then ``-- cli_args``) in a fresh run folder with ``env`` (this
    checkout first on PYTHONPATH) and returns the JSON result it writes."""
    env = dict(env, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as run_dir:
        result = os.path.join(run_dir, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *worker_args, "--run-dir", run_dir, "--result", result,
               "--", *cli_args]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} worker failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        with open(result) as f:
            return json.load(f)


# ---- driver ------------------------------------------------------------------------------------------
def run_case(processes: int, threads: int, ops: str, args: argparse.Namespace, cache: str) -> dict:
    cli_args = ["--config", os.path.join(ROOT, "configs", "mdmo.yaml"), "--data.cache_dir", cache]
    if processes > 1:
        cli_args += ["--config", os.path.join(ROOT, "configs", "ddp.yaml"), "--trainer.devices", str(processes)]
    if args.quick:
        cli_args += QUICK_DATA
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), LATTICE_OPS=ops)
    out = _run_worker("bench_train", ["--worker", "--threads", str(threads), "--warmup", str(args.warmup),
                                      "--steps", str(args.steps)], cli_args, env, args.timeout)
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
    p.add_argument("--quick-world", action="store_true",
                   help="compile study: the mdmo networks and batch size on a 10k-row world (a loaded machine)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="compile study: eager_before (--before-commit), eager, compiled, plain (MMoE only)")
    p.add_argument("--before-commit", default=BEFORE_COMMIT, help="compile study: the eager_before library")
    p.add_argument("--before-library", default=None,
                   help="compile study: a folder holding the eager_before lattice/ (default: built from --before-commit)")
    p.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-worker", action="store_true", help=argparse.SUPPRESS)
    # worker mode (internal)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
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
    if args.plain_worker:
        return plain_worker(args, cli_args)
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
