// The per-row optimizer updates shared by the fused backward and sparse_rows_optimizer_step_.
//
//   SGD:               w -= lr * (g + wd * w)
//   row-wise Adagrad:  g' = g + wd * w                      (FBGEMM's L2 weight-decay mode)
//                      state += mean(g'^2 over D)
//                      w -= lr / (sqrt(state) + eps) * g'
// g is the row's reduced fp32 (float64 for float64 weights) gradient; w is read and written in its
// storage dtype, the arithmetic is done in the accumulation type.
#pragma once

#include <cmath>
#include <cstdint>

#include "lattice/cpu/row_simd.h"

namespace lattice {
namespace cpu {

enum class Optimizer : int64_t { kSGD = 0, kRowwiseAdagrad = 1 };

struct OptimizerParams {
  Optimizer kind;
  float lr;
  float eps;
  float weight_decay;
};

// Portable: g is [D] in the accumulation type.
template <typename W, typename A>
inline void update_row_generic(W* w, const A* g, int64_t D, const OptimizerParams& p, float* state) {
  const A wd = static_cast<A>(p.weight_decay);
  if (p.kind == Optimizer::kSGD) {
    const A lr = static_cast<A>(p.lr);
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) {
      const A wc = to_acc<A>(w[c]);
      w[c] = from_acc<W>(wc - lr * (g[c] + wd * wc));
    }
    return;
  }
  A ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < D; ++c) {
    const A gc = g[c] + wd * to_acc<A>(w[c]);
    ss += gc * gc;
  }
  const A s = static_cast<A>(*state) + ss / static_cast<A>(D);
  *state = static_cast<float>(s);
  const A mult = static_cast<A>(p.lr) / (std::sqrt(static_cast<A>(*state)) + static_cast<A>(p.eps));
#pragma omp simd
  for (int64_t c = 0; c < D; ++c) {
    const A wc = to_acc<A>(w[c]);
    w[c] = from_acc<W>(wc - mult * (g[c] + wd * wc));
  }
}

#if LATTICE_HAVE_SIMD
// SIMD (AVX-512 or AVX2): the row's gradient g (D <= kBlock) is held in registers; the weights are
// streamed through twice (weight decay, then the update) rather than held too, which would need twice
// the registers AVX2 has at D = 128. The second read hits L1.
template <int NV, typename W>
inline void update_row_simd(W* w, Vecs<NV, W>& g, int64_t D, const tail_t& tail, const OptimizerParams& p,
                            float* state) {
  if (p.weight_decay != 0.0f) {
    const vec_t wd = vset1(p.weight_decay);
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) g.v[i] = vfmadd(wd, vload<false>(w + kLanes * i, tail), g.v[i]);
    g.v[NV - 1] = vfmadd(wd, vload<true>(w + kLanes * (NV - 1), tail), g.v[NV - 1]);
  }
  float mult = p.lr;
  if (p.kind == Optimizer::kRowwiseAdagrad) {
    const float s = *state + g.sum_squares() * (1.0f / static_cast<float>(D));
    *state = s;
    mult = p.lr / (std::sqrt(s) + p.eps);
  }
  const vec_t m = vset1(mult);
#pragma GCC unroll 16
  for (int i = 0; i < NV - 1; ++i) {
    vstore<false>(w + kLanes * i, vfnmadd(m, g.v[i], vload<false>(w + kLanes * i, tail)), tail);
  }
  vstore<true>(w + kLanes * (NV - 1), vfnmadd(m, g.v[NV - 1], vload<true>(w + kLanes * (NV - 1), tail)), tail);
}
#endif

}  // namespace cpu
}  // namespace lattice
