"""What the benchmark scripts share: the helpers of :mod:`lattice.benchmark.common` (number formatting, aligned
tables, the machine record, the JSON report, quiet Lightning, the best epoch), which the library's studies use
too, and the CUDA-event timer of the CUDA benchmarks."""
from __future__ import annotations

import statistics

import torch

from lattice.benchmark.common import (best_checkpoint, best_epoch, fmt, machine, mean, print_table,  # noqa: F401
                                      quiet_lightning, trainer, verdict, write_json)


def cuda_median_ms(fn, warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (CUDA events, synchronized per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
