"""liblattice_ops.so, the op library for C++ processes (lattice.ops.library_path()): no Python symbols, loads with
RTLD_NOW in a fresh process after libtorch and registers every op with a CPU kernel; each instruction-set variant
(LATTICE_CPU_ISA=avx512|avx2|generic) is selectable and matches the pure-torch reference; and AVX-512 (AVX2) code
is reached only from its own variant (a shared inline function compiled for AVX-512 would crash an AVX2 host)."""
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _pooling_cases import make_case
from lattice.ops import library_path, quantize_rows_int8, reference
from lattice.ops.reference.attention import jagged_attention_reference

LIB = library_path()
OPS_CPP = Path(__file__).resolve().parents[1] / "csrc" / "ops.cpp"

# A fresh process: torch only (importing lattice would load lattice._C and register the schemas a second time).
CHILD = r"""
import ctypes, os, sys, torch
lib = ctypes.CDLL(sys.argv[1], mode=os.RTLD_NOW | os.RTLD_GLOBAL)
lib.lattice_ops_cpu_isa.restype = ctypes.c_char_p
names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("lattice::"))
cpu = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CPU")]
outs = [getattr(torch.ops.lattice, name)(*args) for name, args in torch.load(sys.argv[2])]
torch.save({"isa": lib.lattice_ops_cpu_isa().decode(), "ops": names, "cpu": cpu, "outs": outs}, sys.argv[3])
"""


def _cases():
    """``[(op, args, reference_output)]``: tails of every vector width (D = 5, 16, 37, 130), sum/mean/weighted,
    fp32 and bf16 tables, int32 and int64 ids, int8 tables, the sparse backward and causal/full attention."""
    cases = []
    for i, (D, pooling, weighted, dtype, itype) in enumerate([
            (5, 0, True, torch.float32, torch.int32), (16, 1, False, torch.float32, torch.int64),
            (37, 0, False, torch.bfloat16, torch.int64), (130, 0, True, torch.float32, torch.int64)]):
        c = make_case(i, T=3, B=9, D=D, rows=[11, 7, 13], max_len=6, pooling=pooling, weighted=weighted,
                      dtype=dtype, index_dtype=itype, trailing=2)
        cases.append(("jagged_embedding_pool", c.args, reference.jagged_embedding_pool(*c.args)))
        if dtype == torch.float32:
            q8 = (quantize_rows_int8(c.weights), *c.args[1:], D)
            cases.append(("jagged_embedding_pool_int8", q8, reference.jagged_embedding_pool_int8(*q8)))
            grad = torch.randn(c.B, c.T, D, generator=torch.Generator().manual_seed(i))
            bwd = (grad, *c.args[1:])
            cases.append(("jagged_embedding_pool_backward_sparse", bwd,
                          reference.jagged_embedding_pool_backward_sparse(*bwd)))
    g = torch.Generator().manual_seed(5)
    for Dh, causal in ((16, False), (24, True)):
        q_off, kv_off = torch.tensor([0, 3, 3, 40, 45]), torch.tensor([0, 5, 9, 9, 70])
        q, k, v = (torch.randn(int(o[-1]), 2, Dh, generator=g) for o in (q_off, kv_off, kv_off))
        args = (q, q_off, k, v, kv_off, Dh ** -0.5, causal)
        cases.append(("jagged_attention", args, jagged_attention_reference(*args)))
    return cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops_library") / "cases.pt"
    cases = _cases()
    torch.save([(name, args) for name, args, _ in cases], path)
    return path, cases


def _run_child(cases_path, isa, tmp_path):
    out = tmp_path / "outs.pt"
    env = dict(os.environ, LATTICE_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", CHILD, LIB, str(cases_path), str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit status {res.returncode}: {res.stderr[-3000:]}"
    return torch.load(out), res.stderr


def test_no_python_symbols():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", LIB], capture_output=True, text=True, check=True).stdout
    python = [s for s in (line.split()[-1] for line in out.splitlines() if line.strip()) if re.match(r"_?Py", s)]
    assert not python, f"{LIB} needs Python symbols: {python[:10]}"
    needed = subprocess.run(["readelf", "-d", LIB], capture_output=True, text=True).stdout
    assert "libtorch_cpu.so" in needed and "python" not in needed.lower(), needed


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_each_isa_variant_is_selectable_and_matches_the_reference(isa, cases, tmp_path):
    cases_path, expected = cases
    got, stderr = _run_child(cases_path, isa, tmp_path)
    if got["isa"] != isa:
        assert "cannot run it" in stderr, stderr
        pytest.skip(f"this CPU cannot run the {isa} variant ({stderr.strip()})")
    # every op csrc/ops.cpp defines is there, each with a CPU kernel
    defined = sorted("lattice::" + name for name in re.findall(r'm\.def\(\s*"(\w+)\(', OPS_CPP.read_text()))
    assert len(defined) >= 8 and got["ops"] == defined and got["cpu"] == defined, (got["ops"], got["cpu"])
    for (name, args, want), out in zip(expected, got["outs"]):
        tol = dict(atol=2e-2, rtol=2e-2) if args[0].dtype == torch.bfloat16 else dict(atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out, want, **tol, msg=lambda m: f"{name} ({isa}): {m}")


def test_unknown_isa_request_falls_back_to_the_widest_with_a_message(cases, tmp_path):
    got, stderr = _run_child(cases[0], "sse9", tmp_path)
    assert got["isa"] in ("avx512", "avx2", "generic")
    assert f"ignoring LATTICE_CPU_ISA=sse9 (expected avx512, avx2 or generic); using {got['isa']}" in stderr


def _disassembly(lib: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(registers, references)`` of every function of an ``objdump -d -C`` listing of ``lib``: the vector
    register files its code names (``ymm``, ``zmm``) and the functions it calls, jumps to or takes the address of."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", lib], capture_output=True, text=True,
                          check=True).stdout
    registers, references, name = {}, {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            registers.setdefault(name, set())
            references.setdefault(name, set())
            continue
        if name is None:
            continue
        if "mm" in line:
            registers[name].update(re.findall(r"%([yz]mm)\d", line))
        if line.endswith(">"):
            target = re.search(r"<(.*?)(?:@plt)?(?:\+0x[0-9a-f]+)?>$", line)
            if target and target.group(1) != name:
                references[name].add(target.group(1))
    return registers, references


def test_vector_code_is_reached_only_from_its_variant():
    """A host runs AVX-512 (AVX2) instructions only when it was given the AVX-512 (AVX2) variant: every function
    with zmm (ymm) code is in ``lattice_avx512::`` (or ``lattice_avx2::``), or is referenced only from such code.
    Shared inline functions of ATen/c10/libstdc++ are emitted by each variant that calls them out of line, and
    the linker keeps the first copy; with the baseline objects first and the variants in ascending order the copy
    a variant reaches is never wider than itself. This checks the result on the built library."""
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the variants are x86-64 only")
    registers, references = _disassembly(LIB)
    for reg, own in (("zmm", ("lattice_avx512",)), ("ymm", ("lattice_avx512", "lattice_avx2"))):
        wide = {f for f, regs in registers.items() if reg in regs or (reg == "ymm" and "zmm" in regs)}
        allowed = wide | {f for f in registers if any(ns in f for ns in own)}
        assert any(any(ns in f for ns in own) for f in wide), f"no {reg} code in {own}: is the variant built?"
        leaks = {f: sorted(caller for caller, refs in references.items() if f in refs and caller not in allowed)
                 for f in wide if not any(ns in f for ns in own)}
        leaks = {f: callers for f, callers in leaks.items() if callers}
        assert not leaks, f"{reg} code reached from outside {own}: " + "; ".join(
            f"{f[:120]} <- {callers[:3]}" for f, callers in list(leaks.items())[:5])
