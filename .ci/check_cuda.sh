#!/usr/bin/env bash
# Compile checks for the CUDA sources on a machine without a GPU (nvcc with the runtime headers only):
#  1. every csrc/cuda/*.cu with nvcc for sm_80 and sm_90, -Xptxas -v, printing each kernel's registers,
#     shared memory, stack and spills (fails on any error);
#  2. tensor-core instructions: each .cu file's PTX (first arch) is scanned per kernel for wmma/mma
#     instructions (and, where cuobjdump is installed, the SASS for HMMA); a kernel named *_tc_kernel without
#     any fails the check, so a tensor-core kernel cannot silently compile to FMA code;
#  3. every csrc/cuda/*.cpp (the torch glue) through g++ -fsyntax-only against the installed torch's c10/cuda
#     headers. A CPU-only torch wheel ships those headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
#     so a one-line stand-in is supplied; ATen/cuda/CUDAContext.h (cuBLAS/cuSPARSE) is not usable here, so the
#     glue must not include it. This type-checks the glue; it cannot link it (no CUDA torch here).
# Usage: .ci/check_cuda.sh [--quiet]   (NVCC, CXX, CUDA_HOME, ARCHS="80 90" override)
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
CXX=${CXX:-g++}
ARCHS=${ARCHS:-"80 90"}
QUIET=${1:-}
if [[ ! -x "$NVCC" ]]; then
  echo "check_cuda: nvcc not found at $NVCC" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0

shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)
echo "== nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') : ${#cu_files[@]} .cu file(s), sm_${ARCHS// /, sm_}"
gencode=()
for a in $ARCHS; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
for f in "${cu_files[@]}"; do
  log="$tmp/$(basename "$f").log"
  # One nvcc call per file for all architectures (the host side is compiled once).
  if ! "$NVCC" -std=c++17 --expt-relaxed-constexpr -O3 -lineinfo -Xptxas -v -Xcompiler -Wall "${gencode[@]}" \
      -Icsrc/include -c "$f" -o "$tmp/out.o" >"$log" 2>&1; then
    echo "FAIL $f"
    cat "$log"
    status=1
    continue
  fi
  if grep -q "warning" "$log"; then grep "warning" "$log" | sort -u | sed 's/^/  /'; fi
  echo "ok   $f (sm_${ARCHS// /, sm_})"
  [[ "$QUIET" == "--quiet" ]] || python3 - "$log" <<'PY'
import re, subprocess, sys
rows, cur = [], None
for line in open(sys.argv[1]):
    m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2), "stack": 0, "spill_st": 0, "spill_ld": 0, "regs": 0, "smem": 0}
        rows.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", line)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", line)
        cur["smem"] = int(s.group(1)) if s else 0
if rows:
    names = subprocess.run(["c++filt"], input="\n".join(r["name"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines()
    for r, n in zip(rows, names):
        n = re.sub(r"^void ", "", n)
        depth, cut = 0, len(n)
        for i, ch in enumerate(n):
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        r["short"] = n[:cut].replace("lattice::cuda::", "").replace("(anonymous namespace)::", "")
    w = max(len(r["short"]) for r in rows)
    for arch in sorted({r["arch"] for r in rows}):
        print(f"  {'kernel (sm_' + arch + ')':<{w}}  regs  smem(B)  stack(B)  spill st/ld(B)")
        for r in sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["short"]):
            print(f"  {r['short']:<{w}}  {r['regs']:>4}  {r['smem']:>7}  {r['stack']:>8}  {r['spill_st']:>6}/{r['spill_ld']}")
PY
done

# Tensor-core instructions per kernel (PTX; SASS HMMA counts when cuobjdump is available).
first_arch=${ARCHS%% *}
for f in "${cu_files[@]}"; do
  "$NVCC" -std=c++17 --expt-relaxed-constexpr -O3 -arch=compute_$first_arch -Icsrc/include -ptx "$f" \
      -o "$tmp/tc.ptx" >/dev/null 2>&1 || continue
  sass=""
  if command -v cuobjdump >/dev/null 2>&1 || [[ -x "$CUDA_HOME/bin/cuobjdump" ]]; then
    "$NVCC" -std=c++17 --expt-relaxed-constexpr -O3 -gencode "arch=compute_$first_arch,code=sm_$first_arch" \
        -Icsrc/include -cubin "$f" -o "$tmp/tc.cubin" >/dev/null 2>&1 &&
      "$(command -v cuobjdump || echo "$CUDA_HOME/bin/cuobjdump")" -sass "$tmp/tc.cubin" >"$tmp/tc.sass" 2>/dev/null &&
      sass="$tmp/tc.sass"
  fi
  python3 - "$tmp/tc.ptx" "$first_arch" "$f" "$sass" <<'PY' || status=1
import re, subprocess, sys
ptx, arch, src, sass = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
counts, cur = {}, None
for line in open(ptx):
    m = re.match(r"\s*\.(?:visible\s+)?\.entry\s+(\S+?)\(", line)
    if m:
        cur = m.group(1)
        counts[cur] = [0, 0, None]
        continue
    if cur and re.search(r"\b(wmma\.mma|mma)\.sync", line):
        counts[cur][0] += 1
    if cur and re.search(r"\bwmma\.load", line):
        counts[cur][1] += 1
if sass:
    cur = None
    for line in open(sass):
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1)
            if cur in counts:
                counts[cur][2] = 0
            continue
        if cur in counts and re.search(r"\bHMMA\b", line):
            counts[cur][2] += 1
names = list(counts)
demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
short = {n: re.sub(r"\(.*$", "", d.replace("void ", "", 1)).replace("lattice::cuda::", "") for n, d in zip(names, demangled)}
bad = [short[n] for n in names if "_tc_kernel" in short[n] and counts[n][0] == 0]
rows = [n for n in names if counts[n][0] or "_tc_kernel" in short[n]]
if rows:
    print(f"  tensor-core instructions ({src}, compute_{arch} PTX{', sm_' + arch + ' SASS' if sass else ''}):")
    w = max(len(short[n]) for n in rows)
    print(f"  {'kernel':<{w}}  mma.sync  wmma.load" + ("  HMMA" if sass else ""))
    for n in sorted(rows, key=lambda n: short[n]):
        extra = f"  {counts[n][2]:>4}" if sass else ""
        print(f"  {short[n]:<{w}}  {counts[n][0]:>8}  {counts[n][1]:>9}{extra}")
for b in bad:
    print(f"FAIL {b}: a tensor-core kernel without mma instructions")
sys.exit(1 if bad else 0)
PY
done

torch_inc=$(python3 -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null || true)
if [[ ${#cpp_files[@]} -gt 0 ]]; then
  if [[ -n "$torch_inc" && -d "$torch_inc/c10/cuda" ]]; then
    mkdir -p "$tmp/stub/c10/cuda/impl"
    if [[ ! -f "$torch_inc/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
      printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    fi
    for f in "${cpp_files[@]}"; do
      if "$CXX" -std=c++17 -fsyntax-only -Wall -DLATTICE_WITH_CUDA=1 -I"$tmp/stub" -I"$torch_inc" \
          -I"$torch_inc/torch/csrc/api/include" -I"$CUDA_HOME/include" -Icsrc/include -Icsrc/cuda "$f" \
          >"$tmp/cpp.log" 2>&1; then
        echo "ok   $f (g++ -fsyntax-only against torch's c10/cuda headers)"
      else
        echo "FAIL $f"
        cat "$tmp/cpp.log"
        status=1
      fi
    done
  else
    echo "skip ${cpp_files[*]}: torch's c10/cuda headers not found"
  fi
fi
exit $status
