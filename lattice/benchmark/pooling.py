"""The pooling benchmark's study: lattice's fused jagged embedding pooling on CPU against torch and FBGEMM.

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
over its own rows (:mod:`lattice.benchmark.memory_probe`; skipped where no C compiler is found): ``gather_probe``
reads and sums the forward's rows in the forward's order, ``sparse_update_probe`` reads and writes back each distinct row once
in ascending order, each at its best prefetch distance. ``forward_fraction_of_gather_probe`` is our forward's
speed as a share of the bare gather's; ``step_over_forward_floor_sparse`` (and ``..._at_60pct_forward``) is the
step floor above with the updates at the bare sparse sweep's speed instead of the streaming one, and
``step_update_fraction_of_sparse_probe`` is our backward's speed on those bytes as a share of it.

The JSON goes to benchmarks/bench_pooling.py's ``--out``. Before timing a configuration, lattice's forward, sparse backward and fused row-wise
Adagrad step are checked against torch on its tensors (:mod:`lattice.benchmark.pool_agreement`); a disagreement is
printed and makes the exit status 1. Nothing is asserted about time.
"""
from __future__ import annotations

import gc
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lattice.benchmark import memory_probe
from lattice.benchmark.pool_agreement import check_pooling_agreement, describe
from lattice.benchmark.timing import timeit, timeit_rounds
from lattice.ops import (empty_huge_pages, jagged_embedding_pool, jagged_embedding_pool_fused,
                         jagged_embedding_pool_int8, quantize_rows_int8)
from lattice.ops import reference as lattice_reference


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



def measure_config(w: Workload, modes: List[str], repeats: int, warmup: int, threads: int, stream_gib: float,
                   stream: Dict[str, float], update: Dict[str, float], loop: bool = True, reference: bool = True,
                   scaling: bool = True, extra_copy_ok: bool = True) -> Dict[str, object]:
    """Every measurement of one configuration, after the agreement check: the implementations' timings per
    mode, the bandwidth references and probes, the thread scaling and :func:`summarize`'s ratios and targets.
    ``stream`` / ``update``: the run-wide streaming figures, used where no rounds ran (no ``forward`` mode);
    ``extra_copy_ok``: memory allows the baselines that copy the table (torch's Adagrad, FBGEMM)."""
    agreement = check_pooling_agreement(w.weights, w.tro, w.indices, w.offsets, w.global_indices, w.grad,
                                        learning_rate=LR, eps=EPS)
    print(f"\nrows={w.rows:,} D={w.D}: {describe(agreement)}")
    res: Dict[str, Dict] = {}
    probes = run_probes(w, threads, repeats, warmup)
    ref_timings: Dict[str, Dict] = {}
    ref_bytes: Dict[str, int] = {}
    if "forward" in modes:
        # lattice and the torch baselines' forwards in interleaved rounds (the fairest comparison), with
        # lattice's row-wise Adagrad step and the bandwidth references in the same rounds, so that
        # step / forward and the shares of bandwidth compare timings taken in one state of the machine;
        # FBGEMM and the reference below are timed on their own.
        fns = forward_functions(w, loop)
        if "step" in modes:
            fns[ROUND_ROBIN_STEP] = lattice_step_function(w)
        refs = round_references(w, probes, stream_gib, threads)
        fns.update({name: call for name, (call, _) in refs.items()})
        for name, r in timeit_rounds(fns, repeats, warmup).items():
            if name in refs:
                ref_timings[name] = r
            elif name == ROUND_ROBIN_STEP:
                res.setdefault("lattice", {})["step"] = r
            else:
                res.setdefault(name, {})["forward"] = r
        ref_bytes = {name: moved for name, (_, moved) in refs.items()}
        del fns, refs  # frees the references' stream buffer
    other_modes = [m for m in modes if m != "forward"]
    for name, r in bench_lattice(w, other_modes, repeats, warmup,
                                 rowwise_step_timed="step" in res.get("lattice", {})).items():
        res.setdefault(name, {}).update(r)
    for name, r in bench_embedding_bag(w, other_modes, repeats, warmup, adagrad=extra_copy_ok).items():
        res.setdefault(name, {}).update(r)
    if loop:
        for name, r in bench_embedding_bag_loop(w, other_modes, repeats, warmup).items():
            res.setdefault(name, {}).update(r)
    if HAVE_FBGEMM and extra_copy_ok:
        res.update(bench_fbgemm(w, modes, repeats, warmup))
    if reference:
        res.update(bench_reference(w, modes, max(1, repeats // 2), 1))
    scaled = thread_scaling(w, repeats, warmup, threads) if scaling else {}
    read_gbps, rmw_gbps, probes = in_round_bandwidths(ref_bytes, ref_timings, stream, update, probes)
    summary = summarize(w, res, read_gbps, rmw_gbps, scaled, probes)
    summary["stream_read_gbps"], summary["stream_update_gbps"] = read_gbps, rmw_gbps
    summary["bandwidths_timed_in_rounds"] = bool(ref_timings)
    print_config(w, res, summary, scaled)
    return {"agreement": agreement, "N": w.N, "gathered_bytes": w.gathered_bytes, "unique_rows": w.unique_rows,
            "probes": probes, "update_bytes": w.update_bytes, "results": res, "thread_scaling": scaled,
            "summary": summary, "fbgemm_skipped": HAVE_FBGEMM and not extra_copy_ok,
            "round_references": {name: {**r, "bytes": ref_bytes[name]} for name, r in ref_timings.items()}}


def measure_int8(T: int, rows: int, D: int, B: int, max_len: int, repeats: int, warmup: int, seed: int) -> dict:
    """The int8 row-wise quantized forward against the fp32 forward on one :class:`Workload` (benchmarks/
    bench_pooling_int8.py): medians of interleaved rounds, table bytes, and the int8 output checked against
    the dequantized reference (``agrees``)."""
    w = Workload(T, rows, D, B, max_len, seed)
    q = quantize_rows_int8(w.weights)
    fns = {
        "fp32": lambda: jagged_embedding_pool(w.weights, w.tro, w.indices, w.offsets, "sum"),
        "int8": lambda: jagged_embedding_pool_int8(q, w.tro, w.indices, w.offsets, "sum", embedding_dim=D),
    }
    with torch.no_grad():
        out = fns["int8"]()
        ref = lattice_reference.jagged_embedding_pool_int8(q, w.tro, w.indices, w.offsets, 0, None, D)
        err = float((out - ref).abs().max())
        quant_err = float((out - fns["fp32"]()).abs().max())
        del ref
        t = timeit_rounds(fns, repeats, warmup)
    fp32_s, int8_s = t["fp32"]["median_s"], t["int8"]["median_s"]
    return {
        "T": T, "rows": rows, "D": D, "B": B, "indices": w.N, "repeats": repeats,
        "fp32_median_ms": fp32_s * 1e3, "int8_median_ms": int8_s * 1e3,
        "int8_over_fp32_time": int8_s / fp32_s,
        "table_bytes_fp32": w.weights.nbytes, "table_bytes_int8": q.nbytes,
        "table_bytes_ratio": q.nbytes / w.weights.nbytes,
        "max_abs_err_vs_dequantized_reference": err, "max_abs_diff_vs_fp32": quant_err,
        "agrees": err <= 1e-5 * max(1.0, float(out.abs().max())),
        "times_s": {k: v["times_s"] for k, v in t.items()},
    }
