"""What this machine's memory allows for a pooling benchmark's own access pattern, measured with bare loops
(``memory_probe.c``, built here with the C compiler and loaded through ctypes):

- ``row_gather``: read and sum the rows the forward gathers, in the forward's order, as fast as it goes. A pooling
  forward cannot beat it by much: it reads the same rows and also keeps one sum per bag.
- ``sparse_row_update``: read and write back each distinct row once, in ascending order: the weight traffic of a
  fused optimizer step with its sort, reduction and arithmetic taken away.

Each is timed at several prefetch distances (0 = none) and reported at its best one, so the figure is what a
plain loop reaches on this machine, not what one guess of the distance gives. A streaming ``torch.sum`` or
``add_`` is the dense bound; these are the sparse ones.

``load()`` returns None (with the reason) where no C compiler with OpenMP is found.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_probe.c")
PREFETCH_DISTANCES = (0, 8, 16, 32)
_cache: Dict[str, object] = {}


def _compile(out_dir: str) -> Tuple[Optional[str], str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc, gcc or $CC) found"
    target = os.path.join(out_dir, "memory_probe.so")
    # -march=native: the probe should use whatever vector width the machine has, as lattice's kernels do
    arch = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    errors = ""
    for flags in (arch, []):
        cmd = [cc, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", SOURCE, "-o", target]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return target, ""
        errors = f"{' '.join(cmd)}: {r.stderr.strip()[-500:]}"
    return None, errors


def load() -> Tuple[Optional[ctypes.CDLL], str]:
    """The compiled probe library (cached for the process), or None and why it is unavailable."""
    if "lib" not in _cache:
        out_dir = tempfile.mkdtemp(prefix="lattice_memory_probe_")
        try:
            path, why = _compile(out_dir)
            lib = None
            if path is not None:
                lib = ctypes.CDLL(path)  # mapped now: the file itself can go
                i64, f32, i32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
                lib.sparse_row_update.argtypes = [ptr, i64, ptr, i64, i64, f32, i32]
                lib.sparse_row_update.restype = None
                lib.row_gather.argtypes = [ptr, i64, ptr, i64, i64, i32]
                lib.row_gather.restype = ctypes.c_double
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        _cache["lib"], _cache["why"] = lib, why
    return _cache["lib"], _cache["why"]


def _check(weights: torch.Tensor, rows: torch.Tensor) -> None:
    if weights.dtype != torch.float32 or weights.dim() != 2 or not weights.is_contiguous() or weights.is_cuda:
        raise ValueError(f"weights must be a contiguous 2-D float32 CPU tensor, got {weights.dtype} "
                         f"{tuple(weights.shape)} on {weights.device}")
    if rows.dtype != torch.int64 or rows.dim() != 1 or not rows.is_contiguous():
        raise ValueError(f"rows must be a contiguous 1-D int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= weights.shape[0]):
        raise ValueError(f"rows must lie in [0, {weights.shape[0]}), got [{int(rows.min())}, {int(rows.max())}]")


def _best_over_distances(run, moved_bytes: int, repeats: int, warmup: int,
                         distances: Sequence[int]) -> Dict[str, float]:
    by_distance = {}
    for p in distances:
        for _ in range(warmup):
            run(p)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run(p)
            times.append(time.perf_counter() - t0)
        by_distance[p] = statistics.median(times)
    best = min(by_distance, key=by_distance.get)
    return {"bytes": moved_bytes, "median_s": by_distance[best], "gbps": moved_bytes / by_distance[best] / 1e9,
            "prefetch": best, "median_s_by_prefetch": {str(p): t for p, t in by_distance.items()}}


def sparse_update_call(weights: torch.Tensor, distinct_rows: torch.Tensor,
                       threads: int) -> Optional[Callable[[int], None]]:
    """The bare sparse update of ``weights[distinct_rows]`` (ascending, distinct) as a call to time, taking the
    prefetch distance (None where the probe cannot be built). weights: [R, D] float32, left unchanged. The
    arguments are checked here, once, outside any timing."""
    lib, _ = load()
    if lib is None:
        return None
    _check(weights, distinct_rows)
    if distinct_rows.numel() > 1 and not bool((distinct_rows[1:] > distinct_rows[:-1]).all()):
        raise ValueError("distinct_rows must be sorted ascending without repeats")
    D, n = weights.shape[1], distinct_rows.numel()
    return lambda prefetch: lib.sparse_row_update(weights.data_ptr(), D, distinct_rows.data_ptr(), n, prefetch, 1.0,
                                                  threads)


def gather_call(weights: torch.Tensor, rows: torch.Tensor, threads: int) -> Optional[Callable[[int], float]]:
    """The bare gather of ``weights[rows]`` (any order, repeats allowed) as a call to time, taking the prefetch
    distance and returning the rows' total (None where the probe cannot be built). The arguments are checked here,
    once, outside any timing."""
    lib, _ = load()
    if lib is None:
        return None
    _check(weights, rows)
    D, n = weights.shape[1], rows.numel()
    return lambda prefetch: lib.row_gather(weights.data_ptr(), D, rows.data_ptr(), n, prefetch, threads)


def sparse_update_bandwidth(weights: torch.Tensor, distinct_rows: torch.Tensor, threads: int, repeats: int = 5,
                            warmup: int = 1, distances: Sequence[int] = PREFETCH_DISTANCES) -> Optional[Dict]:
    """GB/s (bytes read + written) of reading and writing back ``weights[distinct_rows]`` in ascending order.

    weights: [R, D] float32, left unchanged (each row is multiplied by 1). distinct_rows: [U] int64, sorted and
    distinct. Returns None where the probe cannot be built."""
    run = sparse_update_call(weights, distinct_rows, threads)
    if run is None:
        return None
    return _best_over_distances(run, 2 * distinct_rows.numel() * weights.shape[1] * 4, repeats, warmup, distances)


def gather_bandwidth(weights: torch.Tensor, rows: torch.Tensor, threads: int, repeats: int = 5, warmup: int = 1,
                     distances: Sequence[int] = PREFETCH_DISTANCES) -> Optional[Dict]:
    """GB/s (row bytes read) of reading and summing ``weights[rows]`` in the given order.

    weights: [R, D] float32; rows: [N] int64, any order, repeats allowed. Returns None where the probe cannot be
    built."""
    run = gather_call(weights, rows, threads)
    if run is None:
        return None
    return _best_over_distances(run, rows.numel() * weights.shape[1] * 4, repeats, warmup, distances)
