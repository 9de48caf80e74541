"""The search: an Optuna study whose trials build a config from the base configs and the space, check the
constraints on the untrained module, train it with Lightning (pruned on intermediate validation results), and
return the best validation objective it reached."""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import optuna
import yaml
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from lattice.sketch.pruning import PruningCallback
from lattice.sketch.space import SearchSpace
from lattice.sketch.spec import SketchSpec, plain
from lattice.sketch.storage import default_storage, open_storage
from lattice.train.loading import load_from_config, parse_config
from lattice.train.module import NonFiniteLossError

__all__ = ["SearchOptions", "base_config", "make_pruner", "make_sampler", "run_search", "trial_counts"]

# What counts toward --n-trials: a failed trial (a killed one included) is retried or replaced, not counted.
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SAMPLERS = ("tpe", "random")
PRUNERS = ("sha", "hyperband", "median", "none")


@dataclass
class SearchOptions:
    """How to run a search (the ``lattice sketch`` options).

    ``n_trials`` is the study's total (a resumed study runs only the rest); ``timeout_s`` bounds this invocation's
    wall time (checked between trials). ``n_startup_trials`` is TPE's number of random trials before it models
    the results (Optuna's default, 10, when ``None``); a small budget wants fewer. ``max_epochs`` overrides the
    base configs' and goes into ``best.yaml``; ``reports_per_epoch`` validations per epoch feed the pruner;
    ``limit_*_batches`` shorten trials (not in ``best.yaml``).
    """

    out_dir: str
    n_trials: Optional[int] = None
    timeout_s: Optional[float] = None
    storage: Optional[str] = None
    study_name: str = "sketch"
    n_jobs: int = 1
    seed: int = 0
    sampler: str = "tpe"
    n_startup_trials: Optional[int] = None
    pruner: str = "sha"
    max_epochs: Optional[int] = None
    reports_per_epoch: int = 2
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None

    def __post_init__(self) -> None:
        if self.n_trials is None and self.timeout_s is None:
            raise ValueError("a search needs a budget: --n-trials, --budget (wall time), or both")
        if self.n_trials is not None and self.n_trials < 1:
            raise ValueError(f"--n-trials must be >= 1, got {self.n_trials}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"--budget must be positive, got {self.timeout_s} s")
        if self.n_jobs < 1:
            raise ValueError(f"--n-jobs must be >= 1, got {self.n_jobs}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: expected one of {SAMPLERS}")
        if self.n_startup_trials is not None:
            startup = self.n_startup_trials
            if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
                raise ValueError(f"--n-startup-trials must be an integer >= 0, got {self.n_startup_trials!r}")
            if self.sampler != "tpe":
                raise ValueError(f"--n-startup-trials applies to --sampler tpe only, not {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"--pruner {self.pruner!r}: expected one of {PRUNERS}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(f"--max-epochs must be >= 1, got {self.max_epochs}")
        if self.reports_per_epoch < 1:
            raise ValueError(f"--reports-per-epoch must be >= 1, got {self.reports_per_epoch}")
        self.out_dir = os.path.abspath(self.out_dir)
        if self.storage is None:
            self.storage = default_storage(self.out_dir, self.n_jobs)


def base_config(spec: SketchSpec) -> dict[str, Any]:
    """The base configs parsed and checked as ``lattice fit`` would (every default filled in), as plain data."""
    config = plain(parse_config(spec.base).as_dict())
    config.pop("config", None)
    return config


def make_sampler(name: str, seed: int, n_startup_trials: Optional[int] = None) -> optuna.samplers.BaseSampler:
    """``"random"`` or ``"tpe"``; ``n_startup_trials`` (TPE only) is None for Optuna's default."""
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if n_startup_trials is None:
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Pruners over steps = training samples seen."""
    if name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2)
    return optuna.pruners.NopPruner()


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """``{state name: count}`` over the study's trials."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _counted(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


class NoObjectiveError(RuntimeError):
    """A trial trained but never reached a finite validation objective; it is recorded as failed."""


class _Objective:
    """The trial function: sample, build, check constraints (pruned before training), train, score."""

    def __init__(self, spec: SketchSpec, space: SearchSpace, options: SearchOptions) -> None:
        self.spec, self.space, self.options = spec, space, options

    def config(self, values: dict[str, Any]) -> dict[str, Any]:
        config = self.space.apply(values)
        if self.options.max_epochs is not None:
            config.setdefault("trainer", {})["max_epochs"] = self.options.max_epochs
        return config

    def __call__(self, trial: optuna.Trial) -> float:
        values = self.space.sample(trial)
        config = self.config(values)
        trial.set_user_attr("config", config)
        trial_dir = os.path.join(self.options.out_dir, "trials", f"trial_{trial.number:04d}")
        os.makedirs(trial_dir, exist_ok=True)
        path = os.path.join(trial_dir, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        try:
            module, datamodule = load_from_config(path, seed=True)
        except SystemExit:  # the config parser printed its report above
            raise ValueError(f"trial {trial.number}: its config {path} does not parse with the sampled values "
                             f"{values} (the parser's message is above)") from None
        self.spec.objective.check_tasks(list(module.task_names))
        measured = self.spec.constraints.measure(module, datamodule)
        for name, value in measured.items():
            trial.set_user_attr(name, value)
        violations = self.spec.constraints.violations(measured)
        for name, excess in violations.items():
            trial.set_constraint(name, excess)
        broken = [f"{n} {measured[n]:.4g} > {self.spec.constraints.active[n]:.4g}"
                  for n, excess in violations.items() if excess > 0]
        if broken:
            trial.set_user_attr("pruned_by", "constraint: " + "; ".join(broken))
            raise optuna.TrialPruned("constraint broken before training: " + "; ".join(broken))
        callback = PruningCallback(trial, self.spec.objective, int(config["data"]["batch_size"]))
        trainer = self._trainer(config, trial_dir, callback)
        try:
            trainer.fit(module, datamodule=datamodule)
        except optuna.TrialPruned:
            trial.set_user_attr("pruned_by", "pruner")
            raise
        trial.set_user_attr("best_step", callback.best_step)
        if not math.isfinite(callback.best):
            raise NoObjectiveError(f"trial {trial.number}: the validation objective was never finite "
                                   "(no validation ran, or every (domain, task) has one class)")
        return callback.best

    def _trainer(self, config: dict[str, Any], trial_dir: str, callback: PruningCallback) -> pl.Trainer:
        """A quiet single-device Trainer with the base config's device, precision and clipping."""
        base = config.get("trainer") or {}
        kwargs: dict[str, Any] = {k: base[k] for k in ("accelerator", "precision", "gradient_clip_val",
                                                       "gradient_clip_algorithm", "accumulate_grad_batches")
                                  if base.get(k) is not None}
        for name in ("limit_train_batches", "limit_val_batches"):
            if getattr(self.options, name) is not None:
                kwargs[name] = getattr(self.options, name)
        return pl.Trainer(
            devices=1, max_epochs=base.get("max_epochs") or 1, num_sanity_val_steps=0,
            val_check_interval=1.0 / self.options.reports_per_epoch, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=trial_dir,
            callbacks=[callback], **kwargs,
        )


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*does not have many workers.*", ".*LeafSpec.*", ".*args parameter is intended to run.*"):
        warnings.filterwarnings("ignore", pattern)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _optimize(spec: SketchSpec, options: SearchOptions, worker: int, resumed_from: int) -> None:
    """One worker (process): load the study and run trials until the study's total or the time budget is reached.

    The sampler is seeded with ``seed + resumed_from + worker``, ``resumed_from`` being the number of trials the
    study held when this run began: a fresh study is reproducible under ``seed``, and a resumed one does not draw
    its first trials' parameters again (a sampler seeded as before would repeat them).
    """
    _quiet()
    space = SearchSpace(spec.space, base_config(spec))
    study = optuna.load_study(study_name=options.study_name, storage=open_storage(options.storage),
                              sampler=make_sampler(options.sampler, options.seed + resumed_from + worker,
                                                   options.n_startup_trials),
                              pruner=make_pruner(options.pruner))
    optuna.storages.fail_stale_trials(study)  # trials of a killed run whose heartbeat lapsed: failed, re-queued
    remaining = None if options.n_trials is None else options.n_trials - _counted(study)
    if remaining is not None and remaining <= 0:
        return
    # running trials count too, so parallel workers do not overshoot the total
    callbacks = [] if options.n_trials is None else [
        MaxTrialsCallback(options.n_trials, states=(*COUNTED, TrialState.RUNNING))]
    study.optimize(_Objective(spec, space, options), n_trials=remaining, timeout=options.timeout_s,
                   callbacks=callbacks, catch=(NonFiniteLossError, NoObjectiveError), gc_after_trial=True)


def _worker_main(spec: SketchSpec, options: SearchOptions, worker: int, resumed_from: int) -> None:
    _optimize(spec, options, worker, resumed_from)


def run_search(spec: SketchSpec, options: SearchOptions) -> optuna.Study:
    """Creates (or resumes) the study in ``options.storage`` and runs it, in ``options.n_jobs`` processes.

    The space is checked against the base configs first, so a bad field is a ``ValueError`` naming it before any
    trial starts.
    """
    _quiet()
    SearchSpace(spec.space, base_config(spec))  # fail fast on a bad space
    os.makedirs(options.out_dir, exist_ok=True)
    storage = open_storage(options.storage)
    study = optuna.create_study(study_name=options.study_name, storage=storage, load_if_exists=True,
                                direction=spec.objective.direction)
    if study.direction.name.lower() != spec.objective.direction:
        raise ValueError(f"study {options.study_name!r} in {options.storage} was created to "
                         f"{study.direction.name.lower()}; objective {spec.objective.kind!r} needs "
                         f"{spec.objective.direction} (use another --study-name or --storage)")
    resumed_from = len(study.get_trials(deepcopy=False))
    if options.n_jobs == 1:
        _optimize(spec, options, 0, resumed_from)
        return study
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_worker_main, args=(spec, options, i, resumed_from), name=f"sketch-worker-{i}")
               for i in range(options.n_jobs)]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    failed = [p.name for p in workers if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"sketch workers {failed} exited with an error (see their output above)")
    return study
