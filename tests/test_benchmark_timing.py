"""lattice.benchmark.timing: warm-up calls are not timed, rounds interleave the contenders, and the summaries are
the medians and minima of the timed calls."""
import statistics

from lattice.benchmark.timing import cpu_seconds, timeit, timeit_rounds


class FakeClock:
    """Advances by the next step of ``steps`` each time it is read twice (start, stop)."""

    def __init__(self, steps):
        self.now, self.steps, self.reads = 0.0, list(steps), 0

    def __call__(self):
        self.reads += 1
        if self.reads % 2 == 0:
            self.now += self.steps.pop(0)
        return self.now


def test_timeit_times_only_the_repeats():
    calls = []
    r = timeit(lambda: calls.append(1), repeats=3, warmup=2, clock=FakeClock([0.5, 0.25, 0.75]))
    assert len(calls) == 5
    assert r["times_s"] == [0.5, 0.25, 0.75] and r["median_s"] == 0.5 and r["min_s"] == 0.25


def test_rounds_interleave_the_contenders():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    r = timeit_rounds(fns, repeats=3, warmup=1, clock=FakeClock([1, 10, 2, 20, 3, 30]))
    assert order == ["a", "b"] + ["a", "b"] * 3  # each warmed up, then one call of each per round
    assert r["a"]["times_s"] == [1, 2, 3] and r["b"]["times_s"] == [10, 20, 30]
    assert r["b"]["median_s"] == statistics.median([10, 20, 30]) and r["a"]["min_s"] == 1


def test_cpu_seconds_counts_this_process():
    before = cpu_seconds()
    sum(i * i for i in range(300_000))
    assert cpu_seconds() > before
