"""Running the multi-process test workers (tests/parallel_worker.py, tests/faults_worker.py) as subprocesses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def session_env(extra: dict | None = None) -> dict:
    """This process's environment for a test subprocess: tests/ and the repository importable, one thread, no
    inherited rank variables, then ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS, env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    env.update(extra or {})
    return env


def run_in_session(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Runs ``command`` from the repository root in its own session (so its kills stay inside) and reaps the session:
    processes still alive in it 30 s after the main one ended are killed and listed in ``.leftover``."""
    child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    finally:
        # Ranks still alive in the session once its main process ended: they would be leaked.
        deadline = time.monotonic() + 30
        while session_processes(child.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftover = session_processes(child.pid)
        if leftover or child.poll() is None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc = subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)
    proc.leftover = leftover
    return proc


def run_worker(script: str, *args: str, timeout: float = 300, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Runs ``python tests/<script> args...`` in its own session, 1 thread per rank."""
    proc = run_in_session([sys.executable, os.path.join(TESTS, script), *args], session_env(), timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def load(path: str) -> dict:
    return torch.load(path, weights_only=False)


def flatten(obj, prefix: str = ""):
    """``(path, leaf)`` pairs of nested dicts / lists (optimizer state dicts)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


def assert_same_tree(a, b, atol: float = 0.0, what: str = "") -> None:
    """Every leaf of ``a`` equals ``b``'s (tensors within ``atol``; 0 = bitwise)."""
    fa, fb = dict(flatten(a)), dict(flatten(b))
    assert fa.keys() == fb.keys(), f"{what}: keys differ: {sorted(set(fa) ^ set(fb))[:10]}"
    for key, x in fa.items():
        y = fb[key]
        if isinstance(x, torch.Tensor):
            assert x.shape == y.shape and x.dtype == y.dtype, f"{what}{key}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"
            if atol == 0.0 or not x.is_floating_point():
                assert torch.equal(x, y), f"{what}{key} differs (max |diff| {(x.double() - y.double()).abs().max()})"
            else:
                torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{what}{key}: {m}")
        else:
            assert x == y or (x != x and y != y), f"{what}{key}: {x!r} vs {y!r}"


def session_processes(session_id: int) -> list:
    """Pids of live (non-zombie) processes in session ``session_id``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:
            pids.append(int(entry))
    return pids
