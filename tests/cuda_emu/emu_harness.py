"""Builds and drives emulated CUDA test libraries (see csrc/testing/cuda_emu/README.md).

An emulated library is a shared object compiled with g++ from the emulator runtime, the kernel sources under
test (``csrc/cuda/*.cu`` compiled as C++ with ``-include cuda_emu.h``) and C entry points; it is cached under
``.cache/cuda_emu/`` (or ``$LATTICE_EMU_CACHE``) by a hash of every source it could include, and loaded with
ctypes. Entry points return 0 or 1 with a message; :meth:`EmuLibrary.call` turns the message into
:class:`EmuError`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EMU_DIR = REPO / "csrc" / "testing" / "cuda_emu"
CXX = os.environ.get("CXX", "g++")
FLAGS = [
    "-std=c++17",
    "-O2",
    "-g",
    "-fPIC",
    "-shared",
    "-pthread",
    "-fno-strict-aliasing",
    # Out-of-bounds indexing of fixed-size arrays (static __shared__ and local arrays) traps; the emulator
    # reports the trap with the kernel and thread.
    "-fsanitize=bounds",
    "-fsanitize-undefined-trap-on-error",
    "-Wall",
    "-Wno-unused-function",
    "-DLATTICE_CUDA_EMULATION=1",
    f"-I{EMU_DIR / 'include'}",
    f"-I{EMU_DIR}",
    f"-I{REPO / 'csrc' / 'include'}",
    f"-I{REPO / 'csrc'}",
    "-include",
    str(EMU_DIR / "cuda_emu.h"),
    "-Wl,-Bsymbolic",
]
# Everything an emulated build may include: a change anywhere here rebuilds.
_WATCHED = [EMU_DIR, REPO / "csrc" / "cuda", REPO / "csrc" / "include"]

SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}
ALIGNS = {"end": 0, "start": 1}


class EmuError(RuntimeError):
    """An error reported by an emulated kernel run (or by the launcher code's own checks)."""


def compiler_available() -> bool:
    return shutil.which(CXX) is not None


def _digest(sources) -> str:
    h = hashlib.sha256()
    h.update(" ".join([CXX, *FLAGS]).encode())
    files = set()
    for root in _WATCHED:
        if root.exists():
            files.update(p for p in root.rglob("*") if p.is_file() and p.suffix in {".h", ".cuh", ".cu", ".cpp"})
    files.update(Path(s) for s in sources)
    for p in sorted(files):
        h.update(str(p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:20]


def build(name: str, sources) -> Path:
    """Compiles ``sources`` (paths; ``.cu`` files are compiled as C++) plus the emulator runtime into a cached
    shared object and returns its path."""
    sources = [Path(s).resolve() for s in sources]
    cache = Path(os.environ.get("LATTICE_EMU_CACHE", REPO / ".cache" / "cuda_emu"))
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{name}-{_digest(sources)}.so"
    if target.exists():
        return target
    cmd = [CXX, *FLAGS, str(EMU_DIR / "cuda_emu.cpp")]
    for s in sources:
        cmd += ["-x", "c++", str(s), "-x", "none"] if s.suffix in {".cu", ".cuh"} else [str(s)]
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=cache)
    os.close(fd)
    cmd += ["-o", tmp, "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"emulated build of {name} failed:\n{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    os.replace(tmp, target)
    return target


def _arg(a):
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu" or not a.is_contiguous():
            raise ValueError("emulated entry points take contiguous CPU tensors")
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, bool):
        return ctypes.c_int(int(a))
    if isinstance(a, int):
        return ctypes.c_longlong(a)
    if isinstance(a, float):
        return ctypes.c_double(a)
    if a is None:
        return ctypes.c_void_p(0)
    return a


class EmuLibrary:
    """A loaded emulated library. ``call("fn", *args)`` passes tensors as pointers; ints become ``long long``
    unless the entry point's ctypes ``argtypes`` say otherwise (set them with :meth:`signature`)."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.lattice_emu_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double]
        self.lib.lattice_emu_configure.restype = None
        self.lib.lattice_emu_live_allocations.restype = ctypes.c_ulonglong

    def signature(self, fn: str, *argtypes):
        """Declares an entry point's leading arguments (the trailing ``char* err, size_t err_len`` are added)."""
        f = getattr(self.lib, fn)
        f.argtypes = [*argtypes, ctypes.c_char_p, ctypes.c_size_t]
        f.restype = ctypes.c_int
        return self

    def configure(self, schedule: str = "forward", seed: int = 0, align: str = "end", timeout_s: float = 120.0):
        """Thread/block schedule (forward, reverse, random with a seed) and device-buffer alignment (``end``:
        the data ends at a guard page; ``start``: it starts right after one)."""
        self.lib.lattice_emu_configure(SCHEDULES[schedule], seed, ALIGNS[align], timeout_s)

    def call(self, fn: str, *args):
        err = ctypes.create_string_buffer(4096)
        f = getattr(self.lib, fn)
        if f.argtypes is None:
            f.restype = ctypes.c_int
            converted = [_arg(a) for a in args]
        else:
            converted = [_arg(a) if isinstance(a, torch.Tensor) or a is None else a for a in args]
        rc = f(*converted, err, ctypes.sizeof(err))
        if rc != 0:
            raise EmuError(err.value.decode(errors="replace"))
        return rc

    def stats(self):
        out = (ctypes.c_ulonglong * 4)()
        self.lib.lattice_emu_stats(out)
        return dict(zip(("launches", "blocks", "threads", "switches"), list(out)))

    def live_allocations(self) -> int:
        return int(self.lib.lattice_emu_live_allocations())


_loaded: dict[str, EmuLibrary] = {}


def load(name: str, sources) -> EmuLibrary:
    """Builds (if needed) and loads an emulated library; cached per process."""
    path = build(name, sources)
    key = str(path)
    if key not in _loaded:
        _loaded[key] = EmuLibrary(path)
    return _loaded[key]


# Schedules a test runs every kernel under: in order, reversed, and two seeded random interleavings, with
# device buffers aligned to the trailing guard page and, for one run, to the leading one.
DEFAULT_RUNS = (
    dict(schedule="forward", seed=0, align="end"),
    dict(schedule="reverse", seed=0, align="start"),
    dict(schedule="random", seed=1, align="end"),
    dict(schedule="random", seed=2, align="start"),
)


def run_all_schedules(lib: EmuLibrary, fn, runs=DEFAULT_RUNS):
    """Calls ``fn()`` once per schedule in ``runs`` (configuring ``lib`` first) and returns the results; the
    configuration is reset to the default afterwards."""
    results = []
    try:
        for cfg in runs:
            lib.configure(**cfg)
            results.append(fn())
    finally:
        lib.configure()
    return results


def assert_schedule_independent(lib: EmuLibrary, fn, check, runs=DEFAULT_RUNS):
    """Runs ``fn`` under every schedule and calls ``check(result, cfg)`` on each (it should assert against a
    reference). A race shows up as a failure under at least one schedule."""
    for cfg, result in zip(runs, run_all_schedules(lib, fn, runs)):
        try:
            check(result, cfg)
        except AssertionError as e:
            raise AssertionError(f"under schedule {cfg}: {e}") from e
