"""Every CUDA source compiles with nvcc for sm_80 and sm_90 (and the torch glue type-checks), on machines without
a GPU: runs .ci/check_cuda.sh, which also prints each kernel's registers, shared memory and spills."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NVCC = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"


@pytest.mark.slow
@pytest.mark.skipif(not NVCC.exists() and shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_sources_compile_for_sm80_and_sm90():
    env = dict(os.environ)
    if not NVCC.exists():
        env["NVCC"] = shutil.which("nvcc")
    proc = subprocess.run([str(REPO / ".ci" / "check_cuda.sh")], cwd=REPO, env=env, capture_output=True, text=True)
    print(proc.stdout)  # the ptxas resource table, in the test log
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    # The tensor-core attention kernels compile to mma instructions (PTX wmma.mma.sync; HMMA in the SASS where
    # cuobjdump is installed), for every dtype and head-dim variant.
    report = proc.stdout.split("tensor-core instructions (csrc/cuda/jagged_attention.cu", 1)[-1]
    report = report.split("\nok ", 1)[0].split("\nFAIL", 1)[0]  # up to the next file's line
    tc = re.findall(r"^\s+attention::(attention_\w+_tc_kernel)<([^>]*)>\s+(\d+)\s+(\d+)", report, re.M)
    names = {name for name, *_ in tc}
    assert names == {"attention_fwd_tc_kernel", "attention_bwd_dq_tc_kernel", "attention_bwd_dkdv_tc_kernel"}, tc
    assert len(tc) == 3 * 3 * 3, tc  # 3 kernels x {fp16, bf16, fp32 as tf32} x head dims {32, 64, 128}
    assert all(int(mma) > 0 and int(loads) > 0 for *_, mma, loads in tc), tc


IMPL = re.compile(r'm\.impl\(\s*"(\w+)"\s*,\s*&([\w:]+)\s*\)')


def _kernels(folder):
    """{op name: (function name, source text)} from the TORCH_LIBRARY_IMPL blocks under csrc/<folder>."""
    found = {}
    for path in sorted((REPO / "csrc" / folder).glob("*.cpp")):
        text = path.read_text()
        for op, fn in IMPL.findall(text):
            found[op] = (fn.rsplit("::", 1)[-1], text)
    return found


def _signature(fn, text):
    """(return type, [parameter types]) of the definition of ``fn`` in ``text``, parameter names dropped and
    whitespace normalized: what the dispatcher compares as the kernel's C++ signature."""
    for m in re.finditer(rf"(?:^|\n)([^\n;{{}}]*?)\b{fn}\s*\(", text):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        if not text[i:].lstrip().startswith("{"):
            continue  # a call or a declaration, not the definition
        params, depth, cur = [], 0, ""
        for ch in text[m.end():i - 1]:
            depth += {"<": 1, "(": 1, ">": -1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                params.append(cur)
                cur = ""
            else:
                cur += ch
        params.append(cur)
        # c10::optional is an alias of std::optional: the same type to the dispatcher.
        norm = lambda s: re.sub(r"\s*([&*<>,])\s*", r"\1", " ".join(s.split())).replace(  # noqa: E731
            "c10::optional<", "std::optional<")
        types = [norm(re.sub(r"\s*=.*$", "", p.strip()).rsplit(None, 1)[0]) for p in params if p.strip()]
        return norm(m.group(1)), types
    raise AssertionError(f"no definition of {fn} found")


def test_cuda_kernels_have_the_cpu_kernels_signatures():
    """The dispatcher refuses to load an extension whose kernels for one op differ in C++ signature (const
    Tensor& against Tensor&, say): a CUDA build would then abort at import. Checked here, where no CUDA build
    can run."""
    cpu, cuda = _kernels("cpu"), _kernels("cuda")
    assert cuda, "no CUDA kernel registrations found"
    for op, (fn, text) in cuda.items():
        assert op in cpu, f"{op} has a CUDA kernel but no CPU kernel"
        cpu_sig, cuda_sig = _signature(*cpu[op]), _signature(fn, text)
        assert cpu_sig == cuda_sig, f"{op}: CPU kernel {cpu[op][0]}{cpu_sig} vs CUDA kernel {fn}{cuda_sig}"
