"""Numbers read from YAML: PyYAML (YAML 1.1) reads ``1e-3`` and ``2.0e6`` as strings, so those are accepted too."""
from __future__ import annotations

import math
from typing import Any


def as_number(what: str, value: Any) -> float | int:
    """``value`` as a finite int or float; a ``ValueError`` naming ``what`` otherwise."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{what}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what}: expected a finite number, got {value!r}")
    return value
