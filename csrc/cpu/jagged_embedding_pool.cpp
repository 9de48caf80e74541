// CPU forward of lattice::jagged_embedding_pool and the gradient of its per_sample_weights.
//
// One OpenMP pass over all T*B bags of all tables: bags are cut into chunks of about equal cost
// (indices + bags) that threads take dynamically; each bag is accumulated in fp32 registers (AVX-512 or
// AVX2, D <= 128: up to 8 zmm / 16 ymm held across the bag; bf16/fp16 converted in registers; a
// portable loop for wider rows, float64 and builds without either) and written straight into
// out[b, t, :]. The row of the position `dist` ahead in the same table is software-prefetched. Indices
// are range-checked inside the same pass; a bad one is skipped and flagged, and after the pass the first
// bad one is reported with its table, position and value. The hot loops make no calls: a call would make
// the compiler spill every vector accumulator around it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <limits>

#include "lattice/cpu/huge_pages.h"
#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/pool_forward.h"
#include "lattice/cpu/row_simd.h"
#include "lattice/cpu/register.h"

namespace lattice {
namespace cpu {
namespace {

#if LATTICE_HAVE_SIMD
// SIMD, D <= kBlock: each bag's sum lives in NV registers. No calls inside the loops (a call would make
// the compiler spill every accumulator around it).
template <typename W, typename index_t, bool kWeighted, int NV, int kPf>
bool pool_bags_simd(const W* weights, const index_t* indices, const index_t* offsets, const float* psw,
                      bool mean, const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, W* out,
                      const PrefetchPlan& pf) {
  constexpr int kRowLines = row_lines<NV, W>();
  const int64_t D = g.D;
  const int64_t dist = pf.dist;
  const PrefetchPlan plan = pf;  // a local copy: no reload of the run-time hint and lines after each store
  const tail_t tail = tail_mask(D);
  bool ok = true;
  BagCursor<W> cur(g, weights, bag_lo, dist);
  int64_t begin = offsets[bag_lo];
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    const W* table = cur.table;
    const uint64_t nrows = cur.nrows;
    const int64_t pf_limit = cur.pf_limit;
    Vecs<NV, W> acc;
    acc.zero();
    for (int64_t j = begin; j < end; ++j) {
      if (j < pf_limit) {
        const uint64_t pi = static_cast<uint64_t>(static_cast<int64_t>(indices[j + dist]));
        if (pi < nrows) prefetch_upcoming<kPf, kRowLines>(table + static_cast<int64_t>(pi) * D, plan);
      }
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= nrows)) {
        ok = false;
        continue;
      }
      const W* row = table + static_cast<int64_t>(idx) * D;
      if constexpr (kWeighted) {
        acc.fmadd(vset1(psw[j]), row, tail);
      } else {
        acc.add(row, tail);
      }
    }
    if (mean && end > begin) acc.scale(vset1(1.0f / static_cast<float>(end - begin)));
    acc.store(out + cur.out_row() * D, tail);
    begin = end;
    cur.next(bag + 1 < bag_hi);
  }
  return ok;
}
#endif

// Portable (any -march; any D; float64 storage accumulates in float64), `acc` holds D values.
template <typename W, typename index_t, bool kWeighted>
bool pool_bags_generic(const W* weights, const index_t* indices, const index_t* offsets, const acc_t<W>* psw,
                       bool mean, const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, W* out,
                       const PrefetchPlan& pf, acc_t<W>* acc) {
  using A = acc_t<W>;
  const int64_t D = g.D;
  const int64_t dist = pf.dist;
  bool ok = true;
  BagCursor<W> cur(g, weights, bag_lo, dist);
  int64_t begin = offsets[bag_lo];
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    for (int64_t c = 0; c < D; ++c) acc[c] = A(0);
    for (int64_t j = begin; j < end; ++j) {
      if (j < cur.pf_limit) {
        const uint64_t pi = static_cast<uint64_t>(static_cast<int64_t>(indices[j + dist]));
        if (pi < cur.nrows) prefetch_row<2>(cur.table + static_cast<int64_t>(pi) * D, pf.lines);
      }
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= cur.nrows)) {
        ok = false;
        continue;
      }
      const W* row = cur.table + static_cast<int64_t>(idx) * D;
      const A s = kWeighted ? psw[j] : A(1);
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) acc[c] += s * to_acc<A>(row[c]);
    }
    const A scale = mean && end > begin ? A(1) / static_cast<A>(end - begin) : A(1);
    W* dst = out + cur.out_row() * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dst[c] = from_acc<W>(acc[c] * scale);
    begin = end;
    cur.next(bag + 1 < bag_hi);
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
  const PrefetchPlan pf = prefetch_plan(g.D * static_cast<int64_t>(sizeof(W)));
  bool ok = true;
#if LATTICE_HAVE_SIMD
  if constexpr (std::is_same_v<A, float>) {
    if (use_simd() && g.D <= kBlock) {
      dispatch_nv(num_vecs(g.D), [&](auto nv_tag) {
        constexpr int NV = decltype(nv_tag)::value;
        auto run = [&](auto weighted_tag, auto pf_tag) {
          constexpr bool kW = decltype(weighted_tag)::value;
          constexpr int kPf = decltype(pf_tag)::value;
          ok = for_each_chunk(g, off, [&](int64_t lo, int64_t hi) {
            return pool_bags_simd<W, index_t, kW, NV, kPf>(w, idx, off, pw, mean, g, lo, hi, o, pf);
          });
        };
        auto run_pf = [&](auto weighted_tag) {
          dispatch_prefetch(pf, [&](auto pf_tag) { run(weighted_tag, pf_tag); });
        };
        if (pw) {
          run_pf(std::true_type());
        } else {
          run_pf(std::false_type());
        }
      });
      if (!ok) report_bad_index<index_t>(g, idx, off);
      return;
    }
  }
#endif
  auto run_generic = [&](auto weighted_tag) {
    constexpr bool kW = decltype(weighted_tag)::value;
    ok = for_each_chunk(g, off, [&](int64_t lo, int64_t hi) {
      std::vector<A> acc(g.D);
      return pool_bags_generic<W, index_t, kW>(w, idx, off, pw, mean, g, lo, hi, o, pf, acc.data());
    });
  };
  if (pw) {
    run_generic(std::true_type());
  } else {
    run_generic(std::false_type());
  }
  if (!ok) report_bad_index<index_t>(g, idx, off);
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
  at::Tensor out = empty_output({g.B, g.T, g.D}, weights.options());
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
bool psw_grad_bags(const W* weights, const G* grad, const index_t* indices, const index_t* offsets,
                   const PoolGeometry& g, int64_t bag_lo, int64_t bag_hi, acc_t<W>* out, const PrefetchPlan& pf) {
  using A = acc_t<W>;
  const int64_t D = g.D;
  bool ok = true;
  BagCursor<W> cur(g, weights, bag_lo, pf.dist);
  int64_t begin = offsets[bag_lo];
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    const G* gr = grad + cur.out_row() * D;
    for (int64_t j = begin; j < end; ++j) {
      if (j < cur.pf_limit) {
        const uint64_t pi = static_cast<uint64_t>(static_cast<int64_t>(indices[j + pf.dist]));
        if (pi < cur.nrows) prefetch_row<2>(cur.table + static_cast<int64_t>(pi) * D, pf.lines);
      }
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= cur.nrows)) {
        ok = false;
        out[j] = A(0);
        continue;
      }
      const W* row = cur.table + static_cast<int64_t>(idx) * D;
      A s = A(0);
#if LATTICE_HAVE_SIMD
      if constexpr (std::is_same_v<A, float>) {
        if (use_simd()) {
          for (int64_t c0 = 0; c0 < D; c0 += kBlock) {
            const int64_t width = std::min(kBlock, D - c0);
            const tail_t tail = tail_mask(width);
            dispatch_nv(num_vecs(width), [&](auto nv_tag) {
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
    begin = end;
    cur.next(bag + 1 < bag_hi);
  }
  return ok;
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
  const PrefetchPlan pf = prefetch_plan(g.D * static_cast<int64_t>(sizeof(W)));
  const bool ok = for_each_chunk(g, op, [&](int64_t lo, int64_t hi) {
    return psw_grad_bags<W, G, index_t>(wp, gp, ip, op, g, lo, hi, outp, pf);
  });
  if (!ok) report_bad_index<index_t>(g, ip, op);
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

LATTICE_REGISTER_CPU_KERNELS(jagged_embedding_pool, m) {
  m.impl("jagged_embedding_pool", &lattice::cpu::jagged_embedding_pool_cpu);
  m.impl("jagged_embedding_pool_backward_per_sample_weights",
         &lattice::cpu::jagged_embedding_pool_backward_per_sample_weights_cpu);
}
