// Parallel LSD radix sort of packed 64-bit items by their high 32 bits, called from inside an OpenMP
// parallel region.
//
// An item is (key << 32) | payload. Each thread owns a fixed contiguous slice of the array for every
// pass; a pass histograms the slices, turns the per-thread histograms into scatter offsets (bucket-
// major, then thread order) and scatters. Thread order inside a bucket keeps the sort stable, so equal
// keys keep their input order (the backward's sums are deterministic, whatever the thread count).
// Digits are at most 8 bits: 256 buckets keep every scatter stream's line in L1 and its page in the
// TLB, which matters more than the pass count. Only as many passes run as the largest key needs.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace lattice {
namespace cpu {

struct RadixPlan {
  int passes = 0;
  int bits = 0;  // digit width per pass (<= 8)

  // Plan for keys in [0, max_key]: ceil(bits(max_key) / 8) passes, digits split evenly.
  static RadixPlan for_max_key(uint64_t max_key) {
    int key_bits = 0;
    while (key_bits < 32 && (max_key >> key_bits) != 0) ++key_bits;
    RadixPlan p;
    if (key_bits == 0) return p;
    p.passes = (key_bits + 7) / 8;
    p.bits = (key_bits + p.passes - 1) / p.passes;
    return p;
  }
  int64_t buckets() const { return int64_t{1} << bits; }
  // Digit of `pass` of a packed item.
  inline uint32_t digit(uint64_t item, int pass) const {
    return static_cast<uint32_t>(item >> (32 + pass * bits)) & static_cast<uint32_t>(buckets() - 1);
  }
};

// Entries the `hist` buffer needs for a team of nt threads (per-thread histograms + slice totals).
inline int64_t radix_hist_entries(const RadixPlan& plan, int nt) {
  return (static_cast<int64_t>(nt) + 1) * std::max<int64_t>(plan.buckets(), nt);
}

// Sorts items by key. Must be called by every thread of the enclosing parallel region (team size nt,
// this thread tid), `range` holding the [nt + 1] boundaries of each thread's slice. Items start in a;
// b is scratch of the same size; `hist` has radix_hist_entries(plan, nt) entries. If `hist_ready`,
// this thread's first-pass histogram (hist + tid * buckets) was filled by the caller (fused into the
// pass that produced the items). Returns the buffer holding the result (a or b).
inline uint64_t* radix_sort_in_team(const RadixPlan& plan, uint64_t* a, uint64_t* b, int64_t* hist,
                                    const int64_t* range, int nt, int tid, bool hist_ready) {
  const int64_t R = plan.buckets();
  const int64_t lo = range[tid];
  const int64_t hi = range[tid + 1];
  uint64_t* src = a;
  uint64_t* dst = b;
  int64_t* my = hist + tid * R;
  int64_t* totals = hist + static_cast<int64_t>(nt) * R;
  for (int pass = 0; pass < plan.passes; ++pass) {
    const int shift = 32 + pass * plan.bits;
    const uint64_t mask = static_cast<uint64_t>(R - 1);
    if (pass > 0 || !hist_ready) {
      std::fill(my, my + R, int64_t{0});
      for (int64_t i = lo; i < hi; ++i) ++my[(src[i] >> shift) & mask];
    }
#pragma omp barrier
    // Exclusive scan, bucket-major then thread order; each thread scans the bucket slice it owns.
    const int64_t b_lo = R * tid / nt;
    const int64_t b_hi = R * (tid + 1) / nt;
    int64_t slice_total = 0;
    for (int64_t k = b_lo; k < b_hi; ++k)
      for (int t = 0; t < nt; ++t) slice_total += hist[t * R + k];
    totals[tid] = slice_total;
#pragma omp barrier
    int64_t running = 0;
    for (int t = 0; t < tid; ++t) running += totals[t];
    for (int64_t k = b_lo; k < b_hi; ++k) {
      for (int t = 0; t < nt; ++t) {
        const int64_t c = hist[t * R + k];
        hist[t * R + k] = running;
        running += c;
      }
    }
#pragma omp barrier
    for (int64_t i = lo; i < hi; ++i) {
      const uint64_t x = src[i];
      dst[my[(x >> shift) & mask]++] = x;
    }
#pragma omp barrier
    std::swap(src, dst);
  }
  return src;
}

}  // namespace cpu
}  // namespace lattice
