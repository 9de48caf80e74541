// The skeleton shared by the CPU pooling forwards (lattice::jagged_embedding_pool and its int8 variant) and the
// per-sample-weight gradient: the software-prefetch plan, the OpenMP pass over bags cut into chunks of equal
// cost, and the cursor that walks a chunk's bags table by table.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/row_simd.h"

namespace lattice {
namespace cpu {

// Software prefetch of upcoming rows: while accumulating index position j, the row of position
// j + dist is prefetched. Resolved once per call; LATTICE_POOL_PREFETCH (distance in rows, 0 = off),
// LATTICE_POOL_PF_LINES (cache lines per row, 0 = the whole row) and LATTICE_POOL_PF_HINT (3 = T0,
// 2 = T1) override the defaults, for tuning on a given machine.
//
// The defaults get kernels with the hint and the line count fixed at compile time (`kind`); any other
// setting runs a line loop with a run-time count, which costs about 5% of the forward in the hot loop
// (2-core AVX2 machine, 26 x 100k x 64).
enum PfKind : int {
  kPfRuntime = 0,     // hint and lines from the plan
  kPfTwoLinesT1 = 1,  // the row's first two lines into L2 (the AVX2 default)
  kPfRowT1 = 2,       // the whole row into L2 (AVX-512, rows under 512 bytes)
  kPfRowT0 = 3,       // the whole row into L1 (AVX-512, wider rows)
};

struct PrefetchPlan {
  int64_t dist = 0;
  int64_t lines = 0;
  int hint = 2;
  PfKind kind = kPfRuntime;
};

inline int64_t env_int(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::atoll(s) : fallback;
}

inline PrefetchPlan prefetch_plan(int64_t row_bytes) {
  PrefetchPlan p;
  const int64_t all = (row_bytes + 63) / 64;
  int64_t dflt_lines = 0;  // 0: the whole row
#if LATTICE_HAVE_AVX512
  // Rows of 512 bytes and more (D >= 128 fp32) go straight to L1 (T0) from about 8 KB ahead; shorter
  // rows to L2 (T1) from about 4 KB ahead. Measured on an AVX-512 Xeon with 26 x 100k-row tables: T0
  // made D=128 ~20% faster and D=64 slightly slower.
  const bool wide = row_bytes >= 512;
  const int64_t ahead = wide ? 8192 : 4096;
  const int hint = wide ? 3 : 2;
#else
  // AVX2 builds (measured on a 2-core AMD EPYC, same workload, D=64 and 128): the first two lines of
  // the row 8 rows ahead into L2 was best for both widths (the L2 fetches the rest of the row by
  // itself); 16 and 32 rows ahead were 10-30% slower, whole-row and T0 prefetches no better.
  const int64_t ahead = 8 * row_bytes;
  const int hint = 2;
  dflt_lines = 2;
#endif
  const int64_t dflt = std::min<int64_t>(std::max<int64_t>(ahead / std::max<int64_t>(row_bytes, 1), 4), 32);
  p.dist = std::max<int64_t>(0, env_int("LATTICE_POOL_PREFETCH", dflt));
  const int64_t lines = env_int("LATTICE_POOL_PF_LINES", dflt_lines);
  p.lines = lines > 0 ? std::min(lines, all) : all;
  p.hint = env_int("LATTICE_POOL_PF_HINT", hint) == 3 ? 3 : 2;
#if LATTICE_HAVE_AVX512
  if (p.lines == all) p.kind = p.hint == 3 ? kPfRowT0 : kPfRowT1;
#else
  if (p.lines == 2 && p.hint == 2) p.kind = kPfTwoLinesT1;
#endif
  return p;
}

template <int kHint>
inline void prefetch_row(const void* row, int64_t lines) {
  const char* p = static_cast<const char*>(row);
  for (int64_t l = 0; l < lines; ++l) __builtin_prefetch(p + 64 * l, 0, kHint);
}

// The prefetch of one upcoming row of kRowLines cache lines, as `kPf` says.
template <int kPf, int kRowLines>
inline void prefetch_upcoming(const void* row, const PrefetchPlan& pf) {
  if constexpr (kPf == kPfTwoLinesT1) {
    prefetch_lines<2, false, 2>(row);
  } else if constexpr (kPf == kPfRowT1 || kPf == kPfRowT0) {
    prefetch_lines<kRowLines, false, kPf == kPfRowT0 ? 3 : 2>(row);
  } else if (pf.hint == 3) {
    prefetch_row<3>(row, pf.lines);
  } else {
    prefetch_row<2>(row, pf.lines);
  }
}

// Calls f(std::integral_constant<int, kPf>()) with the compile-time prefetch kernel of the plan's kind (the
// run-time one for any other setting).
template <typename F>
inline void dispatch_prefetch(const PrefetchPlan& pf, F&& f) {
  switch (pf.kind) {
#if LATTICE_HAVE_AVX512
    case kPfRowT1: return f(std::integral_constant<int, kPfRowT1>());
    case kPfRowT0: return f(std::integral_constant<int, kPfRowT0>());
#else
    case kPfTwoLinesT1: return f(std::integral_constant<int, kPfTwoLinesT1>());
#endif
    default: return f(std::integral_constant<int, kPfRuntime>());
  }
}

// Runs f(bag_lo, bag_hi) -> bool over chunks of about equal cost, dynamically scheduled; false if any
// chunk returned false (a bad index).
template <typename index_t, typename F>
inline bool for_each_chunk(const PoolGeometry& g, const index_t* offsets, F&& f) {
  const int nthreads = pool_num_threads();
  const int64_t chunks = std::min<int64_t>(g.nbags, static_cast<int64_t>(nthreads) * 16);
  std::atomic<bool> bad{false};
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = g.chunk_begin(offsets, c, chunks);
    const int64_t hi = g.chunk_begin(offsets, c + 1, chunks);
    if (lo < hi && !f(lo, hi)) bad.store(true, std::memory_order_relaxed);
  }
  return !bad.load();
}

// Walks bags [bag_lo, bag_hi) in order, tracking table t and sample b, and the table's base row,
// row count and prefetch limit (j + dist must stay inside the table's positions). Rows are `stride`
// elements of W apart: D for the float tables, the padded row bytes for int8 tables.
template <typename W>
struct BagCursor {
  const PoolGeometry& g;
  const W* weights;
  int64_t dist;
  int64_t stride;
  int64_t t, b;
  const W* table = nullptr;
  uint64_t nrows = 0;
  int64_t pf_limit = 0;

  BagCursor(const PoolGeometry& geom, const W* w, int64_t bag, int64_t distance)
      : BagCursor(geom, w, bag, distance, geom.D) {}
  BagCursor(const PoolGeometry& geom, const W* w, int64_t bag, int64_t distance, int64_t row_stride)
      : g(geom), weights(w), dist(distance), stride(row_stride), t(bag / geom.B), b(bag % geom.B) {
    enter_table();
  }
  inline void enter_table() {
    table = weights + g.row_start[t] * stride;
    nrows = static_cast<uint64_t>(g.row_count[t]);
    pf_limit = dist > 0 ? g.pos_end[t] - dist : std::numeric_limits<int64_t>::min();
  }
  inline void next(bool more) {
    if (++b == g.B) {
      b = 0;
      ++t;
      if (more) enter_table();
    }
  }
  inline int64_t out_row() const { return b * g.T + t; }
};

}  // namespace cpu
}  // namespace lattice
