"""The files of a serving package and the checks made when one is loaded.

``lattice export --out model.pt2`` writes three files side by side:

- ``model.pt2``: the AOTInductor package (compiled graph and weights);
- ``model.schema.yaml``: the data schema the model was trained on (what the :class:`~lattice.serve.Predictor`
  validates requests against);
- ``model.manifest.yaml``: :class:`Manifest` (versions, network class, tasks, domains, inputs, quantization,
  the schema's fingerprint).

:func:`read_package` reads the two side files and refuses a package built by another lattice or torch version,
or whose schema is not the one it was built with (or not the one the caller expects).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

import lattice
from lattice.data.schema import Schema

__all__ = ["FORMAT_VERSION", "Manifest", "PackageError", "side_paths", "write_side_files", "read_package"]

FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]


class PackageError(RuntimeError):
    """A serving package that cannot be used here (missing file, other version, other schema)."""


@dataclass
class Manifest:
    """What a package says about itself (``model.manifest.yaml``)."""

    lattice_version: str
    torch_version: str
    network_class: str
    tasks: list[dict[str, str]]
    domains: list[str]
    input_names: list[str]
    schema_fingerprint: str
    quantization: str = "none"
    teacher_embedding_dim: Optional[int] = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]


def side_paths(package: PathLike) -> tuple[Path, Path]:
    """``(schema_yaml, manifest_yaml)`` beside ``package`` (``model.pt2`` -> ``model.schema.yaml``,
    ``model.manifest.yaml``)."""
    package = Path(package)
    stem = package.with_suffix("") if package.suffix else package
    return stem.with_name(stem.name + ".schema.yaml"), stem.with_name(stem.name + ".manifest.yaml")


def write_side_files(package: PathLike, schema: Schema, manifest: Manifest) -> tuple[Path, Path]:
    """Write the schema and manifest beside ``package``; returns their paths."""
    schema_path, manifest_path = side_paths(package)
    schema.to_yaml(schema_path)
    manifest_path.write_text(yaml.safe_dump(asdict(manifest), sort_keys=False))
    return schema_path, manifest_path


def read_package(package: PathLike, expected_schema: Optional[Schema] = None) -> tuple[Schema, Manifest]:
    """``(schema, manifest)`` of a package, after checking it can run here.

    Raises :class:`PackageError` naming both sides when the package was built with another lattice or torch
    version, when its schema file is not the one it was built with, or when ``expected_schema`` differs.
    """
    package = Path(package)
    schema_path, manifest_path = side_paths(package)
    for path, what in ((package, "package"), (schema_path, "schema"), (manifest_path, "manifest")):
        if not path.is_file():
            raise PackageError(f"serving {what} {str(path)!r} not found (lattice export writes model.pt2, "
                               "model.schema.yaml and model.manifest.yaml side by side)")
    raw = yaml.safe_load(manifest_path.read_text()) or {}
    if not isinstance(raw, dict) or "lattice_version" not in raw:
        raise PackageError(f"{str(manifest_path)!r} is not a lattice serving manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise PackageError(f"package {str(package)!r} has manifest format {raw.get('format_version')!r}; this lattice "
                           f"{lattice.__version__} reads format {FORMAT_VERSION}")
    known = set(Manifest.__dataclass_fields__)
    manifest = Manifest(**{k: v for k, v in raw.items() if k in known})
    if manifest.lattice_version != lattice.__version__:
        raise PackageError(f"package {str(package)!r} was exported with lattice {manifest.lattice_version}, but this "
                           f"is lattice {lattice.__version__}: export it again with this version")
    if manifest.torch_version != str(torch.__version__):
        raise PackageError(f"package {str(package)!r} was compiled with torch {manifest.torch_version}, but this is "
                           f"torch {torch.__version__}: export it again with this version")
    schema = Schema.from_yaml(schema_path)
    if schema.fingerprint() != manifest.schema_fingerprint:
        raise PackageError(f"schema {str(schema_path)!r} (fingerprint {schema.fingerprint()}) is not the schema "
                           f"package {str(package)!r} was exported with (fingerprint {manifest.schema_fingerprint})")
    if expected_schema is not None and expected_schema.fingerprint() != manifest.schema_fingerprint:
        raise PackageError(f"package {str(package)!r} was exported for schema {manifest.schema_fingerprint}, but the "
                           f"expected schema is {expected_schema.fingerprint()}: "
                           f"{_first_difference(schema, expected_schema)}")
    return schema, manifest


def _first_difference(package: Schema, expected: Schema) -> str:
    """A few words on how two schemas differ (features, tasks or domains), for error messages."""
    for what, a, b in (("features", package.feature_names, expected.feature_names),
                       ("tasks", package.task_names, expected.task_names),
                       ("domains", package.domain_names, expected.domain_names)):
        if list(a) != list(b):
            return f"the package's {what} are {list(a)}, the expected schema's {list(b)}"
    return "same names, different feature/task settings"
