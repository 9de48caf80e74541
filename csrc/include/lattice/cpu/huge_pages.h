// Transparent huge pages for large CPU buffers (Linux), asked for before their first touch.
//
// glibc serves every allocation over 32 MB with a fresh mapping and unmaps it when it is freed, so the kernel
// that fills such an output takes one page fault per 4 KB page, on every call: 55k faults, about 120 ms on
// two cores, for the 228 MB of row gradients of a 26 x 100k x 64 sparse backward. With 2 MB pages it is a
// few hundred. Smaller outputs come from memory glibc keeps and reuses (no faults once warm), and there
// huge pages would only add the kernel's compaction stalls (THP defrag) to the first calls, so outputs are
// advised from 32 MB; the grow-only workspaces, allocated once, from 8 MB. Only advice: where THP is off
// ("never") or off Linux nothing changes, and memory that is already mapped keeps its pages. Python's
// lattice.ops._memory.empty_huge_pages (embedding tables and optimizer state) asks through the
// lattice::advise_huge_pages op (csrc/cpu/huge_pages.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace lattice {
namespace cpu {

constexpr size_t kHugePageBytes = size_t{2} << 20;
constexpr size_t kHugeMinBytes = size_t{8} << 20;         // a buffer allocated once (workspace)
constexpr size_t kHugeOutputMinBytes = size_t{32} << 20;  // an output allocated on every call

// Asks for huge pages over the 2 MB-aligned part of [p, p + bytes); returns whether advice was given (the range
// holds a whole huge page and madvise accepted it).
inline bool advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr) return false;
  const uintptr_t start = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t hi = (start + bytes) & ~(kHugePageBytes - 1);
  return hi > lo && madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#else
  (void)p;
  (void)bytes;
  return false;
#endif
}

// at::empty for an output its kernel fills next: on huge pages when it is a CPU tensor of 32 MB or more.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu() && t.nbytes() >= kHugeOutputMinBytes) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace cpu
}  // namespace lattice
