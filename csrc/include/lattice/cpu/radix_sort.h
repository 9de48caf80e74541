// Parallel LSD radix sort of (key, value) pairs, called from inside an OpenMP parallel region.
//
// Each thread owns a fixed contiguous range of the arrays for every pass; a pass histograms the
// ranges, turns the per-thread histograms into scatter offsets (bucket-major, then thread order), and
// scatters. Thread order inside a bucket keeps the sort stable, so equal keys keep their input order
// (the backward's sums are therefore deterministic). Only as many passes run as the largest key needs.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace lattice {
namespace cpu {

struct RadixPlan {
  int passes = 0;
  int bits = 0;  // digit width per pass (<= 11)

  // Plan for keys in [0, max_key]: ceil(bits(max_key) / 11) passes, digits split evenly.
  static RadixPlan for_max_key(uint64_t max_key) {
    int key_bits = 0;
    while (key_bits < 64 && (max_key >> key_bits) != 0) ++key_bits;
    RadixPlan p;
    if (key_bits == 0) return p;
    p.passes = (key_bits + 10) / 11;
    p.bits = (key_bits + p.passes - 1) / p.passes;
    return p;
  }
  int64_t buckets() const { return int64_t{1} << bits; }
};

// Sorts pairs by key. Must be called by every thread of the enclosing parallel region (team size nt,
// this thread tid), with `range` the [nt + 1] boundaries of each thread's slice. Keys/vals start in
// (k0, v0); (k1, v1) are scratch of the same size; `hist` has nt * plan.buckets() entries. If
// `hist_ready`, the first pass's histogram was already filled in by the caller (fused into the pass
// that produced the keys). Returns true if the result ended in (k1, v1) (an odd number of passes).
template <typename K, typename V>
bool radix_sort_pairs_in_team(const RadixPlan& plan, K* k0, V* v0, K* k1, V* v1, int64_t* hist,
                              const int64_t* range, int nt, int tid, bool hist_ready) {
  const int64_t R = plan.buckets();
  const K mask = static_cast<K>(R - 1);
  const int64_t lo = range[tid];
  const int64_t hi = range[tid + 1];
  K* src_k = k0;
  V* src_v = v0;
  K* dst_k = k1;
  V* dst_v = v1;
  int64_t* my = hist + tid * R;
  for (int pass = 0; pass < plan.passes; ++pass) {
    const int shift = pass * plan.bits;
    if (pass > 0 || !hist_ready) {
      std::fill(my, my + R, int64_t{0});
      for (int64_t i = lo; i < hi; ++i) ++my[(src_k[i] >> shift) & mask];
    }
#pragma omp barrier
    // Exclusive scan, bucket-major then thread order; each thread scans the bucket slice it owns.
    {
      const int64_t b_lo = R * tid / nt;
      const int64_t b_hi = R * (tid + 1) / nt;
      // Totals of buckets before my slice are needed: compute per-slice totals first.
      int64_t slice_total = 0;
      for (int64_t b = b_lo; b < b_hi; ++b)
        for (int t = 0; t < nt; ++t) slice_total += hist[t * R + b];
      // Publish slice totals through the last thread-slot of an extra row (hist has room: see caller).
      int64_t* totals = hist + static_cast<int64_t>(nt) * R;
      totals[tid] = slice_total;
#pragma omp barrier
      int64_t running = 0;
      for (int t = 0; t < tid; ++t) running += totals[t];
      for (int64_t b = b_lo; b < b_hi; ++b) {
        for (int t = 0; t < nt; ++t) {
          const int64_t c = hist[t * R + b];
          hist[t * R + b] = running;
          running += c;
        }
      }
    }
#pragma omp barrier
    for (int64_t i = lo; i < hi; ++i) {
      const K k = src_k[i];
      const int64_t pos = my[(k >> shift) & mask]++;
      dst_k[pos] = k;
      dst_v[pos] = src_v[i];
    }
#pragma omp barrier
    std::swap(src_k, dst_k);
    std::swap(src_v, dst_v);
  }
  return (plan.passes & 1) != 0;
}

// Entries the `hist` buffer needs for a team of nt threads.
inline int64_t radix_hist_entries(const RadixPlan& plan, int nt) {
  return (static_cast<int64_t>(nt) + 1) * std::max<int64_t>(plan.buckets(), nt);
}

}  // namespace cpu
}  // namespace lattice
