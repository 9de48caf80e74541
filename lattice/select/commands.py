"""The ``lattice filter`` and ``lattice partition`` commands as plain typed functions.

The CLI (``lattice/cli.py``) exposes them; this module knows nothing of checkpoints or Lightning.

- :func:`run_filter` needs a trained model as ``predict(batch) -> logits [B, T]`` and the validation
  batches; the CLI builds both (load the checkpoint, ``module.eval()``, the datamodule's
  ``val_dataloader()``) and forwards every other argument, which are plain scalars/lists/paths.
- :func:`run_partition` needs only data paths (and optionally the data schema), so every argument is
  CLI-ready.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Literal, Optional, Union

from lattice.data.schema import Schema, SchemaLike
from lattice.select.importance import ImportanceResult, permutation_importance
from lattice.select.pareto import Selection, non_dominated_sort, pareto_select, weighted_sum_select
from lattice.select.partition import Partition, partition_portfolios, scan_portfolios, write_partition_yaml
from lattice.select.report import (
    _import_matplotlib,
    format_importance_table,
    plot_importance,
    write_importance_csv,
    write_kept_yaml,
    write_summary_json,
)

__all__ = ["FilterOutputs", "run_filter", "PartitionOutputs", "run_partition", "format_partition_table"]

log = logging.getLogger(__name__)


def _coerce_schema(schema: Optional[SchemaLike]) -> Optional[Schema]:
    """The one place a command's schema argument becomes a :class:`Schema` (``None`` stays ``None``)."""
    return None if schema is None else Schema.coerce(schema)


# --------------------------------------------------------------------------------------------------
# lattice filter
# --------------------------------------------------------------------------------------------------
@dataclass
class FilterOutputs:
    """What :func:`run_filter` computed and wrote (``files``: kind -> path)."""

    importance: ImportanceResult
    selection: Selection
    weighted_sum: Optional[Selection]
    table: str
    files: Dict[str, str] = field(default_factory=dict)

    @property
    def kept(self) -> List[str]:
        return list(self.selection.names or [])


def run_filter(
    predict: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    budget: int,
    out_dir: str = "lattice_filter",
    schema: Optional[SchemaLike] = None,
    metric: Literal["logloss", "auc"] = "logloss",
    repeats: int = 3,
    seed: int = 0,
    max_rows: Optional[int] = 200_000,
    within_domain: bool = True,
    features: Optional[List[str]] = None,
    significance: Optional[float] = 2.0,
    compare_weighted_sum: bool = False,
    task_weights: Optional[List[float]] = None,
    plot: bool = True,
    plot_tasks: Optional[List[str]] = None,
    device: Optional[str] = None,
    print_table: bool = True,
    dense_names: Optional[List[str]] = None,
    task_names: Optional[List[str]] = None,
    task_kinds: Optional[List[str]] = None,
) -> FilterOutputs:
    """Lattice Filter: permutation importance per task, Pareto peeling to ``budget`` features, outputs.

    Args:
        predict: the trained model, ``predict(batch) -> logits [B, T]`` (eval mode).
        batches: validation batches (read once, up to ``max_rows`` rows, into memory).
        budget: number of features to keep.
        out_dir: where ``kept_features.yaml``, ``importance.csv``, ``importance.json``,
            ``importance.txt`` and ``importance.png`` go.
        schema: the data schema (names, kinds; the kept YAML then embeds the restricted schema).
        metric: importance used for selection: ``logloss`` (rise) or ``auc`` (drop).
        repeats / seed / max_rows / within_domain / features: see
            :func:`lattice.select.importance.permutation_importance`.
        significance: for the selection, an importance within this many standard errors of zero
            counts as zero (:meth:`ImportanceResult.significant`: over the evaluation rows for
            LogLoss, over the repeats for AUC); ``None`` or 0: use the raw means. The CSV, JSON, table
            and plot always show the raw means and stds (the JSON also the scores selected by).
        compare_weighted_sum: also select by the normalized weighted sum of task importances
            (``task_weights``, default equal) under the same budget; reported side by side.
        plot: write the PNG (needs matplotlib: ``pip install lattice-rec[plot]``; checked before any
            work is done); ``plot_tasks``: the two tasks on its axes (default the first two).
        device: move each batch there before ``predict``.
        print_table: print the importance table.
        dense_names / task_names / task_kinds: names and kinds when no schema is given.
    """
    schema = _coerce_schema(schema)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if metric not in ("logloss", "auc"):
        raise ValueError(f"metric must be 'logloss' or 'auc', got {metric!r}")
    if plot:
        _import_matplotlib()  # fail before the expensive part, with the install hint
    if plot_tasks is not None and len(plot_tasks) != 2:
        raise ValueError(f"plot_tasks needs exactly two task names, got {plot_tasks}")
    result = permutation_importance(
        predict, batches, schema=schema, dense_names=dense_names, task_names=task_names,
        task_kinds=task_kinds, features=features, repeats=repeats, seed=seed, max_rows=max_rows,
        within_domain=within_domain, device=device,
        progress=lambda done, total, name: log.info("lattice filter: %d/%d permutations (%s)", done, total, name),
    )
    for t in plot_tasks or []:
        if t not in result.tasks:
            raise KeyError(f"plot_tasks: unknown task {t!r}; tasks are {result.tasks}")
    scores = result.significant(metric, significance) if significance else result.matrix(metric)
    fronts = non_dominated_sort(scores)
    selection = pareto_select(scores, budget, seed=seed, names=result.features, fronts=fronts)
    weighted = None
    if compare_weighted_sum:
        weighted = weighted_sum_select(scores, budget, weights=task_weights, names=result.features, fronts=fronts)
    os.makedirs(out_dir, exist_ok=True)
    files: Dict[str, str] = {}
    files["kept_yaml"] = os.path.join(out_dir, "kept_features.yaml")
    extra = {"significance": significance}
    write_kept_yaml(files["kept_yaml"], selection, result=result, schema=schema, metric=metric, extra=extra)
    if weighted is not None:
        files["kept_yaml_weighted_sum"] = os.path.join(out_dir, "kept_features_weighted_sum.yaml")
        write_kept_yaml(files["kept_yaml_weighted_sum"], weighted, result=result, schema=schema, metric=metric,
                        extra=extra)
    sels = [selection] + ([weighted] if weighted is not None else [])
    files["csv"] = os.path.join(out_dir, "importance.csv")
    write_importance_csv(files["csv"], result, sels)
    files["json"] = os.path.join(out_dir, "importance.json")
    write_summary_json(files["json"], result, sels, metric=metric, scores=scores)
    table = format_importance_table(result, selection, metric=metric, compare=weighted)
    if weighted is not None:
        only_p = sorted(set(selection.names) - set(weighted.names))
        only_w = sorted(set(weighted.names) - set(selection.names))
        table += f"\nonly Pareto keeps: {only_p or '-'}; only weighted sum keeps: {only_w or '-'}"
    files["table"] = os.path.join(out_dir, "importance.txt")
    with open(files["table"], "w") as fh:
        fh.write(table + "\n")
    if plot:
        if len(result.tasks) < 2 and plot_tasks is None:
            log.warning("lattice filter: one task only; plotting it against itself")
            tx = ty = result.tasks[0]
        else:
            tx, ty = plot_tasks if plot_tasks is not None else result.tasks[:2]
        files["plot"] = plot_importance(os.path.join(out_dir, "importance.png"), result, selection, tx, ty,
                                        metric=metric, compare=weighted)
    if print_table:
        print(table)
        print("wrote " + ", ".join(files.values()))
    return FilterOutputs(importance=result, selection=selection, weighted_sum=weighted, table=table, files=files)


# --------------------------------------------------------------------------------------------------
# lattice partition
# --------------------------------------------------------------------------------------------------
@dataclass
class PartitionOutputs:
    partition: Partition
    document: Dict[str, Any]
    table: str
    files: Dict[str, str] = field(default_factory=dict)


def format_partition_table(partition: Partition) -> str:
    """Per model: its portfolios, cohesion and rows; then the per-portfolio statistics."""
    st = partition.stats
    lines = [f"Lattice partition: {len(partition.portfolios)} portfolios -> {len(partition.groups)} model(s) "
             f"(budget {partition.budget})"]
    for g, members in enumerate(partition.groups):
        ps = ", ".join(f"{d}/{t}" for d, t in members)
        lines.append(f"  model_{g}  cohesion {partition.cohesion(g):.3f}  [{ps}]")
    lines.append("")
    head = f"  {'domain':<16}{'task':<16}{'model':>6}{'labelled':>11}{'base rate':>11}{'delay p50':>11}{'delay p90':>11}"
    lines.append(head)
    for d, t in partition.portfolios:
        p50, p90 = st.delay_quantile(d, t, 0.5), st.delay_quantile(d, t, 0.9)
        lines.append(
            f"  {d:<16}{t:<16}{partition.group_of(d, t):>6}{st.labelled[(d, t)]:>11}"
            f"{st.base_rate(d, t):>11.4f}{_fmt_seconds(p50):>11}{_fmt_seconds(p90):>11}"
        )
    ju, ji = st.user_jaccard(), st.item_jaccard()
    lines.append("")
    lines.append("  user / item Jaccard (MinHash):")
    w = max(8, *(len(d) + 2 for d in st.domains)) if st.domains else 8
    lines.append("  " + " " * w + "".join(f"{d:>{w + 6}}" for d in st.domains))
    for i, a in enumerate(st.domains):
        cells = "".join(f"{f'{ju[i, j]:.2f}/{ji[i, j]:.2f}':>{w + 6}}" for j in range(len(st.domains)))
        lines.append(f"  {a:<{w}}{cells}")
    return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    if s != s:
        return "nan"
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def run_partition(
    data: Union[str, List[str], Dict[str, Union[str, List[str]]]],
    *,
    budget: int,
    out: str = "partition.yaml",
    schema: Optional[SchemaLike] = None,
    tasks: Optional[Dict[str, str]] = None,
    delay_columns: Optional[Dict[str, str]] = None,
    domain_column: Optional[str] = "domain",
    user_id_column: str = "user_id",
    item_id_column: str = "item_id",
    num_perm: int = 256,
    seed: int = 0,
    merge_threshold: float = 0.5,
    user_weight: float = 0.5,
    delay_sensitivity: float = 0.25,
    delay_floor: float = 60.0,
    min_labels: int = 1,
    batch_size: int = 65_536,
    write_schemas: bool = True,
    print_table: bool = True,
) -> PartitionOutputs:
    """Lattice partitioner: group (domain, task) portfolios into at most ``budget`` consolidated models.

    Args:
        data: ``{domain: path(s)}`` (one dataset per domain) or the path(s)/glob of a consolidated
            dataset with a ``domain_column``.
        budget: the most consolidated models to plan.
        out: the grouping YAML (see :func:`lattice.select.partition.write_partition_yaml`).
        schema: the data schema: supplies ``tasks`` (label columns), ``delay_columns`` and the
            domain/user/item column names unless given, and each model's restricted schema in the YAML.
        tasks: ``{task: label column}`` (required without a schema).
        delay_columns: ``{task: delay seconds column}``.
        domain_column / user_id_column / item_id_column: column names.
        num_perm / seed: MinHash sketch size and salt.
        merge_threshold / user_weight / delay_sensitivity / delay_floor: the grouping (see
            :mod:`lattice.select.partition`).
        min_labels: a (domain, task) pair with fewer labelled rows is not a portfolio.
        batch_size: Arrow rows per batch while streaming.
        write_schemas: with a schema, also write ``<out stem>.model_<g>.schema.yaml`` per model
            (loadable with ``Schema.from_yaml``).
        print_table: print the grouping.
    """
    schema = _coerce_schema(schema)
    if schema is not None:
        if tasks is None:
            tasks = {t.name: t.source for t in schema.tasks}
        if delay_columns is None:
            delay_columns = {t.name: t.delay_column for t in schema.tasks if t.delay_column}
        domain_column = schema.domain_column
        user_id_column = schema.user_id_column or user_id_column
        item_id_column = schema.item_id_column or item_id_column
    if not tasks:
        raise ValueError("run_partition needs tasks={task: label column} or a schema")
    stats = scan_portfolios(
        data, tasks=tasks, delay_columns=delay_columns, domain_column=domain_column,
        user_id_column=user_id_column, item_id_column=item_id_column, num_perm=num_perm, seed=seed,
        batch_size=batch_size,
    )
    partition = partition_portfolios(
        stats, budget, merge_threshold=merge_threshold, user_weight=user_weight,
        delay_sensitivity=delay_sensitivity, delay_floor=delay_floor, min_labels=min_labels,
    )
    files = {"yaml": out}
    doc = write_partition_yaml(out, partition, schema=schema)
    if schema is not None and write_schemas:
        import yaml

        stem = os.path.splitext(out)[0]
        for model in doc["models"]:
            path = f"{stem}.{model['name']}.schema.yaml"
            with open(path, "w") as fh:
                fh.write(f"# schema of {model['name']} from lattice partition ({os.path.basename(out)})\n")
                fh.write(yaml.safe_dump(model["data"]["schema"], sort_keys=False, default_flow_style=None,
                                        width=110))
            files[model["name"]] = path
    table = format_partition_table(partition)
    if print_table:
        print(table)
        print("wrote " + ", ".join(files.values()))
    return PartitionOutputs(partition=partition, document=doc, table=table, files=files)
