"""What the benchmark studies and scripts share: number formatting, aligned tables, the machine record, the JSON
report, quiet Lightning, and keeping a run's best epoch (Lightning's ``ckpt_path="best"``)."""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import warnings
from typing import Any, Dict, Iterable, List, Optional

import torch


def mean(values: Iterable[Any]) -> float:
    """Mean of the finite numbers among ``values`` (``nan`` when there are none)."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def fmt(v: Optional[float], digits: int = 4) -> str:
    """``v`` with ``digits`` decimals; ``-`` for a missing or non-finite value."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}"


def verdict(passed: Optional[bool]) -> str:
    return "not measured (a variant it needs was left out)" if passed is None else ("PASS" if passed else "FAIL")


def print_table(header: List[str], lines: List[List[str]]) -> None:
    """Left-aligned columns two spaces apart, a dashed rule under the header."""
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in lines:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def machine() -> Dict[str, Any]:
    return {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count()}


def write_json(report: Dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"wrote {path}")


def quiet_lightning(level: int = logging.WARNING) -> None:
    """Silences the warnings and info lines Lightning prints on every small in-process run."""
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*",
                    ".*args parameter is intended to run from within Python.*"):
        warnings.filterwarnings("ignore", pattern)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(level)


def trainer(epochs: int, callbacks: Iterable[Any] = (), accelerator: str = "cpu"):
    """A quiet one-device Trainer (checkpointing only through the ``ModelCheckpoint`` given in ``callbacks``)."""
    import lightning.pytorch as pl

    callbacks = list(callbacks)
    return pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
        use_distributed_sampler=False,
    )


def best_checkpoint(directory: str):
    """Keeps the epoch with the lowest ``val/loss`` (weights only) in ``directory``: fit with it, then
    ``trainer.validate|test(..., ckpt_path="best")`` evaluates that epoch's weights and leaves them in the module."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=directory, filename="{epoch}", monitor="val/loss", mode="min", save_top_k=1,
                           save_weights_only=True)


def best_epoch(checkpoint) -> int:
    """The epoch :func:`best_checkpoint` kept (from its file name)."""
    return int(re.search(r"epoch=(\d+)", os.path.basename(checkpoint.best_model_path)).group(1))
