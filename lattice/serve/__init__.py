"""Serving: the flat-tensor inference module, export (torch.export + AOTInductor) and the Predictor.

See docs/serving.md. ``lattice export`` and ``lattice predict --package`` are in :mod:`lattice.serve.commands`.
"""
from lattice.serve.export import export_package, export_program, verify_package
from lattice.serve.inference import InferenceModule
from lattice.serve.package import Manifest, PackageError, read_package
from lattice.serve.predictor import Predictor

__all__ = ["InferenceModule", "export_program", "export_package", "verify_package", "Manifest", "PackageError",
           "read_package", "Predictor"]
