#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build lattice with its CUDA kernels, run the CUDA tests on the GPU (one
# process per file; a file that crashes is re-run under cuda-gdb for a native backtrace), the CPU kernels'
# bad-input tests under that machine's torch, the compile/resource report, the CUDA kernel benchmarks, an
# end-to-end `lattice fit` on the GPU and a compute-sanitizer memcheck pass over the float32 CUDA tests; print
# their tables. The attention benchmark also times torch's varlen_attn and flash_attn_varlen_func (when
# installed) and the dispatched path (lattice.ops.jagged_attention_output) against the best of them and padded
# SDPA, and records whether varlen_attn's causal mask is aligned as ours; every benchmark writes its JSON to
# GPU_CHECK_OUT (the figures docs/cuda.md quotes and the attention dispatch table is revised from).
#
# Usage: benchmarks/gpu_check.sh [--quick]    (--quick: smoke-sized benchmarks)
# Needs a CUDA build of torch and nvcc (CUDA_HOME). Every step runs even when an earlier one failed (a build
# failure stops the rest); the exit status is non-zero when any step failed.
# Environment:
#   PYTHON              interpreter holding the CUDA torch (default python3)
#   GPU_CHECK_OUT       folder for the logs and benchmark JSON (default benchmarks/results/gpu)
#   GPU_CHECK_STEPS     steps to run (default "build ptxas tests cpu_errors bench fit sanitize"; add "emu" for the
#                       emulated-kernel tests, which CI runs anyway, or "asan_cpu" for the CPU kernels under
#                       AddressSanitizer on this host's SIMD paths, about 3 minutes)
#   GPU_CHECK_SANITIZE_S  time limit of the compute-sanitizer step in seconds (default 150)
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${1:-}
PYTHON=${PYTHON:-python3}
OUT_DIR=${GPU_CHECK_OUT:-benchmarks/results/gpu}
STEPS=" ${GPU_CHECK_STEPS:-build ptxas tests cpu_errors bench fit sanitize} "
mkdir -p "$OUT_DIR"
failed=()

want() { [[ "$STEPS" == *" $1 "* ]]; }
# step NAME CMD...: runs CMD with its output shown and kept in $OUT_DIR/NAME.log; records a failure.
step() {
  local name=$1; shift
  echo
  echo "== $name ($(date +%T))"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: exit $rc, $((SECONDS - t0)) s"
  [[ $rc -eq 0 ]] || failed+=("$name")
  return "$rc"
}

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no GPU: install a CUDA build of torch')" \
  || exit 2

if want build; then
  # --no-deps: the build needs only the installed torch; --no-build-isolation: never fetch another torch.
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if ! step build env LATTICE_FORCE_CUDA=1 "$PYTHON" -m pip install -v --no-deps --no-build-isolation -e .; then
    echo "build failed: see $OUT_DIR/build.log"
    exit 1
  fi
fi
"$PYTHON" -c "import sys; from lattice.ops import _library as l; sys.exit(0 if l.has_cuda_kernels() else 'built without CUDA kernels')" \
  || exit 1

if want ptxas; then
  step ptxas .ci/check_cuda.sh
fi

# A crash (a signal, not a test failure) re-runs the file under cuda-gdb for a native backtrace.
native_backtrace() {
  local name=$1; shift
  if command -v cuda-gdb >/dev/null; then
    echo "-- $name crashed: its native backtrace, from cuda-gdb, in $OUT_DIR/${name}_gdb.log"
    timeout 300 cuda-gdb -batch -ex "set pagination off" -ex run -ex bt -ex "info threads" --args "$@" \
      >"$OUT_DIR/${name}_gdb.log" 2>&1
    grep -A40 -m1 "received signal" "$OUT_DIR/${name}_gdb.log" || tail -n 40 "$OUT_DIR/${name}_gdb.log"
  fi
}

if want tests; then
  shopt -s nullglob
  PYEXE=$("$PYTHON" -c "import sys; print(sys.executable)")  # the binary itself (a debugger cannot run a shim)
  # One process per file: a crash in one file leaves the others' results standing.
  for f in tests/test_*cuda*.py; do
    name=tests_$(basename "$f" .py)
    step "$name" "$PYTHON" -m pytest -q -p no:cacheprovider "$f"
    rc=$?
    if ((rc > 128)); then native_backtrace "$name" "$PYEXE" -m pytest -x -q -p no:cacheprovider "$f"; fi
  done
fi

if want cpu_errors; then
  # The CPU kernels' bad-input tests under this machine's torch: tells a crash of the CUDA glue's error path from
  # one of the torch build itself.
  # test_pooling_build.py: the build takes libstdc++ from the shared library (a static copy crashes error paths).
  step cpu_errors "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_pooling_errors.py tests/test_attention_op.py \
    tests/test_pooling_build.py -k "bad or error or range or offsets or dtypes or shapes or arguments or runtime"
fi

if want asan_cpu; then
  # The CPU kernels under AddressSanitizer, built for this host's SIMD (often AVX-512 on GPU machines, which the
  # CI machine may lack).
  step asan_cpu env PYTHON="$PYTHON" .ci/asan.sh
fi

if want emu; then
  step emu "$PYTHON" -m pytest -q -p no:cacheprovider tests/cuda_emu
fi

if want bench; then
  args=()
  [[ "$QUICK" == "--quick" ]] && args=(--smoke)
  for b in benchmarks/bench_*_cuda.py; do
    name=$(basename "$b" .py)
    step "$name" "$PYTHON" "$b" --out "$OUT_DIR/$name.json" ${args[@]+"${args[@]}"}
  done
fi

if want fit; then
  # The README's main job on the GPU: the whole pipeline (Parquet reader, fused sparse optimizer inside the
  # backward, jagged attention, metrics) with the CUDA kernels.
  epochs=3
  [[ "$QUICK" == "--quick" ]] && epochs=1
  step fit "$PYTHON" -c "import sys; from lattice.cli import main; sys.exit(main())" fit \
    --config configs/quickstart.yaml --trainer.accelerator gpu --trainer.devices 1 \
    --trainer.max_epochs "$epochs" --trainer.default_root_dir "$OUT_DIR/fit" \
    --trainer.logger.init_args.save_dir "$OUT_DIR/fit"
fi

if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    # The float32 cases of every kernel (the half-precision paths share their indexing); memcheck instruments
    # every launch, torch's too, so float64 gradcheck is left out.
    step sanitize timeout "${GPU_CHECK_SANITIZE_S:-150}" compute-sanitizer --tool memcheck --error-exitcode 9 \
      --print-limit 20 "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_pooling_cuda.py \
      tests/test_ops_attention_cuda.py -k "not dtype1 and not dtype2 and not bf16 and not fp16 and not gradcheck"
  else
    echo "compute-sanitizer not found: sanitize step skipped"
  fi
fi

echo
if ((${#failed[@]})); then
  echo "gpu_check: FAILED steps: ${failed[*]} (logs in $OUT_DIR)"
  exit 1
fi
echo "gpu_check: all steps passed (logs in $OUT_DIR)"
