// CPU forward of lattice::jagged_embedding_pool and the gradient of its per_sample_weights.
//
// One OpenMP pass over all T*B bags of all tables: bags are cut into chunks of about equal cost
// (indices + bags) that threads take dynamically; each bag is accumulated in fp32 registers (AVX-512,
// up to 128 lanes per column block) and written straight into out[b, t, :]. Rows are software-
// prefetched a few positions ahead, across bag and table boundaries. Indices are range-checked inside
// the same pass; a bad one is skipped, flagged, and reported (table, position, value) after the pass.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>

#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/row_simd.h"

namespace lattice {
namespace cpu {
namespace {

// Rows prefetched ahead of the one being accumulated: enough bytes in flight to cover DRAM latency,
// without evicting them from L1 before use. LATTICE_POOL_PREFETCH overrides (0 disables).
int64_t prefetch_distance(int64_t row_bytes) {
  static const int64_t env = [] {
    const char* s = std::getenv("LATTICE_POOL_PREFETCH");
    return s != nullptr ? std::atoll(s) : int64_t{-1};
  }();
  if (env >= 0) return env;
  const int64_t d = 4096 / std::max<int64_t>(row_bytes, 1);
  return std::min<int64_t>(std::max<int64_t>(d, 4), 32);
}

// Walks positions ahead of the accumulation, tracking their table, and prefetches their rows.
template <typename W, typename index_t>
struct RowPrefetcher {
  const W* weights;
  const index_t* indices;
  const PoolGeometry* g;
  int64_t row_bytes;
  int64_t dist;
  int64_t p = 0;  // next position to prefetch
  int64_t t = 0;  // table of position p

  inline void start(int64_t pos, int64_t table) {
    p = pos;
    t = table;
  }
  // Prefetch every position up to (and including) j + dist.
  inline void advance(int64_t j) {
    const int64_t stop = std::min(j + dist + 1, g->used);
    for (; p < stop; ++p) {
      while (p >= g->pos_end[t]) ++t;
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[p]));
      if (idx < static_cast<uint64_t>(g->row_count[t])) {
        prefetch_bytes(weights + (g->row_start[t] + static_cast<int64_t>(idx)) * g->D, row_bytes);
      }
    }
  }
};

// Pools bags [bag_lo, bag_hi): out[b, t, :] = scale * sum_j psw[j] * weights[row(j), :].
// Returns false if a bad index was met (it is skipped).
template <typename W, typename index_t, bool kWeighted>
bool pool_chunk_avx512(const W* weights, const index_t* indices, const index_t* offsets, const float* psw,
                       bool mean, const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, W* out,
                       int64_t dist) {
#if LATTICE_HAVE_AVX512
  bool ok = true;
  const int64_t D = g.D;
  RowPrefetcher<W, index_t> pf{weights, indices, &g, D * static_cast<int64_t>(sizeof(W)), dist};
  int64_t t = bag_lo / g.B;
  int64_t b = bag_lo % g.B;
  pf.start(offsets[bag_lo], t);
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t begin = offsets[bag];
    const int64_t end = offsets[bag + 1];
    const W* table = weights + g.row_start[t] * D;
    const uint64_t nrows = static_cast<uint64_t>(g.row_count[t]);
    W* dst = out + (b * g.T + t) * D;
    const __m512 scale = _mm512_set1_ps(mean && end > begin ? 1.0f / static_cast<float>(end - begin) : 1.0f);
    for (int64_t c0 = 0; c0 < D; c0 += kBlock) {
      const int64_t width = std::min(kBlock, D - c0);
      const __mmask16 tail = tail_mask(width);
      dispatch_nv(static_cast<int>((width + 15) / 16), [&](auto nv_tag) {
        constexpr int NV = decltype(nv_tag)::value;
        Vecs<NV, W> acc;
        acc.zero();
        for (int64_t j = begin; j < end; ++j) {
          if (c0 == 0 && dist > 0) pf.advance(j);
          const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
          if (C10_UNLIKELY(idx >= nrows)) {
            ok = false;
            continue;
          }
          const W* row = table + static_cast<int64_t>(idx) * D + c0;
          if constexpr (kWeighted) {
            acc.fmadd(_mm512_set1_ps(psw[j]), row, tail);
          } else {
            acc.add(row, tail);
          }
        }
        acc.scale(scale);
        acc.store(dst + c0, tail);
      });
    }
    if (++b == g.B) {
      b = 0;
      ++t;
    }
  }
  return ok;
#else
  (void)weights, (void)indices, (void)offsets, (void)psw, (void)mean, (void)g, (void)bag_lo, (void)bag_hi,
      (void)out, (void)dist;
  TORCH_CHECK(false, "lattice was built without AVX-512 kernels");
#endif
}

// Portable version of pool_chunk_avx512 (any -march; float64 storage accumulates in float64).
template <typename W, typename index_t, bool kWeighted>
bool pool_chunk_generic(const W* weights, const index_t* indices, const index_t* offsets, const acc_t<W>* psw,
                        bool mean, const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, W* out, int64_t dist,
                        acc_t<W>* acc) {
  using A = acc_t<W>;
  bool ok = true;
  const int64_t D = g.D;
  RowPrefetcher<W, index_t> pf{weights, indices, &g, D * static_cast<int64_t>(sizeof(W)), dist};
  int64_t t = bag_lo / g.B;
  int64_t b = bag_lo % g.B;
  pf.start(offsets[bag_lo], t);
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t begin = offsets[bag];
    const int64_t end = offsets[bag + 1];
    const W* table = weights + g.row_start[t] * D;
    const uint64_t nrows = static_cast<uint64_t>(g.row_count[t]);
    for (int64_t c = 0; c < D; ++c) acc[c] = A(0);
    for (int64_t j = begin; j < end; ++j) {
      if (dist > 0) pf.advance(j);
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= nrows)) {
        ok = false;
        continue;
      }
      const W* row = table + static_cast<int64_t>(idx) * D;
      const A s = kWeighted ? psw[j] : A(1);
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) acc[c] += s * to_acc<A>(row[c]);
    }
    const A scale = mean && end > begin ? A(1) / static_cast<A>(end - begin) : A(1);
    W* dst = out + (b * g.T + t) * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dst[c] = from_acc<W>(acc[c] * scale);
    if (++b == g.B) {
      b = 0;
      ++t;
    }
  }
  return ok;
}

template <typename W, typename index_t>
void pool_forward(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& offsets,
                  const at::Tensor& psw, bool mean, const PoolGeometry& g, at::Tensor& out) {
  using A = acc_t<W>;
  const W* w = weights.data_ptr<W>();
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  const A* pw = psw.defined() ? psw.data_ptr<A>() : nullptr;
  W* o = out.data_ptr<W>();
  const int nthreads = pool_num_threads();
  const int64_t chunks = std::min<int64_t>(g.nbags, static_cast<int64_t>(nthreads) * 16);
  const int64_t dist = prefetch_distance(g.D * static_cast<int64_t>(sizeof(W)));
  const bool avx512 = use_avx512() && !std::is_same_v<W, double>;
  std::atomic<bool> bad{false};
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<A> acc(avx512 ? 0 : g.D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = g.chunk_begin(off, c, chunks);
      const int64_t hi = g.chunk_begin(off, c + 1, chunks);
      if (lo >= hi) continue;
      bool ok;
      if constexpr (std::is_same_v<W, double>) {
        ok = pw ? pool_chunk_generic<W, index_t, true>(w, idx, off, pw, mean, g, lo, hi, o, dist, acc.data())
                : pool_chunk_generic<W, index_t, false>(w, idx, off, pw, mean, g, lo, hi, o, dist, acc.data());
      } else if (avx512) {
        ok = pw ? pool_chunk_avx512<W, index_t, true>(w, idx, off, pw, mean, g, lo, hi, o, dist)
                : pool_chunk_avx512<W, index_t, false>(w, idx, off, pw, mean, g, lo, hi, o, dist);
      } else {
        ok = pw ? pool_chunk_generic<W, index_t, true>(w, idx, off, pw, mean, g, lo, hi, o, dist, acc.data())
                : pool_chunk_generic<W, index_t, false>(w, idx, off, pw, mean, g, lo, hi, o, dist, acc.data());
      }
      if (!ok) bad.store(true, std::memory_order_relaxed);
    }
  }
  if (bad.load()) report_bad_index<index_t>(g, idx, off);
}

at::Tensor jagged_embedding_pool_cpu(const at::Tensor& weights, const at::Tensor& table_row_offsets,
                                     const at::Tensor& indices, const at::Tensor& offsets, int64_t pooling,
                                     const c10::optional<at::Tensor>& per_sample_weights) {
  check_cpu(weights, "weights");
  check_dim(weights, 2, "weights");
  check_weights_dtype(weights, "weights");
  check_pooling(pooling);
  const PoolGeometry g = check_pool_geometry(table_row_offsets, indices, offsets, weights.size(0), weights.size(1));
  check_per_sample_weights(per_sample_weights, g.N, pooling);
  at::Tensor out = at::empty({g.B, g.T, g.D}, weights.options());
  if (g.nbags == 0 || g.D == 0) return out;
  const at::Tensor w = weights.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const auto acc_dtype = weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->to(acc_dtype).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "jagged_embedding_pool_cpu", [&] {
    using W = scalar_t;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "jagged_embedding_pool_cpu_index", [&] {
      pool_forward<W, index_t>(w, idx, off, psw, pooling == 1, g, out);
    });
  });
  return out;
}

// ---- gradient of per_sample_weights: grad[j] = <grad_output[b, t], weights[row(j)]> ----------------
template <typename W, typename G, typename index_t>
void psw_grad_chunk(const W* weights, const G* grad, const index_t* indices, const index_t* offsets,
                    const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, acc_t<W>* out, bool& ok) {
  using A = acc_t<W>;
  const int64_t D = g.D;
  const int64_t dist = prefetch_distance(D * static_cast<int64_t>(sizeof(W)));
  RowPrefetcher<W, index_t> pf{weights, indices, &g, D * static_cast<int64_t>(sizeof(W)), dist};
  int64_t t = bag_lo / g.B;
  int64_t b = bag_lo % g.B;
  pf.start(offsets[bag_lo], t);
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t begin = offsets[bag];
    const int64_t end = offsets[bag + 1];
    const W* table = weights + g.row_start[t] * D;
    const uint64_t nrows = static_cast<uint64_t>(g.row_count[t]);
    const G* gr = grad + (b * g.T + t) * D;
    for (int64_t j = begin; j < end; ++j) {
      if (dist > 0) pf.advance(j);
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= nrows)) {
        ok = false;
        out[j] = A(0);
        continue;
      }
      const W* row = table + static_cast<int64_t>(idx) * D;
      A s = A(0);
#if LATTICE_HAVE_AVX512
      if constexpr (std::is_same_v<A, float>) {
        if (use_avx512()) {
          for (int64_t c0 = 0; c0 < D; c0 += kBlock) {
            const int64_t width = std::min(kBlock, D - c0);
            const __mmask16 tail = tail_mask(width);
            dispatch_nv(static_cast<int>((width + 15) / 16), [&](auto nv_tag) {
              constexpr int NV = decltype(nv_tag)::value;
              Vecs<NV, W> r;
              r.load(row + c0, tail);
              s += r.dot(gr + c0, tail);
            });
          }
          out[j] = s;
          continue;
        }
      }
#endif
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < D; ++c) s += to_acc<A>(row[c]) * to_acc<A>(gr[c]);
      out[j] = s;
    }
    if (++b == g.B) {
      b = 0;
      ++t;
    }
  }
}

template <typename W, typename G, typename index_t>
void psw_grad(const at::Tensor& w, const at::Tensor& go, const at::Tensor& idx, const at::Tensor& off,
              const PoolGeometry& g, at::Tensor& out) {
  using A = acc_t<W>;
  const index_t* ip = idx.data_ptr<index_t>();
  const index_t* op = off.data_ptr<index_t>();
  const W* wp = w.data_ptr<W>();
  const G* gp = go.data_ptr<G>();
  A* outp = out.data_ptr<A>();
  const int nthreads = pool_num_threads();
  const int64_t chunks = std::min<int64_t>(g.nbags, static_cast<int64_t>(nthreads) * 16);
  std::atomic<bool> bad{false};
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = g.chunk_begin(op, c, chunks);
    const int64_t hi = g.chunk_begin(op, c + 1, chunks);
    if (lo >= hi) continue;
    bool ok = true;
    psw_grad_chunk<W, G, index_t>(wp, gp, ip, op, g, lo, hi, outp, ok);
    if (!ok) bad.store(true, std::memory_order_relaxed);
  }
  if (bad.load()) report_bad_index<index_t>(g, ip, op);
}

at::Tensor jagged_embedding_pool_backward_per_sample_weights_cpu(const at::Tensor& grad_output,
                                                                 const at::Tensor& weights,
                                                                 const at::Tensor& table_row_offsets,
                                                                 const at::Tensor& indices,
                                                                 const at::Tensor& offsets) {
  check_cpu(weights, "weights");
  check_cpu(grad_output, "grad_output");
  check_dim(weights, 2, "weights");
  check_weights_dtype(weights, "weights");
  const PoolGeometry g = check_pool_geometry(table_row_offsets, indices, offsets, weights.size(0), weights.size(1));
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == g.B && grad_output.size(1) == g.T &&
                  grad_output.size(2) == g.D,
              "grad_output must have shape [B, T, D] = [", g.B, ", ", g.T, ", ", g.D, "], got ", grad_output.sizes());
  check_weights_dtype(grad_output, "grad_output");
  const auto acc_dtype = weights.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::zeros({g.N}, weights.options().dtype(acc_dtype));
  if (g.nbags == 0 || g.used == 0) return out;
  const at::Tensor w = weights.contiguous();
  // grad_output is read in the weights' accumulation precision: fp32 (or float64) or the weights' dtype.
  at::Tensor go = grad_output.contiguous();
  if (go.scalar_type() != w.scalar_type() && go.scalar_type() != acc_dtype) go = go.to(acc_dtype);
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "jagged_pool_psw_grad", [&] {
    using W = scalar_t;
    using A = acc_t<W>;
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "jagged_pool_psw_grad_index", [&] {
      if (go.scalar_type() == w.scalar_type()) {
        psw_grad<W, W, index_t>(w, go, idx, off, g, out);
      } else {
        psw_grad<W, A, index_t>(w, go, idx, off, g, out);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lattice

TORCH_LIBRARY_IMPL(lattice, CPU, m) {
  m.impl("jagged_embedding_pool", &lattice::cpu::jagged_embedding_pool_cpu);
  m.impl("jagged_embedding_pool_backward_per_sample_weights",
         &lattice::cpu::jagged_embedding_pool_backward_per_sample_weights_cpu);
}
