"""A sketch's resource constraints: analytic FLOPs per sample, parameter count and measured serving latency,
checked on a built (untrained) module before a trial trains."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from lattice.sketch._numbers import as_number

__all__ = ["Constraints", "measure_latency_ms"]


def _positive(name: str, value: Any) -> float:
    number = as_number(f"constraint {name!r}", value)
    if number <= 0:
        raise ValueError(f"constraint {name!r}: expected a positive number, got {value!r}")
    return float(number)


@dataclass(frozen=True)
class Constraints:
    """Upper bounds (``None``: unconstrained). ``latency_ms`` is the median eval-mode forward time of one batch of
    ``latency_batch_size`` validation rows on the trial's device."""

    flops_per_sample: Optional[float] = None
    num_parameters: Optional[float] = None
    latency_ms: Optional[float] = None
    latency_batch_size: int = 256

    @classmethod
    def parse(cls, spec: Optional[Mapping[str, Any]]) -> "Constraints":
        """Reads ``{flops_per_sample: N, num_parameters: N, latency_ms: {max: ms, batch_size: B}}`` (any subset)."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise ValueError(f"constraints: expected a mapping, got {spec!r}")
        unknown = set(spec) - {"flops_per_sample", "num_parameters", "latency_ms"}
        if unknown:
            raise ValueError(f"constraints: unknown constraint {sorted(unknown)} "
                             "(expected flops_per_sample, num_parameters, latency_ms)")
        kwargs: dict[str, Any] = {}
        for name in ("flops_per_sample", "num_parameters"):
            if spec.get(name) is not None:
                kwargs[name] = _positive(name, spec[name])
        latency = spec.get("latency_ms")
        if latency is not None:
            if isinstance(latency, Mapping):
                if set(latency) - {"max", "batch_size"} or "max" not in latency:
                    raise ValueError(f"constraint 'latency_ms': expected {{max: ms, batch_size: B}}, got {latency!r}")
                kwargs["latency_ms"] = _positive("latency_ms", latency["max"])
                size = latency.get("batch_size", 256)
                if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    raise ValueError(f"constraint 'latency_ms': batch_size must be a positive int, got {size!r}")
                kwargs["latency_batch_size"] = size
            else:
                kwargs["latency_ms"] = _positive("latency_ms", latency)
        return cls(**kwargs)

    @property
    def active(self) -> dict[str, float]:
        return {k: v for k, v in (("flops_per_sample", self.flops_per_sample), ("num_parameters", self.num_parameters),
                                  ("latency_ms", self.latency_ms)) if v is not None}

    def measure(self, module, datamodule) -> dict[str, float]:
        """``{flops_per_sample, num_parameters[, latency_ms]}`` of ``module`` (a LatticeModule); FLOPs and
        parameters are always measured (cheap, analytic), latency only when constrained."""
        network = module.network
        values = {"flops_per_sample": float(network.flops_per_sample()),
                  "num_parameters": float(sum(p.numel() for p in network.parameters()))}
        if self.latency_ms is not None:
            values["latency_ms"] = measure_latency_ms(module, datamodule, self.latency_batch_size)
        return values

    def violations(self, measured: Mapping[str, float]) -> dict[str, float]:
        """``{name: measured - bound}`` for every active constraint (> 0: broken), what ``Trial.set_constraint``
        takes."""
        return {name: measured[name] - bound for name, bound in self.active.items()}


@torch.no_grad()
def measure_latency_ms(module, datamodule, batch_size: int, repeats: int = 5) -> float:
    """Median wall time in ms of ``module``'s eval-mode forward on ``batch_size`` validation rows (rows of the first
    validation batch, repeated when it is smaller), after one warm-up pass."""
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    rows = torch.arange(batch_size) % batch.batch_size
    batch = batch.select_rows(rows)
    was_training = module.training
    module.eval()
    try:
        module(batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(batch)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        module.train(was_training)
    return statistics.median(times)
