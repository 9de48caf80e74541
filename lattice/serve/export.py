"""Export a trained model: ``torch.export`` of its :class:`~lattice.serve.inference.InferenceModule` with a
dynamic batch size and dynamic jagged lengths, then AOTInductor into one ``.pt2`` package.

The lattice custom ops (``torch.ops.lattice.*``) stay extern calls in the compiled package: AOTInductor's
proxy executor looks them up in the dispatcher when the package is loaded, so the loading process must have
lattice's op library registered (``import lattice`` in Python).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

import lattice
from lattice.serve.inference import InferenceModule
from lattice.serve.inputs import random_inputs
from lattice.serve.package import Manifest, PackageError, write_side_files

__all__ = ["MAX_BATCH", "dynamic_shapes", "inference_module", "export_program", "compile_package", "verify_package", "export_package",
           "manifest_of"]

MAX_BATCH = 1 << 20
PathLike = Union[str, os.PathLike]


def dynamic_shapes(module: InferenceModule) -> dict:
    """``torch.export`` dynamic shapes of the flat inputs: the batch ``B`` (1..:data:`MAX_BATCH`), the number
    of sparse ids and of sequence events (0..; per feature when the sequence features are parallel attributes
    of the same events), offsets of ``F * B + 1`` entries."""
    B = Dim("batch", min=1, max=MAX_BATCH)
    Fs, Fq = len(module.sparse_keys), len(module.sequence_keys)
    n_sparse = Dim("sparse_ids", min=0)
    n_events = Dim("sequence_events", min=0)
    shapes = {
        "dense": {0: B}, "dense_mask": {0: B},
        "sparse_values": {0: n_sparse}, "sparse_offsets": {0: Fs * B + 1}, "sparse_mask": {0: B},
        # parallel sequence features: values [Fq, events] (one event list, Fq attributes), timestamps [events]
        "sequence_values": {1 if module.parallel_sequences else 0: n_events}, "sequence_offsets": {0: Fq * B + 1},
        "sequence_timestamps": {0: n_events},
        "domain": {0: B},
    }
    if module.has_teacher_token:
        shapes.update(teacher_embedding={0: B}, teacher_mask={0: B})
    return shapes


def _example(module: InferenceModule) -> tuple[Tensor, ...]:
    # Several rows and non-empty bags and sequences, so that no size is 0 or 1 while tracing (those would
    # be specialized); the exported program then serves any batch, empty bags and sequences included.
    for seed in range(100):
        x = random_inputs(module.schema, 8, seed=seed, empty_rate=0.0, absent_rate=0.0,
                          teacher_embedding_dim=module.teacher_embedding_dim)
        if all(t.shape[-1] > 1 for t in x[:9]):
            return x
    raise ValueError("cannot draw an export example with non-empty bags for this schema")


def inference_module(model: Union[nn.Module, InferenceModule], quantization: str = "none") -> InferenceModule:
    """``model`` as an :class:`InferenceModule` with tables in ``quantization`` (an inference module is taken as
    it is; asking it for another quantization than it has is an error)."""
    if not isinstance(model, InferenceModule):
        return InferenceModule(model, quantization)
    if quantization not in ("none", model.quantization):
        raise ValueError(f"quantization={quantization!r}, but the inference module given was built with "
                         f"quantization={model.quantization!r}: build it with InferenceModule(model, "
                         f"quantization={quantization!r})")
    return model


def export_program(model: Union[nn.Module, InferenceModule],
                   quantization: str = "none") -> tuple[InferenceModule, ExportedProgram]:
    """``(inference_module, exported_program)`` of a trained lattice network, LatticeModule or
    DistillationModule (see :class:`~lattice.serve.inference.InferenceModule`), its tables in ``quantization``
    (``"none"`` or ``"int8"``)."""
    module = inference_module(model, quantization)
    example = _example(module)
    names = module.input_names
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes={k: v for k, v in dynamic_shapes(module).items()
                                                                        if k in names}, strict=False)
    return module, program


def compile_package(program: ExportedProgram, out: PathLike) -> Path:
    """AOTInductor-compile ``program`` into the package file ``out`` (``.pt2``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.unlink()
    torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    return out


def verify_package(path: PathLike, module: InferenceModule, tolerance: float = 1e-4) -> float:
    """Score random requests (batch 1, 7 and 64, empty bags and sequences included) with the compiled package
    and with ``module``; raise :class:`~lattice.serve.package.PackageError` when they differ by more than
    ``tolerance`` (a wrong package is never written). Returns the largest difference."""
    runner = torch._inductor.aoti_load_package(str(path))
    worst = 0.0
    for B, seed in ((1, 0), (7, 1), (64, 2)):
        x = random_inputs(module.schema, B, seed=seed, teacher_embedding_dim=module.teacher_embedding_dim)
        with torch.no_grad():
            expected = module(*x)
        got = runner(*x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        diff = float((got - expected).abs().max())
        worst = max(worst, diff)
        if not diff <= tolerance:
            hint = (" (AOTInductor is known to miscompile the MaskNet merge of parallel sequence features: "
                    "build the network with sequence_merge='concat')" if module.parallel_sequences else "")
            raise PackageError(f"the compiled package {str(path)!r} differs from the eager model by {diff:.2e} at "
                               f"batch {B} (tolerance {tolerance:g}); not writing it{hint}")
    return worst


def manifest_of(module: InferenceModule, network_class: str) -> Manifest:
    """The :class:`~lattice.serve.package.Manifest` of an inference module (its quantization included)."""
    return Manifest(
        lattice_version=lattice.__version__, torch_version=str(torch.__version__), network_class=network_class,
        tasks=[{"name": t.name, "kind": t.kind} for t in module.schema.tasks],
        domains=list(module.schema.domain_names), input_names=list(module.input_names),
        schema_fingerprint=module.schema.fingerprint(), quantization=module.quantization,
        teacher_embedding_dim=module.teacher_embedding_dim,
    )


def network_class_of(model: nn.Module) -> str:
    """Dotted class path of the network that serves (a DistillationModule's student network, a
    LatticeModule's network, or the network itself)."""
    net = getattr(model, "network", None)
    target = net if isinstance(net, nn.Module) and not hasattr(model, "schema") else model
    cls = type(target)
    return f"{cls.__module__}.{cls.__qualname__}"


def export_package(model: nn.Module, out: PathLike, log=print, quantization: str = "none") -> tuple[Path, Manifest]:
    """Export ``model`` to the package ``out`` (``model.pt2``) plus its schema and manifest beside it.

    Args:
        model: a trained lattice network, LatticeModule or DistillationModule.
        out: the ``.pt2`` path to write.
        log: progress messages (``None``: quiet).
        quantization: the served tables' format, ``"none"`` or ``"int8"`` (recorded in the manifest). The
            compiled package is verified against the eager module of the same format.
    """
    if Path(out).suffix != ".pt2":
        raise ValueError(f"--out must name a .pt2 file, got {str(out)!r}")
    network_class = network_class_of(model)
    module, program = export_program(model, quantization)
    if log:
        tables = "" if module.quantization == "none" else f", {module.quantization} tables"
        log(f"exported {network_class} ({len(module.task_names)} tasks{tables}); compiling with AOTInductor")
    path = compile_package(program, out)
    try:
        verify_package(path, module)
    except PackageError:
        path.unlink()
        raise
    manifest = manifest_of(module, network_class)
    schema_path, manifest_path = write_side_files(path, module.schema, manifest)
    if log:
        log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB), "
            f"{schema_path.name}, {manifest_path.name}")
    return path, manifest
