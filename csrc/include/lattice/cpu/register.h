// How a CPU kernel file registers its kernels, in the two libraries built from it (setup.py):
//
//   * lattice._C (Python): every csrc/cpu/*.cpp is compiled once for the build host (-march=native) and
//     registers its kernels for the CPU dispatch key itself, as TORCH_LIBRARY_IMPL does.
//   * liblattice_ops.so (C++ serving, no Python): every csrc/cpu/*.cpp is compiled once per instruction set
//     (AVX-512, AVX2, generic) with LATTICE_CPU_VARIANT set and `lattice` renamed to `lattice_<variant>` on the
//     command line, so each variant's code, header inlines included, lives in its own namespace and no variant's
//     vector code can stand in for another's at link time. A variant file only defines
//     `lattice_<variant>::register_cpu_kernels_<file>(torch::Library&)`; csrc/cpu_isa.cpp picks the variant the
//     host runs (cpuid, or LATTICE_CPU_ISA) when the library is loaded and calls that variant's functions from
//     its one TORCH_LIBRARY_IMPL block. A new kernel file is added to LATTICE_CPU_KERNEL_FILES there.
//
// Use: LATTICE_REGISTER_CPU_KERNELS(<file stem>, m) { m.impl("op", &kernel); ... }
#pragma once

#include <torch/library.h>

#if defined(LATTICE_CPU_VARIANT)
#define LATTICE_REGISTER_CPU_KERNELS(file, m)                 \
  namespace lattice {                                         \
  void register_cpu_kernels_##file(torch::Library& m);        \
  }                                                           \
  void lattice::register_cpu_kernels_##file(torch::Library& m)
#else
#define LATTICE_REGISTER_CPU_KERNELS(file, m) TORCH_LIBRARY_IMPL(lattice, CPU, m)
#endif
