// Argument validation and geometry shared by the CPU jagged_embedding_pool kernels (forward and the
// backward ops). Every failure is a TORCH_CHECK naming the argument and the offending value.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lattice/checks.h"

namespace lattice {
namespace cpu {

// Threads a kernel may use: torch's intra-op setting (torch.set_num_threads), 1 inside a parallel region.
inline int pool_num_threads() {
  return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
}

inline const char* pooling_name(int64_t pooling) { return pooling == 0 ? "sum" : "mean"; }

// Tables, bags and rows of one call.
//
// table_row_offsets is either [T+1] (tables packed back to back: table t owns rows
// [tro[t], tro[t+1])) or [T, 2] (table t owns rows [tro[t, 0], tro[t, 1]); several "tables" may then
// name the same rows, which is how features that share an embedding table are pooled in one call).
struct PoolGeometry {
  int64_t T = 0;          // tables (the op's table axis: one per feature)
  int64_t B = 0;          // samples
  int64_t D = 0;          // embedding dim
  int64_t N = 0;          // indices.numel()
  int64_t rows_total = 0; // weights.size(0)
  int64_t nbags = 0;      // T * B
  int64_t used = 0;       // offsets[T*B]: indices at positions >= used belong to no bag
  std::vector<int64_t> row_start;  // [T] first global row of table t
  std::vector<int64_t> row_count;  // [T] rows of table t
  std::vector<int64_t> pos_end;    // [T] offsets[(t+1)*B]: end of table t's positions

  // Positions are split into work chunks by the cost f(bag) = offsets[bag] + bag (an index or an
  // empty bag costs one unit); returns the first bag of chunk c of `chunks`.
  template <typename index_t>
  int64_t chunk_begin(const index_t* offsets, int64_t c, int64_t chunks) const {
    if (c <= 0) return 0;
    if (c >= chunks) return nbags;
    const int64_t total = used + nbags;
    const int64_t target = static_cast<int64_t>((static_cast<long double>(total) * c) / chunks);
    int64_t lo = 0, hi = nbags;  // first bag with offsets[bag] + bag >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(offsets[mid]) + mid < target) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }
};

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

inline void check_weights_dtype(const at::Tensor& w, const char* name) {
  const auto st = w.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble, name,
              " must be float32, bfloat16, float16 or float64, got ", st);
}

inline void check_pooling(int64_t pooling) {
  TORCH_CHECK(pooling == 0 || pooling == 1, "pooling must be 0 (sum) or 1 (mean), got ", pooling);
}

// Validates table_row_offsets, indices, offsets (and their agreement with rows_total) and returns the
// geometry. Indices themselves are range-checked inside each kernel's main pass.
inline PoolGeometry check_pool_geometry(const at::Tensor& table_row_offsets, const at::Tensor& indices,
                                        const at::Tensor& offsets, int64_t rows_total, int64_t D) {
  check_cpu(table_row_offsets, "table_row_offsets");
  check_cpu(indices, "indices");
  check_cpu(offsets, "offsets");
  TORCH_CHECK(table_row_offsets.scalar_type() == at::kLong, "table_row_offsets must be int64, got ",
              table_row_offsets.scalar_type());
  PoolGeometry g;
  g.rows_total = rows_total;
  g.D = D;
  const at::Tensor tro = table_row_offsets.contiguous();
  const int64_t* tp = tro.data_ptr<int64_t>();
  int64_t stride = 1;
  if (tro.dim() == 1) {
    TORCH_CHECK(tro.numel() >= 2, "table_row_offsets must have T+1 >= 2 entries, got ", tro.numel());
    g.T = tro.numel() - 1;
  } else {
    TORCH_CHECK(tro.dim() == 2 && tro.size(1) == 2 && tro.size(0) >= 1,
                "table_row_offsets must be [T+1] (packed tables) or [T, 2] (row range per table), got shape ",
                tro.sizes());
    g.T = tro.size(0);
    stride = 2;
  }
  g.row_start.resize(g.T);
  g.row_count.resize(g.T);
  for (int64_t t = 0; t < g.T; ++t) {
    const int64_t s = tp[t * stride];
    const int64_t e = tp[t * stride + 1];
    TORCH_CHECK(s >= 0 && s <= e && e <= rows_total, "table_row_offsets: table ", t, " spans rows [", s, ", ", e,
                "), which is not a valid range of weights' ", rows_total, " rows");
    g.row_start[t] = s;
    g.row_count[t] = e - s;
  }

  check_dim(indices, 1, "indices");
  check_index_dtype(indices, "indices");
  check_dim(offsets, 1, "offsets");
  TORCH_CHECK(offsets.scalar_type() == indices.scalar_type(), "offsets must have the same dtype as indices (",
              indices.scalar_type(), "), got ", offsets.scalar_type());
  g.N = indices.numel();
  TORCH_CHECK(offsets.numel() >= 1 && (offsets.numel() - 1) % g.T == 0, "offsets must have T*B+1 entries with T=",
              g.T, " tables (key-major, bag t*B+b), got ", offsets.numel());
  g.B = (offsets.numel() - 1) / g.T;
  g.nbags = g.T * g.B;
  TORCH_CHECK(g.N < (int64_t{1} << 32) && g.nbags < (int64_t{1} << 31),
              "jagged_embedding_pool supports fewer than 2^32 indices and 2^31 bags, got ", g.N, " and ", g.nbags);
  AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "jagged_embedding_pool_offsets", [&] {
    check_offsets_cpu<index_t>(offsets, "offsets", -1, g.N, "indices", "bag");
    const index_t* o = offsets.data_ptr<index_t>();
    g.used = static_cast<int64_t>(o[g.nbags]);
    g.pos_end.resize(g.T);
    for (int64_t t = 0; t < g.T; ++t) g.pos_end[t] = static_cast<int64_t>(o[(t + 1) * g.B]);
  });
  return g;
}

inline void check_per_sample_weights(const c10::optional<at::Tensor>& psw, int64_t N, int64_t pooling) {
  if (!psw.has_value()) return;
  const at::Tensor& p = *psw;
  check_cpu(p, "per_sample_weights");
  TORCH_CHECK(pooling == 0, "per_sample_weights are only supported with sum pooling (pooling=0), got pooling=",
              pooling, " (", pooling_name(pooling), ")");
  check_dim(p, 1, "per_sample_weights");
  TORCH_CHECK(p.numel() == N, "per_sample_weights must have one entry per index (", N, "), got ", p.numel());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "per_sample_weights must be floating point, got ",
              p.scalar_type());
}

// Raised after a parallel pass flagged a bad index: finds the first one and names table, sample, value.
template <typename index_t>
[[noreturn]] void report_bad_index(const PoolGeometry& g, const index_t* indices, const index_t* offsets) {
  for (int64_t bag = 0; bag < g.nbags; ++bag) {
    const int64_t t = bag / g.B;
    for (int64_t j = offsets[bag]; j < static_cast<int64_t>(offsets[bag + 1]); ++j) {
      const int64_t v = static_cast<int64_t>(indices[j]);
      TORCH_CHECK(v >= 0, "indices[", j, "] = ", v, " is negative (table ", t, ", sample ", bag % g.B, ")");
      TORCH_CHECK(v < g.row_count[t], "indices[", j, "] = ", v, " is out of range for table ", t, " with ",
                  g.row_count[t], " rows (sample ", bag % g.B, ")");
    }
  }
  TORCH_CHECK(false, "jagged_embedding_pool: internal error, a bad index was flagged but not found");
}

}  // namespace cpu
}  // namespace lattice
