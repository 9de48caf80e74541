// CPU forward of lattice::jagged_embedding_pool_int8: the fused pooling of jagged_embedding_pool over int8
// row-wise quantized tables (layout in lattice/int8_rows.h), for inference. Forward only.
//
// The same pass as the float forward (csrc/cpu/jagged_embedding_pool.cpp): one OpenMP pass over all T*B bags cut
// into chunks of equal cost, the row `dist` positions ahead software-prefetched, indices range-checked in the
// pass and the first bad one reported after it. Per bag, with w_j the per-sample weight (1 without):
//
//   out[b, t] = (sum_j (w_j * scale_j) * code_j + sum_j w_j * bias_j) / (bag length for mean, else 1)
//
// so each row costs one u8 -> fp32 widening and one FMA per vector of columns; the bias term is a scalar sum
// added once per bag. AVX-512 / AVX2 (D <= 128, the sum held in registers across the bag) or a portable loop
// (wider rows, builds without either, LATTICE_CPU_ISA=generic). Output fp32 [B, T, D].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lattice/cpu/huge_pages.h"
#include "lattice/cpu/pool_common.h"
#include "lattice/cpu/pool_forward.h"
#include "lattice/cpu/row_simd.h"
#include "lattice/int8_rows.h"
#include "lattice/cpu/register.h"

namespace lattice {
namespace cpu {
namespace {

// A row's scale and bias (a plain 8-byte load: rows are only guaranteed 1-byte aligned on the CPU).
inline void row_qparams(const uint8_t* row, int64_t code_bytes, float& scale, float& bias) {
  float sb[2];
  std::memcpy(sb, row + code_bytes, sizeof(sb));
  scale = sb[0];
  bias = sb[1];
}

#if LATTICE_HAVE_SIMD
// The prefetch of an upcoming row of at most kMaxRowBytes bytes that starts anywhere in a cache line (at a
// multiple of 8): the plan's lines from the row's start, plus the line of its last byte where those may not
// reach it. At D = 64 (72-byte rows) two lines from the start always cover the row.
template <int kPf, int kMaxRowBytes>
inline void prefetch_int8_row(const uint8_t* row, const PrefetchPlan& plan) {
  constexpr int kLines = (kMaxRowBytes + 63) / 64;
  prefetch_upcoming<kPf, kLines>(row, plan);
  if constexpr ((kPf == kPfRowT1 || kPf == kPfRowT0) && kLines * 64 < kMaxRowBytes + 56) {
    __builtin_prefetch(row + kMaxRowBytes - 1, 0, kPf == kPfRowT0 ? 3 : 2);
  }
}

template <typename index_t, bool kWeighted, int NV, int kPf>
bool pool_bags_int8_simd(const uint8_t* weights, const index_t* indices, const index_t* offsets, const float* psw,
                         bool mean, const PoolGeometry& g, int64_t row_bytes, int64_t bag_lo, int64_t bag_hi,
                         float* out, const PrefetchPlan& pf) {
  constexpr int kMaxRowBytes = NV * kLanes + 8;  // codes of NV vectors, the scale and the bias
  const int64_t D = g.D;
  const int64_t code_bytes = int8_rows::code_bytes(D);
  const int64_t dist = pf.dist;
  const PrefetchPlan plan = pf;
  const tail_t tail = tail_mask(D);
  bool ok = true;
  BagCursor<uint8_t> cur(g, weights, bag_lo, dist, row_bytes);
  int64_t begin = offsets[bag_lo];
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    const uint8_t* table = cur.table;
    const uint64_t nrows = cur.nrows;
    const int64_t pf_limit = cur.pf_limit;
    Vecs<NV, float> acc;
    acc.zero();
    float bias_sum = 0.0f;
    for (int64_t j = begin; j < end; ++j) {
      if (j < pf_limit) {
        const uint64_t pi = static_cast<uint64_t>(static_cast<int64_t>(indices[j + dist]));
        if (pi < nrows) prefetch_int8_row<kPf, kMaxRowBytes>(table + static_cast<int64_t>(pi) * row_bytes, plan);
      }
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= nrows)) {
        ok = false;
        continue;
      }
      const uint8_t* row = table + static_cast<int64_t>(idx) * row_bytes;
      float scale, bias;
      row_qparams(row, code_bytes, scale, bias);
      if constexpr (kWeighted) {
        const float w = psw[j];
        scale *= w;
        bias *= w;
      }
      acc.fmadd(vset1(scale), row, tail);
      bias_sum += bias;
    }
    const vec_t shift = vset1(bias_sum);
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) acc.v[i] = vadd(acc.v[i], shift);
    if (mean && end > begin) acc.scale(vset1(1.0f / static_cast<float>(end - begin)));
    acc.store(out + cur.out_row() * D, tail);
    begin = end;
    cur.next(bag + 1 < bag_hi);
  }
  return ok;
}
#endif

// Portable: any D, `acc` holds D floats.
template <typename index_t, bool kWeighted>
bool pool_bags_int8_generic(const uint8_t* weights, const index_t* indices, const index_t* offsets, const float* psw,
                            bool mean, const PoolGeometry& g, int64_t row_bytes, int64_t bag_lo, int64_t bag_hi,
                            float* out, const PrefetchPlan& pf, float* acc) {
  const int64_t D = g.D;
  const int64_t code_bytes = int8_rows::code_bytes(D);
  const int64_t dist = pf.dist;
  bool ok = true;
  BagCursor<uint8_t> cur(g, weights, bag_lo, dist, row_bytes);
  int64_t begin = offsets[bag_lo];
  for (int64_t bag = bag_lo; bag < bag_hi; ++bag) {
    const int64_t end = offsets[bag + 1];
    for (int64_t c = 0; c < D; ++c) acc[c] = 0.0f;
    float bias_sum = 0.0f;
    for (int64_t j = begin; j < end; ++j) {
      if (j < cur.pf_limit) {
        const uint64_t pi = static_cast<uint64_t>(static_cast<int64_t>(indices[j + dist]));
        if (pi < cur.nrows) prefetch_row<2>(cur.table + static_cast<int64_t>(pi) * row_bytes, pf.lines);
      }
      const uint64_t idx = static_cast<uint64_t>(static_cast<int64_t>(indices[j]));
      if (C10_UNLIKELY(idx >= cur.nrows)) {
        ok = false;
        continue;
      }
      const uint8_t* row = cur.table + static_cast<int64_t>(idx) * row_bytes;
      float scale, bias;
      row_qparams(row, code_bytes, scale, bias);
      const float w = kWeighted ? psw[j] : 1.0f;
      const float s = w * scale;
      bias_sum += w * bias;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) acc[c] += s * static_cast<float>(row[c]);
    }
    const float inv = mean && end > begin ? 1.0f / static_cast<float>(end - begin) : 1.0f;
    float* dst = out + cur.out_row() * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) dst[c] = (acc[c] + bias_sum) * inv;
    begin = end;
    cur.next(bag + 1 < bag_hi);
  }
  return ok;
}

template <typename index_t>
void pool_forward_int8(const at::Tensor& weights, const at::Tensor& indices, const at::Tensor& offsets,
                       const at::Tensor& psw, bool mean, const PoolGeometry& g, int64_t row_bytes, at::Tensor& out) {
  const uint8_t* w = weights.data_ptr<uint8_t>();
  const index_t* idx = indices.data_ptr<index_t>();
  const index_t* off = offsets.data_ptr<index_t>();
  const float* pw = psw.defined() ? psw.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const PrefetchPlan pf = prefetch_plan(row_bytes);
  bool ok = true;
#if LATTICE_HAVE_SIMD
  if (use_simd() && g.D <= kBlock) {
    dispatch_nv(num_vecs(g.D), [&](auto nv_tag) {
      constexpr int NV = decltype(nv_tag)::value;
      auto run = [&](auto weighted_tag) {
        constexpr bool kW = decltype(weighted_tag)::value;
        dispatch_prefetch(pf, [&](auto pf_tag) {
          constexpr int kPf = decltype(pf_tag)::value;
          ok = for_each_chunk(g, off, [&](int64_t lo, int64_t hi) {
            return pool_bags_int8_simd<index_t, kW, NV, kPf>(w, idx, off, pw, mean, g, row_bytes, lo, hi, o, pf);
          });
        });
      };
      if (pw) {
        run(std::true_type());
      } else {
        run(std::false_type());
      }
    });
    if (!ok) report_bad_index<index_t>(g, idx, off);
    return;
  }
#endif
  auto run_generic = [&](auto weighted_tag) {
    constexpr bool kW = decltype(weighted_tag)::value;
    ok = for_each_chunk(g, off, [&](int64_t lo, int64_t hi) {
      std::vector<float> acc(g.D);
      return pool_bags_int8_generic<index_t, kW>(w, idx, off, pw, mean, g, row_bytes, lo, hi, o, pf, acc.data());
    });
  };
  if (pw) {
    run_generic(std::true_type());
  } else {
    run_generic(std::false_type());
  }
  if (!ok) report_bad_index<index_t>(g, idx, off);
}

at::Tensor jagged_embedding_pool_int8_cpu(const at::Tensor& weights, const at::Tensor& table_row_offsets,
                                          const at::Tensor& indices, const at::Tensor& offsets, int64_t pooling,
                                          const c10::optional<at::Tensor>& per_sample_weights,
                                          int64_t embedding_dim) {
  check_cpu(weights, "weights");
  check_dim(weights, 2, "weights");
  check_int8_rows(weights, embedding_dim);
  check_pooling(pooling);
  const PoolGeometry g =
      check_pool_geometry(table_row_offsets, indices, offsets, weights.size(0), embedding_dim);
  check_per_sample_weights(per_sample_weights, g.N, pooling);
  at::Tensor out = empty_output({g.B, g.T, g.D}, weights.options().dtype(at::kFloat));
  if (g.nbags == 0) return out;
  const at::Tensor w = weights.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor off = offsets.contiguous();
  const at::Tensor psw =
      per_sample_weights.has_value() ? per_sample_weights->to(at::kFloat).contiguous() : at::Tensor();
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "jagged_embedding_pool_int8_cpu", [&] {
    pool_forward_int8<index_t>(w, idx, off, psw, pooling == 1, g, weights.size(1), out);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace lattice

LATTICE_REGISTER_CPU_KERNELS(jagged_embedding_pool_int8, m) {
  m.impl("jagged_embedding_pool_int8", &lattice::cpu::jagged_embedding_pool_int8_cpu);
}
