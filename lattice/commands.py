"""lattice's own commands (beside LightningCLI's fit/validate/test/predict).

- ``lattice data generate --config CFG --out DIR``: write the planted synthetic world to Parquet.
- ``lattice data consolidate INPUT... --out DIR``: merge per-domain datasets into one union-schema dataset.
- ``lattice data infer INPUT... --tasks click,like``: print the inferred schema as commented YAML.
- ``lattice filter --config TRAIN_CFG --ckpt_path CKPT --budget N``: Lattice Filter feature selection.
- ``lattice partition --data ... --budget N``: group (domain, task) portfolios into consolidated models.
"""
from __future__ import annotations

import sys
from typing import Dict, List, Literal, Optional, Sequence, Union

from jsonargparse import ArgumentParser, Namespace


def _generate(config: Optional[str] = None, out: Optional[str] = None, overwrite: bool = False,
              cache_dir: Optional[str] = None) -> None:
    """Write the planted synthetic world (the default world, or the one in CONFIG) to Parquet.

    Args:
        config: a synthetic-world YAML, or a training config whose data section holds one.
        out: output directory (default: the world's cache folder).
        overwrite: replace an existing output directory.
        cache_dir: cache root for the default output location.
    """
    from lattice.data.commands import format_summary, generate

    print(format_summary(generate(config, out, overwrite=overwrite, cache_dir=cache_dir)))


def _consolidate(inputs: List[str], out: str, domains: Optional[List[str]] = None, schema: Optional[str] = None,
                 tasks: Optional[List[str]] = None, row_group_size: int = 65536, rows_per_file: Optional[int] = None,
                 compression: str = "zstd", validate: bool = True, overwrite: bool = False) -> None:
    """Merge per-domain datasets (``PATH`` or ``DOMAIN=PATH``) into one Parquet dataset with a domain column.

    Args:
        inputs: the per-domain datasets.
        out: output directory.
        domains: domain name of each input (instead of ``DOMAIN=PATH``).
        schema: schema YAML (default: the union of the inputs' inferred schemas).
        tasks: label columns when the schema is inferred.
        row_group_size: rows per Parquet row group (sized for streaming).
        rows_per_file: split the output into files of at most this many rows.
        compression: Parquet compression codec.
        validate: check every row against the schema while writing.
        overwrite: replace an existing output directory.
    """
    from lattice.data.commands import consolidate, format_summary

    print(format_summary(consolidate(
        inputs, out, domains=domains, schema=schema, tasks=tasks, row_group_size=row_group_size,
        rows_per_file=rows_per_file, compression=compression, validate=validate, overwrite=overwrite,
    )))


def _infer(inputs: List[str], tasks: Optional[Union[List[str], str]] = None, domains: Optional[List[str]] = None,
           regression_tasks: Optional[Union[List[str], str]] = None, exclude: Optional[Union[List[str], str]] = None,
           id_features: bool = True, length_quantile: float = 0.99, out: Optional[str] = None) -> None:
    """Print the schema inferred from datasets (``PATH`` or ``DOMAIN=PATH``) as YAML, a comment per decision.

    Args:
        inputs: the datasets.
        tasks: label columns (``click,like``); default: the schema lattice embedded, else common label names.
        domains: domain name of each input (instead of ``DOMAIN=PATH``).
        regression_tasks: labels to treat as regression.
        exclude: columns to leave out.
        id_features: make user_id and item_id sparse features too, not only id columns.
        length_quantile: a sequence's max_length is this quantile of its lengths.
        out: also write the YAML to this file.
    """
    from lattice.data.commands import infer

    text = infer(inputs, tasks, domains=domains, regression_tasks=regression_tasks or (), exclude=exclude or (),
                 id_features=id_features, length_quantile=length_quantile)
    if out is not None:
        with open(out, "w") as fh:
            fh.write(text)
    print(text, end="")


def _filter(config: List[str], ckpt_path: str, budget: int, out_dir: str = "lattice_filter",
            metric: Literal["logloss", "auc"] = "logloss", repeats: int = 3, seed: int = 0,
            max_rows: Optional[int] = 200_000, within_domain: bool = True, significance: Optional[float] = 2.0,
            compare_weighted_sum: bool = False, plot: bool = True, plot_tasks: Optional[List[str]] = None) -> None:
    """Lattice Filter: permutation importance per task on the validation set, then Pareto peeling to BUDGET features.

    Args:
        config: the training config(s) the checkpoint was trained with (stacked like ``lattice fit``).
        ckpt_path: the trained checkpoint.
        budget: how many features to keep.
        out_dir: where the kept-features YAML, the importance CSV and the plot go.
        metric: importance measure: rise of LogLoss or drop of AUC.
        repeats: permutations per feature.
        seed: seed of the permutations and of the random fill of an overfull front.
        max_rows: validation rows gathered to permute across.
        within_domain: permute a feature only among rows of the same domain.
        significance: means within this many standard errors of 0 count as 0 for selection.
        compare_weighted_sum: also report weighted-sum selection under the same budget.
        plot: write a PNG of two tasks' importances with the fronts marked.
        plot_tasks: the two tasks to plot (default: the first two).
    """
    import torch

    from lattice.select.commands import run_filter
    from lattice.train.loading import load_from_config

    module, datamodule = load_from_config(config, ckpt_path)
    module.eval()
    datamodule.setup("validate")
    with torch.no_grad():
        run_filter(
            lambda batch: module(batch).logits,
            datamodule.val_dataloader(),
            budget=budget, out_dir=out_dir, schema=datamodule.schema, metric=metric, repeats=repeats, seed=seed,
            max_rows=max_rows, within_domain=within_domain, significance=significance,
            compare_weighted_sum=compare_weighted_sum, plot=plot, plot_tasks=plot_tasks,
        )


def _partition(data: List[str], budget: int, out: str = "partition.yaml", schema: Optional[str] = None,
               tasks: Optional[Dict[str, str]] = None, delay_columns: Optional[Dict[str, str]] = None,
               domain_column: Optional[str] = "domain", num_perm: int = 256, seed: int = 0,
               merge_threshold: float = 0.5) -> None:
    """Group (domain, task) portfolios into at most BUDGET consolidated models by ID overlap and label delay.

    Args:
        data: datasets, ``PATH`` (with a domain column) or ``DOMAIN=PATH``.
        budget: the most consolidated models to form.
        out: the grouping YAML to write.
        schema: schema YAML for the datasets.
        tasks: label column per task name (default: from the schema).
        delay_columns: label-delay column per task name.
        domain_column: the domain column of consolidated datasets.
        num_perm: MinHash permutations (error ~ sqrt(J(1-J)/num_perm)).
        seed: MinHash seed.
        merge_threshold: similarity above which groups merge even under budget.
    """
    from lattice.select.commands import run_partition

    by_domain = {}
    for entry in data:
        if "=" in entry:
            domain, path = entry.split("=", 1)
            by_domain.setdefault(domain, []).append(path)
    source = by_domain if by_domain and len(by_domain) == len(data) else (data[0] if len(data) == 1 else data)
    run_partition(source, budget=budget, out=out, schema=schema, tasks=tasks, delay_columns=delay_columns,
                  domain_column=domain_column, num_perm=num_perm, seed=seed, merge_threshold=merge_threshold)


def build_parser() -> ArgumentParser:
    # exit_on_error=False: a parse error raises, and lattice.cli.main prints it as one `lattice: error:` line.
    parser = ArgumentParser(prog="lattice", description="lattice's data, filter and partition commands",
                            exit_on_error=False)
    commands = parser.add_subcommands(dest="command")
    data = ArgumentParser(description="data commands")
    commands.add_subcommand("data", data, help="generate the planted world, consolidate datasets, infer a schema")
    data_commands = data.add_subcommands(dest="data_command")
    for name, fn in (("generate", _generate), ("consolidate", _consolidate), ("infer", _infer)):
        sub = ArgumentParser(description=fn.__doc__.splitlines()[0])
        if name in ("consolidate", "infer"):
            sub.add_argument("inputs", nargs="+", help="datasets: PATH or DOMAIN=PATH")
            sub.add_function_arguments(fn, skip={"inputs"})
        else:
            sub.add_function_arguments(fn)
        data_commands.add_subcommand(name, sub, help=fn.__doc__.splitlines()[0])
    for name, fn in (("filter", _filter), ("partition", _partition)):
        sub = ArgumentParser(description=fn.__doc__.splitlines()[0])
        if name == "filter":
            sub.add_argument("--config", action="append", required=True,
                             help="training config(s) of the checkpoint, stacked like lattice fit's")
            sub.add_function_arguments(fn, skip={"config"})
        else:
            sub.add_function_arguments(fn)
        commands.add_subcommand(name, sub, help=fn.__doc__.splitlines()[0])
    return parser


def run_command(argv: Sequence[str]) -> None:
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    if ns.command == "data":
        sub = ns.data
        fn = {"generate": _generate, "consolidate": _consolidate, "infer": _infer}[sub.data_command]
        fn(**{k: v for k, v in sub[sub.data_command].as_dict().items() if not k.startswith("__")})
    else:
        fn = {"filter": _filter, "partition": _partition}[ns.command]
        fn(**{k: v for k, v in ns[ns.command].as_dict().items() if not k.startswith("__")})


if __name__ == "__main__":  # pragma: no cover
    run_command(sys.argv[1:])
