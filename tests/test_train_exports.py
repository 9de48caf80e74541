"""lattice.train exports every name the library's docstrings and configs promise as ``lattice.train.<Name>``."""
import os
import re

import lattice.train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMISE = re.compile(r"\blattice\.train\.(\w+)\b")


def _promised() -> set:
    names = set()
    for folder in ("lattice", "configs", "docs"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".yaml", ".md")):
                    with open(os.path.join(base, name), encoding="utf-8") as fh:
                        names |= set(PROMISE.findall(fh.read()))
    submodules = {n[:-3] for n in os.listdir(os.path.dirname(lattice.train.__file__)) if n.endswith(".py")}
    return names - submodules


def test_every_promised_name_is_exported():
    promised = _promised()
    assert {"LatticeModule", "FSDP2Strategy"} <= promised  # the scan finds the docstrings' references
    assert sorted(n for n in promised if n not in lattice.train.__all__) == []
    assert all(hasattr(lattice.train, n) for n in lattice.train.__all__)
