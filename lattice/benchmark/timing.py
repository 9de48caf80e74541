"""Timing of CPU work: medians of repeated calls, and interleaved rounds.

On a shared machine whose speed drifts by tens of percent within minutes, contenders timed one after the
other compare different states of the machine; :func:`timeit_rounds` times one call of each per round, so
drift hits every contender alike. Nothing here asserts on time.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Callable, Dict, List

__all__ = ["timeit", "timeit_rounds", "cpu_seconds"]

Clock = Callable[[], float]


def _summary(times: List[float]) -> Dict[str, object]:
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


def timeit(fn: Callable[[], object], repeats: int, warmup: int, clock: Clock = time.perf_counter) -> Dict[str, object]:
    """``{"median_s", "min_s", "times_s"}`` of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones
    (``clock``: wall clock by default; ``time.process_time`` counts CPU seconds of all threads)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return _summary(times)


def timeit_rounds(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                  clock: Clock = time.perf_counter) -> Dict[str, Dict[str, object]]:
    """:func:`timeit` of every function of ``fns``, in ``repeats`` interleaved rounds (one call of each per
    round), so that drift in the machine's state (other load, page-cache or THP activity) hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: _summary(t) for name, t in times.items()}


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers are joined each epoch)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime
