"""The benchmarks' library: what ``benchmarks/*.py`` measure, as code a user can import and reuse.

As in TorchRec's ``*_benchmark_lib.py`` split, each script under ``benchmarks/`` is a short command line
(its arguments, its table, its JSON) over a module here:

- :mod:`~lattice.benchmark.timing` -- medians of repeated calls, interleaved rounds, CPU seconds;
- :mod:`~lattice.benchmark.common` -- number formatting, tables, the machine record, the JSON report, quiet
  Lightning and the best epoch, shared by the studies and the scripts;
- :mod:`~lattice.benchmark.pooling` -- the pooling workload, its baselines and bandwidth references, the int8
  forward; :mod:`~lattice.benchmark.pool_agreement` -- the check run before timing;
  :mod:`~lattice.benchmark.memory_probe` -- bare-loop bandwidth probes;
- :mod:`~lattice.benchmark.attention` -- the jagged-attention cases and their padded baselines;
- :mod:`~lattice.benchmark.data` -- the reader against a naive loader;
- :mod:`~lattice.benchmark.models` -- every network's parameters, FLOPs and step time;
- :mod:`~lattice.benchmark.distill` -- the ExFM distillation study on the planted world;
- :mod:`~lattice.benchmark.quality` -- the model-quality study (every network, per (domain, task));
- :mod:`~lattice.benchmark.filter` -- the Lattice Filter study (fit, filter, refit);
- :mod:`~lattice.benchmark.planted` -- what the planted world's own terms allow (the quality ceiling).

This package sits above every other room of lattice (it may import any of them, the CLI included); nothing
in lattice imports it.
"""
