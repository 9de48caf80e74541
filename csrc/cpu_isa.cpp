// liblattice_ops.so only: registers one instruction-set variant of the CPU kernels, chosen when the library is
// loaded. setup.py compiles every csrc/cpu/*.cpp once per variant (see lattice/cpu/register.h):
//
//   variant   flags               host needs (__builtin_cpu_supports)
//   avx512    -march=x86-64-v4    x86-64-v4: AVX-512 F/BW/CD/DQ/VL on top of x86-64-v3
//   avx2      -march=x86-64-v3    x86-64-v3: AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE
//   generic   (baseline x86-64)   nothing (portable loops; the only variant on other architectures)
//
// The widest variant the host supports is used. LATTICE_CPU_ISA=avx512|avx2|generic asks for one (the tests
// run each variant on one machine, as LATTICE_CPU_ISA=generic does for lattice._C); a value the host cannot
// run, or an unknown one, is reported on stderr and the widest supported variant is used instead, as
// ATen does for ATEN_CPU_CAPABILITY.
//
// Inline functions of headers outside lattice (ATen, c10, libstdc++) are not renamed: each variant that calls one
// out of line emits a copy, and the linker keeps the first. setup.py links this file and ops.cpp first, then the
// variants from the narrowest (generic, avx2, avx512), so the copy a variant reaches is never wider than itself
// (tests/test_cpp_ops_library.py checks the built library).
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

// Every csrc/cpu/*.cpp file (its stem), i.e. every LATTICE_REGISTER_CPU_KERNELS block.
#define LATTICE_CPU_KERNEL_FILES(X) \
  X(huge_pages)                     \
  X(jagged_attention)               \
  X(jagged_embedding_pool)          \
  X(jagged_embedding_pool_backward) \
  X(jagged_embedding_pool_int8)

#define LATTICE_DECLARE_REGISTRAR(file) void register_cpu_kernels_##file(torch::Library& m);
#define LATTICE_CALL_REGISTRAR(file) register_cpu_kernels_##file(m);
#define LATTICE_CPU_VARIANT_REGISTRARS(ns)              \
  namespace ns {                                        \
  LATTICE_CPU_KERNEL_FILES(LATTICE_DECLARE_REGISTRAR)   \
  inline void register_all(torch::Library& m) {         \
    LATTICE_CPU_KERNEL_FILES(LATTICE_CALL_REGISTRAR)    \
  }                                                     \
  }

LATTICE_CPU_VARIANT_REGISTRARS(lattice_generic)
#if defined(__x86_64__)
LATTICE_CPU_VARIANT_REGISTRARS(lattice_avx2)
LATTICE_CPU_VARIANT_REGISTRARS(lattice_avx512)
#endif

namespace {

enum class Isa { generic, avx2, avx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "generic";
  }
}

bool host_supports(Isa isa) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::avx512:
      return __builtin_cpu_supports("x86-64-v4");
    case Isa::avx2:
      return __builtin_cpu_supports("x86-64-v3");
    default:
      return true;
  }
#else
  return isa == Isa::generic;
#endif
}

Isa widest_supported() {
  for (Isa isa : {Isa::avx512, Isa::avx2}) {
    if (host_supports(isa)) return isa;
  }
  return Isa::generic;
}

Isa select_isa() {
  const Isa widest = widest_supported();
  const char* env = std::getenv("LATTICE_CPU_ISA");
  if (env == nullptr || *env == '\0') return widest;
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::generic}) {
    if (std::strcmp(env, isa_name(isa)) != 0) continue;
    if (host_supports(isa)) return isa;
    std::fprintf(stderr, "liblattice_ops: LATTICE_CPU_ISA=%s, but this CPU cannot run it; using %s\n", env,
                 isa_name(widest));
    return widest;
  }
  std::fprintf(stderr, "liblattice_ops: ignoring LATTICE_CPU_ISA=%s (expected avx512, avx2 or generic); using %s\n",
               env, isa_name(widest));
  return widest;
}

const Isa kIsa = select_isa();

}  // namespace

// The variant whose kernels are registered: "avx512", "avx2" or "generic" (for logs and tests: dlsym it).
extern "C" __attribute__((visibility("default"))) const char* lattice_ops_cpu_isa() { return isa_name(kIsa); }

TORCH_LIBRARY_IMPL(lattice, CPU, m) {
  switch (kIsa) {
#if defined(__x86_64__)
    case Isa::avx512:
      lattice_avx512::register_all(m);
      break;
    case Isa::avx2:
      lattice_avx2::register_all(m);
      break;
#endif
    default:
      lattice_generic::register_all(m);
  }
}
