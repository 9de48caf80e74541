"""Fixtures shared by the test modules. A module opts in to one with
``pytestmark = pytest.mark.usefixtures("<name>")``; helpers that are plain functions live in the
``tests/_*.py`` modules."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# The repository root, so that tests import the benchmarks as modules (``from benchmarks import bench_x``).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest workers share the cores: each keeps its own in-process ops on one thread, so neither waits in an
    # OpenMP barrier for a thread the other has descheduled. Subprocesses a test starts keep torch's default.
    torch.set_num_threads(1)


@pytest.fixture
def single_thread():
    """Runs a test on one intra-op thread: these tensors are tiny, and on a busy 2-core machine every
    OpenMP region otherwise waits for a descheduled second thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
