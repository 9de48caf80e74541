"""The logic of ``lattice data generate``, ``lattice data consolidate`` and ``lattice data infer`` (the CLI
parses arguments and calls these)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from lattice.data.consolidate import consolidate as _consolidate
from lattice.data.infer import infer_with_reasons
from lattice.data.schema import Schema
from lattice.data.sources import CsvOptions, DataSource
from lattice.data.synthetic import SyntheticConfig, SyntheticWorld

__all__ = ["load_synthetic_config", "generate", "consolidate", "infer", "parse_inputs", "parse_names",
           "format_summary"]


def load_synthetic_config(config: Union[None, str, Mapping[str, Any], SyntheticConfig]) -> SyntheticConfig:
    """A :class:`SyntheticConfig` from ``None`` (the default world), a mapping, or a YAML file that is
    either the config itself, or holds it under ``synthetic:`` -- directly or in a data config
    (``data: {init_args: {synthetic: ...}}``, as in the ``lattice fit`` configs)."""
    if config is None:
        return SyntheticConfig()
    if isinstance(config, SyntheticConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        import yaml

        with open(config) as fh:
            doc = yaml.safe_load(fh) or {}
        found = _find(doc)
        if found is None:
            raise ValueError(f"{config}: no synthetic world configuration found (expected its fields, a "
                             f"'synthetic:' key, or data.init_args.synthetic)")
        return SyntheticConfig.from_dict(found)
    return SyntheticConfig.from_dict(dict(config))


def _find(doc: Any) -> Optional[Mapping[str, Any]]:
    if not isinstance(doc, Mapping):
        return None
    fields = set(SyntheticConfig.__dataclass_fields__)
    if doc and set(doc) <= fields:
        return doc
    if "synthetic" in doc:
        return doc["synthetic"] or {}
    for key in ("data", "init_args"):
        if key in doc:
            found = _find(doc[key])
            if found is not None:
                return found
    return None


def generate(config: Union[None, str, Mapping[str, Any], SyntheticConfig] = None, out: Optional[str] = None,
             *, overwrite: bool = False, cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Write the planted world of ``config`` to ``out`` (default: its cache folder). Returns the
    manifest (``world.json``) plus ``path``."""
    from lattice.data.cache import world_dir

    cfg = load_synthetic_config(config)
    path = os.path.abspath(out) if out else world_dir(cfg, cache_dir)
    manifest = SyntheticWorld(cfg).write(path, overwrite=overwrite or out is None)
    manifest["path"] = path
    return manifest


def parse_inputs(inputs: Sequence[str], domains: Optional[Sequence[str]] = None, csv: Optional[CsvOptions] = None,
                 ) -> List[DataSource]:
    """Sources from ``inputs``: ``PATH`` or ``DOMAIN=PATH``; ``domains[i]`` (if given) names input i's domain."""
    if domains is not None and len(domains) != len(inputs):
        raise ValueError(f"{len(domains)} domains given for {len(inputs)} inputs")
    out = []
    for i, item in enumerate(inputs):
        domain = None
        path = item
        if "=" in item and not os.path.exists(item):
            domain, path = item.split("=", 1)
        if domains is not None:
            domain = domains[i]
        out.append(DataSource(path, domain=domain, csv=csv))
    return out


def consolidate(inputs: Sequence[str], out: str, *, domains: Optional[Sequence[str]] = None,
                schema: Optional[Union[str, Schema]] = None, tasks: Optional[Sequence[str]] = None,
                row_group_size: int = 65536, rows_per_file: Optional[int] = None, compression: str = "zstd",
                validate: bool = True, overwrite: bool = False, csv: Optional[CsvOptions] = None) -> Dict[str, Any]:
    """Merge per-domain datasets into one Parquet dataset at ``out`` (see
    :func:`lattice.data.consolidate.consolidate`)."""
    sources = parse_inputs(inputs, domains, csv)
    sch = Schema.coerce(schema) if schema is not None else None
    return _consolidate(sources, out, sch, tasks=tasks, row_group_size=row_group_size, rows_per_file=rows_per_file,
                        compression=compression, validate=validate, overwrite=overwrite)


def parse_names(values: Optional[Union[str, Sequence[str]]]) -> Optional[List[str]]:
    """Names given as ``click,like``, ``[click, like]`` or repeated options, flattened (``None`` stays)."""
    if values is None:
        return None
    items = [values] if isinstance(values, str) else list(values)
    out = [name.strip() for item in items for name in str(item).split(",")]
    return [name for name in out if name]


def infer(inputs: Sequence[str], tasks: Optional[Sequence[str]] = None, *, domains: Optional[Sequence[str]] = None,
          regression_tasks: Sequence[str] = (), exclude: Sequence[str] = (), id_features: bool = True,
          length_quantile: float = 0.99, csv: Optional[CsvOptions] = None) -> str:
    """The schema of ``inputs`` (``PATH`` or ``DOMAIN=PATH``) inferred with ``tasks`` as labels, as YAML
    with a comment per decision (see :func:`lattice.data.infer.infer_with_reasons`)."""
    sources = parse_inputs(inputs, domains, csv)
    result = infer_with_reasons(sources, parse_names(tasks), regression_tasks=parse_names(regression_tasks) or (),
                                exclude=parse_names(exclude) or (), id_features=id_features,
                                length_quantile=length_quantile)
    return result.to_yaml()


def format_summary(result: Mapping[str, Any]) -> str:
    """A few human-readable lines about a generate/consolidate result."""
    lines = [f"wrote {result.get('path')}"]
    rows = result.get("rows") or result.get("rows_per_domain")
    if isinstance(rows, Mapping):
        width = max(len(str(k)) for k in rows) if rows else 0
        for k, v in rows.items():
            lines.append(f"  {str(k):<{width}}  {v:>10,} rows")
    elif rows is not None:
        lines.append(f"  {rows:,} rows")
    oracle = result.get("oracle")
    if oracle:
        lines.append("  oracle AUC: " + "; ".join(
            f"{d}: " + ", ".join(f"{t} {v['auc']:.3f}" for t, v in tasks.items()) for d, tasks in oracle.items()))
    return "\n".join(lines)
