"""Benchmark of lattice's fused jagged embedding pooling on CPU against torch and FBGEMM baselines.

Workload (the issue's): T=26 tables of 100k and 1M rows, D=64 and 128, B=2048, bag lengths uniform in
[1, 40], uniformly random ids, fp32. Modes:

- ``forward``: pooled [B, T, D] output, no autograd;
- ``fwd+bwd``: forward + backward to a weight gradient (sparse rows where the implementation has them);
- ``step``: a full training step of the embeddings: forward + backward + optimizer update.

Implementations measured in the same run:

- ``lattice`` — ``torch.ops.lattice.jagged_embedding_pool`` (sparse COO gradient for fwd+bwd), and
  the fused backward (row-wise Adagrad, SGD) for the step;
- ``lattice reference`` — the pure-torch reference (``lattice.ops.reference``);
- ``F.embedding_bag`` — one call over the concatenated table with global ids (computed outside the
  timed region, which favours the baseline), ``sparse=True``, + ``torch.optim.SGD`` / ``Adagrad``;
- ``nn.EmbeddingBag loop`` — one ``nn.EmbeddingBag(sparse=True)`` per table, outputs stacked;
- ``fbgemm TBE`` — FBGEMM's CPU ``SplitTableBatchedEmbeddingBagsCodegen`` (exact row-wise Adagrad and
  SGD) when ``fbgemm_gpu`` imports (``pip install fbgemm-gpu-cpu==1.8.0`` for torch 2.13).

Printed per configuration: medians, ratios, effective GB/s (= row bytes gathered / time) and the
machine's streaming read bandwidth (a large ``torch.sum``), the 1- vs 2-thread times of lattice's forward and
fused step, and the issue's targets with pass/fail. lattice's and the torch baselines' forwards, lattice's fused
row-wise Adagrad step and the bandwidth references (streaming read and read-modify-write over a 0.25 GiB buffer,
and the bare-loop probes below at their best prefetch distance) are timed in interleaved rounds (one call of each
per round): on a machine whose speed drifts by 15-40% within minutes, the ratios and the shares of bandwidth then
compare timings taken in one state of the machine. The run-wide streaming figures printed first (over
``--stream-gib``) stand in only where a configuration has no rounds (``--modes`` without ``forward``).

Also printed, to tell what the step target asks of the machine: the fused step must read and write back
every distinct row it touches (and its Adagrad state), which the machine's streaming read-modify-write
bandwidth (an in-place ``add_`` over a large buffer, same run) bounds. ``step_over_forward_floor`` is the
smallest step / forward our forward admits if those updates ran at that bandwidth, with the sort and the
gradient reads free; ``step_over_forward_floor_at_60pct_forward`` is the same for a forward at 60 % of the
streaming read bandwidth (the forward target). ``step_update_fraction_of_rmw_bw`` is how fast our backward
moves those bytes, as a share of that bandwidth.

Streaming bandwidth is a bound no sparse access reaches, so each configuration is also probed with bare loops
over its own rows (``memory_probe.py``; skipped where no C compiler is found): ``gather_probe`` reads and sums
the forward's rows in the forward's order, ``sparse_update_probe`` reads and writes back each distinct row once
in ascending order, each at its best prefetch distance. ``forward_fraction_of_gather_probe`` is our forward's
speed as a share of the bare gather's; ``step_over_forward_floor_sparse`` (and ``..._at_60pct_forward``) is the
step floor above with the updates at the bare sparse sweep's speed instead of the streaming one, and
``step_update_fraction_of_sparse_probe`` is our backward's speed on those bytes as a share of it.

The JSON goes to ``--out``. Before timing a configuration, lattice's forward, sparse backward and fused row-wise
Adagrad step are checked against torch on its tensors (``pool_agreement.py``); a disagreement is printed and
makes the exit status 1. Nothing is asserted about time.

    python benchmarks/bench_pooling.py                # full run (needs ~15 GB free for 1M x 128)
    python benchmarks/bench_pooling.py --quick        # small smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lattice  # noqa: E402
from benchmarks import memory_probe  # noqa: E402
from benchmarks.pool_agreement import check_pooling_agreement, describe  # noqa: E402
from lattice.ops import empty_huge_pages, jagged_embedding_pool, jagged_embedding_pool_fused  # noqa: E402
from lattice.ops import reference as lattice_reference  # noqa: E402

try:  # optional baseline
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    HAVE_FBGEMM = True
except Exception:  # noqa: BLE001 - any import failure just drops the baseline
    HAVE_FBGEMM = False

LR, EPS = 0.01, 1e-8
ROUND_ROBIN_STEP = "lattice step"  # lattice's row-wise Adagrad step, timed in the forwards' rounds
# bandwidth references timed in the same rounds (round_references)
REF_STREAM_READ = "ref: stream read"
REF_STREAM_UPDATE = "ref: stream read-modify-write"
REF_GATHER = "ref: bare gather"
REF_SPARSE_UPDATE = "ref: bare sparse update"


# ---- helpers -----------------------------------------------------------------------------------------
def timeit(fn: Callable[[], object], repeats: int, warmup: int) -> Dict[str, object]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def timeit_round_robin(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, Dict[str, object]]:
    """Times several functions in interleaved rounds (one call of each per round), so drift in the machine's
    state (other load, page-cache or THP activity) hits every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}


def forward_functions(w: "Workload", include_loop: bool) -> Dict[str, Callable[[], object]]:
    """The forward pass of lattice and of each torch baseline on the same workload (no autograd)."""
    T, B, D = w.T, w.B, w.D
    bag_offsets = w.offsets[:-1]
    fns: Dict[str, Callable[[], object]] = {
        "lattice": lambda: jagged_embedding_pool(w.weights, w.tro, w.indices, w.offsets, "sum"),
        "F.embedding_bag": lambda: F.embedding_bag(w.global_indices, w.weights, bag_offsets, mode="sum")
        .view(T, B, D).transpose(0, 1),
    }
    if include_loop:
        views = [w.weights[t * w.rows:(t + 1) * w.rows] for t in range(T)]
        fns["nn.EmbeddingBag loop"] = lambda: torch.stack(
            [F.embedding_bag(idx, view, off, mode="sum") for view, (idx, off) in zip(views, w.table_inputs)], dim=1)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    return {name: no_grad(fn) for name, fn in fns.items()}


def mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def stream_buffer(gib: float) -> torch.Tensor:
    """A float32 buffer of ``gib`` GiB (far larger than the caches) for the streaming sweeps."""
    return torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)


def read_sweep(x: torch.Tensor) -> object:
    """A streaming read of ``x`` (moves its bytes once)."""
    return x.sum()


def update_sweep(x: torch.Tensor) -> object:
    """A streaming in-place update of ``x`` (moves its bytes twice: read, then written back)."""
    return x.add_(1.0)


def _stream_bandwidth(gib: float, repeats: int, sweep: Callable[[torch.Tensor], object],
                      passes: int) -> Dict[str, float]:
    """GB/s of ``sweep`` over ``stream_buffer(gib)``; ``passes`` is how many times it moves the buffer's bytes."""
    x = stream_buffer(gib)
    r = timeit(lambda: sweep(x), repeats, 2)
    moved = passes * x.nbytes
    out = {"bytes": moved, "median_s": r["median_s"], "gbps": moved / r["median_s"] / 1e9,
           "best_gbps": moved / r["min_s"] / 1e9}
    del x
    return out


def stream_read_bandwidth(gib: float, repeats: int) -> Dict[str, float]:
    """GB/s of a streaming read: torch.sum over a large buffer."""
    return _stream_bandwidth(gib, repeats, read_sweep, passes=1)


def stream_update_bandwidth(gib: float, repeats: int) -> Dict[str, float]:
    """GB/s (bytes read + bytes written) of a streaming in-place update: ``add_`` over a large buffer, the
    access pattern of an optimizer writing back the rows it read."""
    return _stream_bandwidth(gib, repeats, update_sweep, passes=2)


class Workload:
    """T tables x rows, packed; KJT-style local indices + key-major offsets; per-table views."""

    def __init__(self, T: int, rows: int, D: int, B: int, max_len: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.T, self.rows, self.D, self.B = T, rows, D, B
        lengths = torch.randint(1, max_len + 1, (T * B,), generator=g)
        self.offsets = torch.zeros(T * B + 1, dtype=torch.int64)
        self.offsets[1:] = lengths.cumsum(0)
        self.N = int(self.offsets[-1])
        self.indices = torch.randint(0, rows, (self.N,), generator=g)
        self.tro = torch.arange(T + 1, dtype=torch.int64) * rows
        # allocated as lattice's EmbeddingBagCollection does (huge pages); every baseline shares them
        self.weights = empty_huge_pages(T * rows, D).uniform_(-0.01, 0.01, generator=g)
        per_table = lengths.view(T, B).sum(1)
        table_of_pos = torch.repeat_interleave(torch.arange(T), per_table)
        self.global_indices = self.indices + table_of_pos * rows
        self.grad = torch.randn(B, T, D, generator=g)
        self.distinct_rows = torch.unique(self.global_indices)  # sorted
        self.unique_rows = int(self.distinct_rows.numel())
        # per-table inputs for the nn.EmbeddingBag loop
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), per_table.cumsum(0)])
        self.table_inputs = []
        for t in range(T):
            o = self.offsets[t * B : (t + 1) * B + 1]
            self.table_inputs.append((self.indices[starts[t] : starts[t + 1]], (o - o[0])[:-1]))

    @property
    def gathered_bytes(self) -> int:
        return self.N * self.D * self.weights.element_size()

    @property
    def update_bytes(self) -> int:
        """Bytes a fused row-wise Adagrad step must read and write back: each distinct row and its state."""
        return 2 * self.unique_rows * (self.D * self.weights.element_size() + 4)


# ---- implementations -----------------------------------------------------------------------------------
def lattice_step_function(w: Workload, optimizer: str = "rowwise_adagrad") -> Callable[[], None]:
    """One fused training step of lattice's embeddings (forward, then the backward that updates them)."""
    state = empty_huge_pages(w.weights.shape[0]).zero_()

    def step():
        jagged_embedding_pool_fused(w.weights, state, w.tro, w.indices, w.offsets, "sum", optimizer=optimizer,
                                    learning_rate=LR, eps=EPS).backward(w.grad)
    return step


def bench_lattice(w: Workload, modes: List[str], repeats: int, warmup: int,
                  rowwise_step_timed: bool = False) -> Dict[str, Dict]:
    """lattice's fwd+bwd (sparse gradient) and fused steps; the row-wise Adagrad step is left out when
    ``rowwise_step_timed`` (already timed in the forward's rounds). Forwards are timed by ``main``, in rounds
    with the baselines' (``forward_functions``)."""
    res: Dict[str, Dict] = {}
    W = w.weights
    if "fwd+bwd" in modes:
        P = W.detach().requires_grad_(True)

        def fwd_bwd():
            P.grad = None
            jagged_embedding_pool(P, w.tro, w.indices, w.offsets, "sum").backward(w.grad)
        res.setdefault("lattice", {})["fwd+bwd"] = timeit(fwd_bwd, repeats, warmup)
        P.grad = None
    if "step" in modes:
        for name, opt in (("lattice", "rowwise_adagrad"), ("lattice fused SGD", "sgd")):
            if name == "lattice" and rowwise_step_timed:
                continue
            res.setdefault(name, {})["step"] = timeit(lattice_step_function(w, opt), repeats, warmup)
    return res


def bench_reference(w: Workload, modes: List[str], repeats: int, warmup: int) -> Dict[str, Dict]:
    res: Dict[str, Dict] = {}
    W = w.weights
    ref = lattice_reference
    if "forward" in modes:
        def fwd():
            with torch.no_grad():
                return ref.jagged_embedding_pool(W, w.tro, w.indices, w.offsets, 0)
        res["forward"] = timeit(fwd, repeats, warmup)
    if "fwd+bwd" in modes:
        def fwd_bwd():
            # the reference's own backward: unique rows + summed gradients
            out = ref.jagged_embedding_pool(W, w.tro, w.indices, w.offsets, 0)
            return out, ref.jagged_embedding_pool_backward_sparse(w.grad, w.tro, w.indices, w.offsets, 0)
        res["fwd+bwd"] = timeit(fwd_bwd, repeats, warmup)
    if "step" in modes:
        state = torch.zeros(W.shape[0])

        def step():
            ref.jagged_embedding_pool(W, w.tro, w.indices, w.offsets, 0)
            ref.jagged_embedding_pool_backward_fused_(W, state, w.grad, w.tro, w.indices, w.offsets, 0, None, 1,
                                                      LR, EPS, 0.0)
        res["step"] = timeit(step, repeats, warmup)
    return {"lattice reference": res}


def bench_embedding_bag(w: Workload, modes: List[str], repeats: int, warmup: int, adagrad: bool) -> Dict[str, Dict]:
    """``F.embedding_bag`` fwd+bwd and steps with torch's sparse optimizers (its forward: ``forward_functions``)."""
    res: Dict[str, Dict] = {}
    T, B, D = w.T, w.B, w.D
    bag_offsets = w.offsets[:-1]
    P = torch.nn.Parameter(w.weights)  # shares storage

    def run():
        return F.embedding_bag(w.global_indices, P, bag_offsets, mode="sum", sparse=True).view(T, B, D).transpose(0, 1)

    if "fwd+bwd" in modes:
        def fwd_bwd():
            P.grad = None
            run().backward(w.grad)
        res.setdefault("F.embedding_bag", {})["fwd+bwd"] = timeit(fwd_bwd, repeats, warmup)
    if "step" in modes:
        optims = [("F.embedding_bag + SGD", torch.optim.SGD([P], lr=LR))]
        if adagrad:
            optims.append(("F.embedding_bag + Adagrad", torch.optim.Adagrad([P], lr=LR, eps=EPS)))
        for name, opt in optims:
            def step(opt=opt):
                opt.zero_grad(set_to_none=True)
                run().backward(w.grad)
                opt.step()
            res.setdefault(name, {})["step"] = timeit(step, repeats, warmup)
            opt.zero_grad(set_to_none=True)
            del opt
            gc.collect()
    P.grad = None
    return res


def bench_embedding_bag_loop(w: Workload, modes: List[str], repeats: int, warmup: int) -> Dict[str, Dict]:
    """The ``nn.EmbeddingBag`` loop's fwd+bwd and SGD step (its forward: ``forward_functions``)."""
    res: Dict[str, Dict] = {}
    bags = torch.nn.ModuleList(
        torch.nn.EmbeddingBag(w.rows, w.D, mode="sum", sparse=True, _weight=w.weights[t * w.rows : (t + 1) * w.rows])
        for t in range(w.T)
    )

    def run():
        return torch.stack([bag(idx, off) for bag, (idx, off) in zip(bags, w.table_inputs)], dim=1)

    if "fwd+bwd" in modes:
        def fwd_bwd():
            for p in bags.parameters():
                p.grad = None
            run().backward(w.grad)
        res["fwd+bwd"] = timeit(fwd_bwd, repeats, warmup)
    out = {"nn.EmbeddingBag loop": res}
    if "step" in modes:
        opt = torch.optim.SGD(bags.parameters(), lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            run().backward(w.grad)
            opt.step()
        out["nn.EmbeddingBag loop + SGD"] = {"step": timeit(step, repeats, warmup)}
        opt.zero_grad(set_to_none=True)
    return out


def bench_fbgemm(w: Workload, modes: List[str], repeats: int, warmup: int) -> Dict[str, Dict]:
    res: Dict[str, Dict] = {}
    specs = [(w.rows, w.D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * w.T
    for name, optim in (("fbgemm TBE", EmbOptimType.EXACT_ROWWISE_ADAGRAD), ("fbgemm TBE SGD", EmbOptimType.EXACT_SGD)):
        if name == "fbgemm TBE SGD" and "step" not in modes:
            continue
        tbe = SplitTableBatchedEmbeddingBagsCodegen(
            specs, optimizer=optim, learning_rate=LR, eps=EPS, pooling_mode=PoolingMode.SUM,
            weights_precision=SparseType.FP32,
        )
        with torch.no_grad():
            tbe.split_embedding_weights()  # materialize
        grad = w.grad.reshape(w.B, w.T * w.D)
        if name == "fbgemm TBE" and "forward" in modes:
            def fwd():
                with torch.no_grad():
                    return tbe(w.indices, w.offsets)
            res.setdefault(name, {})["forward"] = timeit(fwd, repeats, warmup)
        if "step" in modes:
            def step():
                tbe(w.indices, w.offsets).backward(grad)
            res.setdefault(name, {})["step"] = timeit(step, repeats, warmup)
        del tbe
        gc.collect()
    return res


def thread_scaling(w: Workload, repeats: int, warmup: int, threads: int) -> Dict[str, Dict[str, float]]:
    """lattice's forward and fused row-wise Adagrad step at 1 thread and at `threads`."""
    step = lattice_step_function(w)

    def fwd():
        with torch.no_grad():
            return jagged_embedding_pool(w.weights, w.tro, w.indices, w.offsets, "sum")

    out: Dict[str, Dict[str, float]] = {}
    previous = torch.get_num_threads()
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            out[f"{n}"] = {"forward_s": timeit(fwd, repeats, warmup)["median_s"],
                           "step_s": timeit(step, repeats, warmup)["median_s"]}
    finally:
        torch.set_num_threads(previous)
    return out


ROUND_STREAM_GIB = 0.25  # buffer of the in-round streaming references: 8x this machine's L3, small beside a table


def round_references(w: Workload, probes: Dict[str, Dict], stream_gib: float,
                     threads: int) -> Dict[str, Tuple[Callable[[], object], int]]:
    """The bandwidth references timed in the forwards' rounds, each as (call, bytes it moves): a streaming read
    (``torch.sum``) and read-modify-write (``add_``) over a buffer of min(``stream_gib``, 0.25) GiB, and the bare
    gather and sparse update of ``memory_probe`` at the prefetch distance its sweep (``probes``) found best. Timed
    beside the forwards and the step, their figures describe the machine in the state those timings were taken
    in; the machine's speed here drifts by 15-40% within minutes."""
    buf = stream_buffer(min(stream_gib, ROUND_STREAM_GIB))
    refs: Dict[str, Tuple[Callable[[], object], int]] = {
        REF_STREAM_READ: (lambda: read_sweep(buf), buf.nbytes),
        REF_STREAM_UPDATE: (lambda: update_sweep(buf), 2 * buf.nbytes),
    }
    if probes.get("gather"):
        gather = memory_probe.gather_call(w.weights, w.global_indices, threads)
        gather_pf = probes["gather"]["prefetch"]
        refs[REF_GATHER] = (lambda: gather(gather_pf), probes["gather"]["bytes"])
    if probes.get("sparse_update"):
        update = memory_probe.sparse_update_call(w.weights, w.distinct_rows, threads)
        update_pf = probes["sparse_update"]["prefetch"]
        refs[REF_SPARSE_UPDATE] = (lambda: update(update_pf), probes["sparse_update"]["bytes"])
    return refs


def in_round_bandwidths(ref_bytes: Dict[str, int], timings: Dict[str, Dict], stream: Dict[str, float],
                        update: Dict[str, float], probes: Dict[str, Dict]) -> Tuple[float, float, Dict[str, Dict]]:
    """(streaming read GB/s, streaming read-modify-write GB/s, probes) for one configuration: the figures of its
    rounds where ``timings`` has them (``ref_bytes``: bytes each reference moves), else the run-wide streaming
    figures and the probes' own sweeps. A probe timed in the rounds keeps its sweep's median as
    ``sweep_median_s`` and ``sweep_gbps``."""
    def gbps(name: str) -> Optional[float]:
        return ref_bytes[name] / timings[name]["median_s"] / 1e9 if name in timings else None

    read = gbps(REF_STREAM_READ) or stream["gbps"]
    rmw = gbps(REF_STREAM_UPDATE) or update["gbps"]
    out = dict(probes)
    for key, name in (("gather", REF_GATHER), ("sparse_update", REF_SPARSE_UPDATE)):
        if probes.get(key) and name in timings:
            out[key] = {**probes[key], "sweep_median_s": probes[key]["median_s"], "sweep_gbps": probes[key]["gbps"],
                        "median_s": timings[name]["median_s"], "gbps": gbps(name), "timed_in_rounds": True}
    return read, rmw, out


# ---- report ---------------------------------------------------------------------------------------
def run_probes(w: Workload, threads: int, repeats: int, warmup: int) -> Dict[str, Dict]:
    """``memory_probe``'s bare gather (the forward's rows, in its order) and bare sparse update (each distinct
    row once, ascending) on this workload's table; empty where the probe cannot be built."""
    lib, why = memory_probe.load()
    if lib is None:
        print(f"memory probe skipped: {why}")
        return {}
    return {"gather": memory_probe.gather_bandwidth(w.weights, w.global_indices, threads, repeats, warmup),
            "sparse_update": memory_probe.sparse_update_bandwidth(w.weights, w.distinct_rows, threads, repeats,
                                                                  warmup)}


def median(res: Dict[str, Dict], impl: str, mode: str) -> Optional[float]:
    r = res.get(impl, {}).get(mode)
    return None if r is None else r["median_s"]


def summarize(w: Workload, res: Dict[str, Dict], stream_gbps: float, update_gbps: float,
              scaling: Dict, probes: Optional[Dict[str, Dict]] = None) -> Dict[str, object]:
    """The issue's ratios and targets for one configuration; ``probes`` holds ``memory_probe``'s ``gather`` and
    ``sparse_update`` results on its rows (either may be missing)."""
    probes = probes or {}
    s: Dict[str, object] = {}
    ours_fwd = median(res, "lattice", "forward")
    torch_fwd = [t for t in (median(res, "F.embedding_bag", "forward"), median(res, "nn.EmbeddingBag loop", "forward"))
                 if t is not None]
    if ours_fwd:
        gbps = w.gathered_bytes / ours_fwd / 1e9
        s["forward_effective_gbps"] = gbps
        s["forward_fraction_of_stream_bw"] = gbps / stream_gbps
        if torch_fwd:
            s["forward_speedup_vs_best_torch"] = min(torch_fwd) / ours_fwd
        if median(res, "fbgemm TBE", "forward"):
            s["forward_speedup_vs_fbgemm"] = median(res, "fbgemm TBE", "forward") / ours_fwd
        if probes.get("gather"):
            s["gather_probe_gbps"] = probes["gather"]["gbps"]
            s["forward_fraction_of_gather_probe"] = gbps / probes["gather"]["gbps"]
    ours_step = median(res, "lattice", "step")
    if ours_step and ours_fwd:
        s["step_over_forward"] = ours_step / ours_fwd
        update_s = w.update_bytes / (update_gbps * 1e9)
        fwd_at_target = w.gathered_bytes / (0.6 * stream_gbps * 1e9)
        s["step_over_forward_floor"] = (ours_fwd + update_s) / ours_fwd
        s["step_over_forward_floor_at_60pct_forward"] = (fwd_at_target + update_s) / fwd_at_target
        if ours_step > ours_fwd:
            s["step_update_fraction_of_rmw_bw"] = update_s / (ours_step - ours_fwd)
        if probes.get("sparse_update"):
            sparse_s = w.update_bytes / (probes["sparse_update"]["gbps"] * 1e9)
            s["sparse_update_probe_gbps"] = probes["sparse_update"]["gbps"]
            s["step_over_forward_floor_sparse"] = (ours_fwd + sparse_s) / ours_fwd
            s["step_over_forward_floor_sparse_at_60pct_forward"] = (fwd_at_target + sparse_s) / fwd_at_target
            if ours_step > ours_fwd:
                s["step_update_fraction_of_sparse_probe"] = sparse_s / (ours_step - ours_fwd)
    if ours_step:
        if median(res, "fbgemm TBE", "step"):
            s["step_speedup_vs_fbgemm_rowwise_adagrad"] = median(res, "fbgemm TBE", "step") / ours_step
        torch_steps = {k: median(res, k, "step") for k in res if k.startswith(("F.embedding_bag +", "nn.EmbeddingBag"))}
        torch_steps = {k: v for k, v in torch_steps.items() if v}
        if torch_steps:
            best = min(torch_steps, key=torch_steps.get)
            s["step_best_torch_sparse_optimizer"] = best
            s["step_speedup_vs_best_torch_sparse_optimizer"] = torch_steps[best] / ours_step
    if len(scaling) == 2:
        one, many = scaling["1"], scaling[max(scaling, key=int)]
        s["thread_speedup_forward"] = one["forward_s"] / many["forward_s"]
        s["thread_speedup_step"] = one["step_s"] / many["step_s"]
    targets = {}
    if "forward_speedup_vs_best_torch" in s:
        targets["forward >= 1.3x best torch baseline"] = s["forward_speedup_vs_best_torch"] >= 1.3
    if "forward_fraction_of_stream_bw" in s:
        targets["forward >= 60% of streaming read bandwidth"] = s["forward_fraction_of_stream_bw"] >= 0.6
    if "step_over_forward" in s:
        targets["fused row-wise Adagrad step <= 2.5x forward"] = s["step_over_forward"] <= 2.5
    if "step_speedup_vs_fbgemm_rowwise_adagrad" in s:
        targets["step >= 2x faster than FBGEMM TBE row-wise Adagrad"] = s["step_speedup_vs_fbgemm_rowwise_adagrad"] >= 2
    if "step_speedup_vs_best_torch_sparse_optimizer" in s:
        targets["step >= 3x faster than F.embedding_bag + torch sparse optimizer"] = (
            s["step_speedup_vs_best_torch_sparse_optimizer"] >= 3)
    s["targets"] = targets
    return s


def print_config(w: Workload, res: Dict[str, Dict], summary: Dict[str, object], scaling: Dict) -> None:
    print(f"\n=== T={w.T} rows/table={w.rows:,} D={w.D} B={w.B}  N={w.N:,} ids, "
          f"{w.gathered_bytes / 1e6:.1f} MB of rows gathered per forward, {w.unique_rows:,} distinct rows "
          f"({w.update_bytes / 1e6:.1f} MB read + written back per fused step) ===")
    ours = {m: median(res, "lattice", m) for m in ("forward", "fwd+bwd", "step")}
    header = f"{'implementation':34s} {'forward ms':>11s} {'fwd+bwd ms':>11s} {'step ms':>9s} {'fwd GB/s':>9s}  vs lattice (f / fb / step)"
    print(header)
    print("-" * len(header))
    for impl, modes in res.items():
        cells, ratios = [], []
        for m in ("forward", "fwd+bwd", "step"):
            t = median(res, impl, m)
            cells.append(f"{t * 1e3:11.2f}" if t else f"{'-':>11s}")
            ratios.append(f"{t / ours[m]:.2f}x" if t and ours.get(m) else "-")
        t_f = median(res, impl, "forward")
        gbps = f"{w.gathered_bytes / t_f / 1e9:9.2f}" if t_f else f"{'-':>9s}"
        print(f"{impl:34s} {cells[0]} {cells[1]} {cells[2][2:]} {gbps}  {' / '.join(ratios)}")
    if scaling:
        parts = [f"{n} thread(s): forward {v['forward_s'] * 1e3:.2f} ms, fused step {v['step_s'] * 1e3:.2f} ms"
                 for n, v in scaling.items()]
        print("thread scaling (lattice): " + "; ".join(parts))
    for k, v in summary.items():
        if k != "targets":
            print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    for k, ok in summary["targets"].items():
        print(f"  target {'PASS' if ok else 'MISS'}: {k}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=26)
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--max-len", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["forward", "fwd+bwd", "step"],
                   choices=["forward", "fwd+bwd", "step"])
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-torch reference")
    p.add_argument("--no-loop", action="store_true", help="skip the nn.EmbeddingBag loop")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1- vs N-thread measurement")
    p.add_argument("--stream-gib", type=float, default=1.0, help="buffer size of the bandwidth probe")
    p.add_argument("--memory-fraction", type=float, default=0.7,
                   help="skip a configuration (or its extra-copy baselines) above this share of MemAvailable")
    p.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "bench_pooling.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.dims, args.batch, args.repeats, args.warmup = [20_000], [64], 256, 3, 1
        args.stream_gib = min(args.stream_gib, 0.25)

    torch.set_num_threads(args.threads)
    print(f"lattice {lattice.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fbgemm_gpu {'available' if HAVE_FBGEMM else 'not importable (baseline skipped)'}")
    stream = stream_read_bandwidth(args.stream_gib, max(3, args.repeats))
    print(f"streaming read bandwidth (torch.sum over {stream['bytes'] / 2**30:.2f} GiB): {stream['gbps']:.2f} GB/s "
          f"(best {stream['best_gbps']:.2f})")
    update = stream_update_bandwidth(args.stream_gib, max(3, args.repeats))
    print(f"streaming read-modify-write bandwidth (in-place add_, bytes read + written): {update['gbps']:.2f} GB/s "
          f"(best {update['best_gbps']:.2f})")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "fbgemm": HAVE_FBGEMM},
        "args": vars(args),
        "stream_read": stream,
        "stream_update": update,
        "configs": [],
    }
    all_agree = True
    for rows in args.rows:
        for D in args.dims:
            table_bytes = args.tables * rows * D * 4
            avail = mem_available_bytes()
            entry = {"tables": args.tables, "rows": rows, "dim": D, "batch": args.batch, "max_len": args.max_len}
            # the weights once, plus ~1 GB of inputs, gradients and temporaries
            if avail is not None and table_bytes + (1 << 30) > args.memory_fraction * avail:
                print(f"\n=== rows={rows:,} D={D}: skipped, needs ~{(table_bytes + (1 << 30)) / 1e9:.1f} GB, "
                      f"{avail / 1e9:.1f} GB available ===")
                entry["skipped"] = "memory"
                report["configs"].append(entry)
                continue
            w = Workload(args.tables, rows, D, args.batch, args.max_len)
            agreement = check_pooling_agreement(w.weights, w.tro, w.indices, w.offsets, w.global_indices, w.grad,
                                                learning_rate=LR, eps=EPS)
            print(f"\nrows={rows:,} D={D}: {describe(agreement)}")
            entry["agreement"] = agreement
            all_agree = all_agree and agreement["ok"]
            extra_copy_ok = avail is None or 2 * table_bytes + (1 << 30) <= args.memory_fraction * avail
            res: Dict[str, Dict] = {}
            probes = run_probes(w, args.threads, args.repeats, args.warmup)
            ref_timings: Dict[str, Dict] = {}
            ref_bytes: Dict[str, int] = {}
            if "forward" in args.modes:
                # lattice and the torch baselines' forwards in interleaved rounds (the fairest comparison), with
                # lattice's row-wise Adagrad step and the bandwidth references in the same rounds, so that
                # step / forward and the shares of bandwidth compare timings taken in one state of the machine;
                # FBGEMM and the reference below are timed on their own.
                fns = forward_functions(w, not args.no_loop)
                if "step" in args.modes:
                    fns[ROUND_ROBIN_STEP] = lattice_step_function(w)
                refs = round_references(w, probes, args.stream_gib, args.threads)
                fns.update({name: call for name, (call, _) in refs.items()})
                for name, r in timeit_round_robin(fns, args.repeats, args.warmup).items():
                    if name in refs:
                        ref_timings[name] = r
                    elif name == ROUND_ROBIN_STEP:
                        res.setdefault("lattice", {})["step"] = r
                    else:
                        res.setdefault(name, {})["forward"] = r
                ref_bytes = {name: moved for name, (_, moved) in refs.items()}
                del fns, refs  # frees the references' stream buffer
            other_modes = [m for m in args.modes if m != "forward"]
            res_lattice = bench_lattice(w, other_modes, args.repeats, args.warmup,
                                        rowwise_step_timed="step" in res.get("lattice", {}))
            for name, r in res_lattice.items():
                res.setdefault(name, {}).update(r)
            for name, r in bench_embedding_bag(w, other_modes, args.repeats, args.warmup, adagrad=extra_copy_ok).items():
                res.setdefault(name, {}).update(r)
            if not args.no_loop:
                for name, r in bench_embedding_bag_loop(w, other_modes, args.repeats, args.warmup).items():
                    res.setdefault(name, {}).update(r)
            if HAVE_FBGEMM and extra_copy_ok:
                res.update(bench_fbgemm(w, args.modes, args.repeats, args.warmup))
            if not args.no_reference:
                res.update(bench_reference(w, args.modes, max(1, args.repeats // 2), 1))
            scaling = {} if args.no_scaling else thread_scaling(w, args.repeats, args.warmup, args.threads)
            read_gbps, rmw_gbps, probes = in_round_bandwidths(ref_bytes, ref_timings, stream, update, probes)
            summary = summarize(w, res, read_gbps, rmw_gbps, scaling, probes)
            summary["stream_read_gbps"], summary["stream_update_gbps"] = read_gbps, rmw_gbps
            summary["bandwidths_timed_in_rounds"] = bool(ref_timings)
            print_config(w, res, summary, scaling)
            entry.update({"N": w.N, "gathered_bytes": w.gathered_bytes, "unique_rows": w.unique_rows, "probes": probes,
                          "update_bytes": w.update_bytes, "results": res, "thread_scaling": scaling,
                          "summary": summary, "fbgemm_skipped": HAVE_FBGEMM and not extra_copy_ok,
                          "round_references": {name: {**r, "bytes": ref_bytes[name]} for name, r in ref_timings.items()}})
            report["configs"].append(entry)
            del w, res
            gc.collect()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out}")
    if not all_agree:
        print("lattice's kernels DISAGREE with torch on at least one configuration (see 'agreement' above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
