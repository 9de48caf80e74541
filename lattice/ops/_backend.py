"""Which implementation the op front ends call: the compiled kernels or the pure-torch references.

``LATTICE_OPS=reference`` in the environment (or :func:`set_backend`) swaps every lattice op for its
reference, so a run can measure what the kernels buy end to end.
"""
import contextlib
import os

_VALID = ("kernel", "reference")
_backend = os.environ.get("LATTICE_OPS", "kernel")
if _backend not in _VALID:
    raise ValueError(f"LATTICE_OPS must be one of {_VALID}, got {_backend!r}")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    global _backend
    if name not in _VALID:
        raise ValueError(f"lattice ops backend must be one of {_VALID}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_reference() -> bool:
    return _backend == "reference"
