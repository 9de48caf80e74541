"""Callbacks: the end-of-run per-domain × per-task metrics table, and the model summary with lattice's FLOPs."""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count

_COLUMNS = ("auc", "oracle_auc", "gauc", "logloss", "ne", "calibration", "mse", "mae", "count")


def metrics_table_rows(results: dict[str, float], domain_names: list[str], task_names: list[str]) -> list[dict[str, Any]]:
    """Turns ``{"<domain>/<task>/<metric>": v, "<task>/<metric>": v}`` into one row per (domain, task), then
    one ``ALL`` row per task."""
    rows = []
    for scope in [*domain_names, None]:
        for task in task_names:
            prefix = f"{scope}/{task}" if scope is not None else task
            row = {"domain": scope if scope is not None else "ALL", "task": task}
            for metric in _COLUMNS:
                key = f"{prefix}/{metric}"
                if key in results:
                    row[metric] = results[key]
            if len(row) > 2:
                rows.append(row)
    return rows


def format_metrics_table(rows: list[dict[str, Any]], title: str) -> str:
    columns = [c for c in _COLUMNS if any(c in r for r in rows)]
    header = ["domain", "task", *columns]

    def cell(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{int(v)}" if v.is_integer() and v > 10 else f"{v:.4f}"
        return str(v)

    table = [header] + [[cell(r.get(c, float("nan"))) for c in header] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    for line in table[1:]:
        lines.append("  ".join(v.ljust(w) for v, w in zip(line, widths)))
    return "\n".join(lines)


class MetricsTable(pl.Callback):
    """Prints the per-domain × per-task table at the end of fit / validate / test and writes it as
    ``metrics_<stage>.csv`` and ``.json`` into ``output_dir`` (default: the trainer's log directory).

    Under multi-process training every rank resolves the directory (``trainer.log_dir`` is a broadcast, a
    collective), and only rank zero prints and writes.
    """

    def __init__(self, output_dir: str | None = None, print_table: bool = True) -> None:
        self.output_dir = output_dir
        self.print_table = print_table
        self.written: dict[str, str] = {}

    def _directory(self, trainer: pl.Trainer) -> str:
        if self.output_dir:
            return self.output_dir
        return trainer.log_dir or trainer.default_root_dir

    def _emit(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        results = getattr(module, "eval_results", {}).get(stage)
        if not results:
            return
        self._write(self._directory(trainer), module, stage, results)

    @rank_zero_only
    def _write(self, directory: str, module: pl.LightningModule, stage: str, results: dict[str, float]) -> None:
        rows = metrics_table_rows(results, list(module.domain_names), list(module.task_names))
        if self.print_table:
            print("\n" + format_metrics_table(rows, f"{stage} metrics (per domain x task; ALL = every domain)"))
        os.makedirs(directory, exist_ok=True)
        base = os.path.join(directory, f"metrics_{stage}")
        columns = ["domain", "task", *[c for c in _COLUMNS if any(c in r for r in rows)]]
        with open(base + ".csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        with open(base + ".json", "w") as f:
            json.dump({"stage": stage, "rows": rows, "metrics": results}, f, indent=2, default=float)
        self.written[stage] = base

    def on_fit_end(self, trainer, pl_module):
        self._emit(trainer, pl_module, "val")

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "validate":
            self._emit(trainer, pl_module, "val")

    def on_test_end(self, trainer, pl_module):
        self._emit(trainer, pl_module, "test")


class ModelSummary(RichModelSummary):
    """Lightning's (rich) model summary, with the FLOPs column from lattice's analytic count.

    Lightning measures FLOPs by running ``example_input_array`` under a flop counter, which lattice modules do not
    set (their input is a :class:`~lattice.batch.Batch`), so its column read 0. Here a child module with a
    ``flops_per_sample()`` (every lattice network) shows that figure — forward FLOPs per sample — and the total is
    their sum.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = pl_module
        super().on_fit_start(trainer, pl_module)

    def summarize(self, summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        names = dict(summary_data).get("Name", [])
        flops = [_flops_per_sample(getattr(self, "_module", None), name) for name in names]
        column = [get_human_readable_count(int(f)) if f is not None else "-" for f in flops]
        summary_data = [(key, column if key == "FLOPs" else values) for key, values in summary_data]
        total = sum(f for f in flops if f is not None)
        super().summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                          int(total), **summarize_kwargs)


def _flops_per_sample(module: Any, name: str) -> float | None:
    """``flops_per_sample()`` of ``module``'s submodule ``name`` (a dotted path), or ``None`` where it has none."""
    if module is None:
        return None
    try:
        child = module.get_submodule(name)
    except AttributeError:
        return None
    count = getattr(child, "flops_per_sample", None)
    return float(count()) if callable(count) else None
