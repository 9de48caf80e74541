"""The quick case: a learning-rate range test on Lightning's ``Tuner.lr_find`` for one config."""
from __future__ import annotations

import os
from typing import Sequence

import lightning.pytorch as pl
from lightning.pytorch.tuner import Tuner

from lattice.train.loading import load_from_config

__all__ = ["find_lr"]

_MIN_STEPS = 20


def find_lr(configs: Sequence[str], out_dir: str, min_lr: float = 1e-5, max_lr: float = 1.0,
            num_training: int = 100) -> dict:
    """Runs the range test (``num_training`` steps, the dense optimizer's lr swept exponentially from ``min_lr``
    to ``max_lr``) on the model of ``configs``; writes ``lr_find.png``; returns ``{suggestion, plot, override}``
    (``override`` is the ``lattice fit`` argument that applies the suggestion)."""
    if not 0 < min_lr < max_lr:
        raise ValueError(f"--lr-find needs 0 < --min-lr < --max-lr, got {min_lr} and {max_lr}")
    if num_training < _MIN_STEPS:
        raise ValueError(f"--lr-steps must be >= {_MIN_STEPS} (the suggestion skips the first 10 points), "
                         f"got {num_training}")
    module, datamodule = load_from_config(list(configs), seed=True)
    os.makedirs(out_dir, exist_ok=True)
    # max_epochs=-1: a small data set runs several epochs to reach num_training steps
    trainer = pl.Trainer(devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=out_dir)
    finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                    num_training=num_training, update_attr=False)
    if finder is None:
        raise ValueError("the learning-rate range test did not run (no training batches?)")
    suggestion = finder.suggestion()
    if suggestion is None:
        raise ValueError("the learning-rate range test found no suggestion (the loss never fell steadily); "
                         "widen --min-lr/--max-lr or raise --lr-steps")
    plot = os.path.join(out_dir, "lr_find.png")
    import matplotlib

    matplotlib.use("Agg")
    fig = finder.plot(suggest=True)
    fig.savefig(plot, dpi=100)
    return {"suggestion": suggestion, "plot": plot, "override": f"--model.optimizer.init_args.lr={suggestion:.3g}"}
