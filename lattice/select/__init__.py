"""Lattice Filter (per-task permutation importance + Pareto feature selection) and the portfolio
partitioner (MinHash ID overlap, label delay, grouping of (domain, task) pairs into consolidated models).

- :mod:`lattice.select.importance` — :func:`permutation_importance`
- :mod:`lattice.select.pareto` — :func:`non_dominated_sort`, :func:`pareto_select`, :func:`weighted_sum_select`
- :mod:`lattice.select.report` — kept-features YAML, CSV/JSON, terminal table, PNG plot
- :mod:`lattice.select.partition` — :class:`MinHash`, :func:`scan_portfolios`, :func:`partition_portfolios`
- :mod:`lattice.select.commands` — :func:`run_filter`, :func:`run_partition` (``lattice filter|partition``)
"""
from lattice.select.commands import FilterOutputs, PartitionOutputs, run_filter, run_partition
from lattice.select.importance import ImportanceResult, permutation_importance
from lattice.select.pareto import Selection, non_dominated_sort, pareto_select, weighted_sum_select
from lattice.select.partition import MinHash, Partition, partition_portfolios, scan_portfolios

__all__ = [
    "permutation_importance",
    "ImportanceResult",
    "non_dominated_sort",
    "pareto_select",
    "weighted_sum_select",
    "Selection",
    "MinHash",
    "scan_portfolios",
    "partition_portfolios",
    "Partition",
    "run_filter",
    "run_partition",
    "FilterOutputs",
    "PartitionOutputs",
]
