"""Lattice Sketch: budgeted search over hyper-parameters and architecture, on Optuna.

Placement: above ``train``, ``models`` and ``data`` (it builds configs through :mod:`lattice.train.loading` and
trains :class:`~lattice.train.LatticeModule` s with Lightning), below ``cli.py`` (``lattice sketch`` routes to
:mod:`lattice.sketch.commands`). Optuna is an optional dependency (``pip install lattice-rec[sketch]``); this
package imports it, nothing below it does.

- :mod:`~lattice.sketch.spec`: the sketch file (space, base configs, objective, constraints);
- :mod:`~lattice.sketch.space`: distributions over dotted config fields, checked against the base config;
- :mod:`~lattice.sketch.objective`, :mod:`~lattice.sketch.constraints`: what is optimized and what bounds it;
- :mod:`~lattice.sketch.pruning`: the Lightning callback reporting intermediate results to the pruner;
- :mod:`~lattice.sketch.storage`: RDB (SQLite) or journal storage, resumable;
- :mod:`~lattice.sketch.search`: the study and its trials, in one process or several;
- :mod:`~lattice.sketch.results`: ``best.yaml``, the trials table, the plots;
- :mod:`~lattice.sketch.lr_find`: the learning-rate range test.
"""
