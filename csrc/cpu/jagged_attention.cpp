// Jagged (varlen) multi-head attention on the CPU: forward and backward, flash-style.
//
// q [Nq, H, Dh] + q_offsets [B+1]; k, v [Nk, H, Dh] + kv_offsets [B+1]. Sample b's queries attend only
// to sample b's keys; with `causal`, query i of n attends keys j <= i + (m - n) (the last query is
// aligned with the last key). Returns out [Nq, H, Dh] and lse [Nq, H] (fp32, natural log of the sum of
// exp(scaled scores)).
//
// A query that sees no key (a sample without keys, or a causal query before the first key) gets
// out = 0 and lse = -inf: log of an empty sum, which is also what torch.logsumexp gives and what makes
// partial results merge correctly with logaddexp. The backward treats such rows as contributing
// nothing (grad_q = 0 for them), so neither direction produces NaN.
//
// The fast path (fp32/bf16/fp16 inputs, fp32 accumulation):
//   * Work items. Forward: (sample, head, chunk of <= 256 queries); backward: (sample, head), whose
//     keys are split into chunks (with a partial grad_q each, reduced afterwards) only when a few long
//     samples would leave threads idle. Samples with <= 32 queries (the summary-token direction) take
//     all heads in one item so their K/V rows are read in memory order. Items run largest first under
//     dynamic OpenMP scheduling, so skewed lengths balance. grad_k/grad_v rows have exactly one writer.
//   * Scores are computed transposed, S^T [keys, queries], queries along the SIMD lanes. S^T = K Q^T is
//     a register-blocked micro-kernel over (MR keys, read through row pointers) x (NV vectors of
//     queries, Q^T packed per block of NV*W queries); its store applies the causal mask and takes the
//     tile's max. The softmax statistics (max, sum, lse, D = rowsum(dO*O)) are per query, i.e. per
//     lane: the online softmax over key tiles is element-wise, with no horizontal reductions.
//   * Every product with Dh as the output width (P V, P^T dO, dS^T Q, dS K) is a second micro-kernel
//     over (MR rows) x (DV vectors of Dh) broadcasting the P/dS entries.
//   * K/V rows are packed to fp32 per key tile when rows are reused by many query blocks (or need
//     conversion / padding to whole vectors); items with few queries read fp32 rows in place with
//     software prefetch.
// No [B, H, Lmax, Lmax] (or even [Lq, Lk]) tensor is ever formed: a score tile is at most 256 x NV*W.
// float64 inputs take a plain scalar path (gradcheck); results for a given thread count are
// deterministic (a split backward sums its partial grad_q in a fixed order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include <lattice/checks.h>
#include "lattice/cpu/huge_pages.h"
#include "lattice/cpu/register.h"

namespace lattice {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------------
// A minimal SIMD vector of floats: AVX-512 (16 lanes), AVX2+FMA (8 lanes) or portable (8 lanes,
// element loops the compiler may vectorize). Only what the kernels below need.
// ---------------------------------------------------------------------------------------------------
#if defined(__AVX512F__)
struct Vec {
  static constexpr int W = 16;
  __m512 v;
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  // Lane l holds `base + l`.
  static Vec iota(float base) {
    return {_mm512_add_ps(_mm512_set1_ps(base),
                          _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))};
  }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  // where(a >= b, x, y)
  friend Vec select_ge(Vec a, Vec b, Vec x, Vec y) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ), y.v, x.v)};
  }
  // where(a == b, x, y)
  friend Vec select_eq(Vec a, Vec b, Vec x, Vec y) {
    return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ), y.v, x.v)};
  }
  // exp(x): Cephes' polynomial on the reduced argument, 2^n applied with scalef. Exactly 0 below
  // -87.3 (so exp(-inf) = 0); NaN propagates.
  Vec exp() const {
    const __m512 x0 = v;
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(88.37626f), _mm512_max_ps(_mm512_set1_ps(-88.0f), x0));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    // Keep lanes with x0 >= -87.3 or NaN (unordered compare is true).
    const __mmask16 keep = _mm512_cmp_ps_mask(x0, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
    return {_mm512_maskz_scalef_ps(keep, p, n)};
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  static constexpr int W = 8;
  __m256 v;
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec set1(float x) { return {_mm256_set1_ps(x)}; }
  static Vec iota(float base) {
    return {_mm256_add_ps(_mm256_set1_ps(base), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7))};
  }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm256_mul_ps(a.v, b.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  friend Vec select_ge(Vec a, Vec b, Vec x, Vec y) {
    return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_GE_OQ))};
  }
  friend Vec select_eq(Vec a, Vec b, Vec x, Vec y) {
    return {_mm256_blendv_ps(y.v, x.v, _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ))};
  }
  Vec exp() const {
    const __m256 x0 = v;
    const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x0));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // 2^n through the exponent bits; n >= -127 here, and lanes below -87.3 are zeroed.
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    const __m256 keep = _mm256_cmp_ps(x0, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);
    const __m256 nan = _mm256_cmp_ps(x0, x0, _CMP_UNORD_Q);
    return {_mm256_blendv_ps(_mm256_and_ps(y, keep), x0, nan)};
  }
};
#else
struct Vec {
  static constexpr int W = 8;
  float v[W];
  static Vec load(const float* p) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  void store(float* p) const {
    for (int i = 0; i < W; ++i) p[i] = v[i];
  }
  static Vec zero() { return set1(0.f); }
  static Vec set1(float x) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static Vec iota(float base) {
    Vec r;
    for (int i = 0; i < W; ++i) r.v[i] = base + static_cast<float>(i);
    return r;
  }
#define LATTICE_VEC_BINOP(expr)       \
  Vec r;                              \
  for (int i = 0; i < W; ++i) r.v[i] = expr; \
  return r;
  friend Vec fmadd(Vec a, Vec b, Vec c) { LATTICE_VEC_BINOP(a.v[i] * b.v[i] + c.v[i]) }
  friend Vec operator+(Vec a, Vec b) { LATTICE_VEC_BINOP(a.v[i] + b.v[i]) }
  friend Vec operator-(Vec a, Vec b) { LATTICE_VEC_BINOP(a.v[i] - b.v[i]) }
  friend Vec operator*(Vec a, Vec b) { LATTICE_VEC_BINOP(a.v[i] * b.v[i]) }
  friend Vec vmax(Vec a, Vec b) { LATTICE_VEC_BINOP(a.v[i] > b.v[i] ? a.v[i] : b.v[i]) }
  friend Vec select_ge(Vec a, Vec b, Vec x, Vec y) { LATTICE_VEC_BINOP(a.v[i] >= b.v[i] ? x.v[i] : y.v[i]) }
  friend Vec select_eq(Vec a, Vec b, Vec x, Vec y) { LATTICE_VEC_BINOP(a.v[i] == b.v[i] ? x.v[i] : y.v[i]) }
  Vec exp() const { LATTICE_VEC_BINOP(std::exp(v[i])) }
#undef LATTICE_VEC_BINOP
};
#endif

constexpr int W = Vec::W;
constexpr bool kWide = W == 16;  // 32 vector registers (AVX-512) vs 16

// Keys per tile (the online-softmax step) and queries per forward work item.
constexpr int64_t kBK = 256;
constexpr int64_t kQChunk = 256;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Rows (keys) of the S^T = K Q^T micro-kernel for NV query vectors. Each row is read through its own
// pointer (the K rows stay where they are), so MR is kept to what fits the general registers.
template <int NV>
constexpr int score_mr() {
  return kWide ? 8 : (NV == 1 ? 8 : 4);
}

// Rows of the C [rows, DV*W] += A B micro-kernel.
template <int DV>
constexpr int acc_mr() {
  return kWide ? (DV == 1 ? 12 : DV == 2 ? 12 : DV == 3 ? 8 : 6) : (DV == 1 ? 8 : DV == 2 ? 6 : DV == 3 ? 4 : 3);
}

// The causal mask of a score tile S^T [keys, queries]: row r (a key) hides lanes (queries) below
// r + shift, for rows r >= from. `from` past the last row means no mask.
struct TileMask {
  int64_t from;
  int64_t shift;
};

// C[r, 0:NV*W] = sum_d A[r*lda + d] * BT[d*NV*W + 0:NV*W] for r < MR: MR rows of A (keys, read in
// place; rows past `rows` repeat the last one) against a packed block BT [Dh, NV*W] (queries along the
// lanes). C has row stride NV*W. Hidden entries (mask, `row0` = this block's first row in the tile)
// are stored as -inf, and `tmax` (when given) takes the lane-wise max over the real rows.
template <int NV, int MR>
inline void score_block(const float* __restrict a, int64_t lda, int64_t rows, const float* __restrict bt, int64_t dh,
                        float* __restrict c, int64_t row0, TileMask mask, Vec* tmax) {
  const float* ar[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) ar[r] = a + std::min<int64_t>(r, rows - 1) * lda;
  Vec acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[r][j] = Vec::zero();
  for (int64_t d = 0; d < dh; ++d) {
    Vec b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) b[j] = Vec::load(bt + d * NV * W + j * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec x = Vec::set1(ar[r][d]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[r][j] = fmadd(x, b[j], acc[r][j]);
    }
  }
  const Vec neg_inf = Vec::set1(kNegInf);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const bool hide = row0 + r >= mask.from;
    const Vec first_visible = Vec::set1(static_cast<float>(row0 + r + mask.shift));
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      Vec x = acc[r][j];
      if (hide) x = select_ge(Vec::iota(static_cast<float>(j * W)), first_visible, x, neg_inf);
      x.store(c + r * NV * W + j * W);
      if (tmax != nullptr && r < rows) tmax[j] = vmax(tmax[j], x);
    }
  }
}

// S^T [round_up(rows, MR), NV*W] = A[0:rows] BT, masked; tmax (NV vectors, optional) takes the max.
template <int NV>
inline void score_tile(const float* a, int64_t lda, int64_t rows, const float* bt, int64_t dh, float* st,
                       TileMask mask, Vec* tmax) {
  constexpr int MR = score_mr<NV>();
  for (int64_t r = 0; r < rows; r += MR) {
    // Rows may be H*Dh apart in the input tensor: fetch the next block's rows while this one computes
    // (one prefetch per 128 bytes: the adjacent-line prefetcher brings the other half of each pair).
    for (int64_t p = r + MR; p < std::min<int64_t>(rows, r + 2 * MR); ++p) {
      for (int64_t off = 0; off < dh; off += 32) __builtin_prefetch(a + p * lda + off, 0, 3);
    }
    score_block<NV, MR>(a + r * lda, lda, rows - r, bt, dh, st + r * NV * W, r, mask, tmax);
  }
}

// What a C += A B product starts from.
enum AccMode : int {
  kOverwrite = 0,   // C = A B
  kAccumulate = 1,  // C += A B
  kRescale = 2,     // C = alpha[r] * C + A B
};

// C[r, 0:DV*W] = (see AccMode) + sum_{i<K} A[r*RS + i*IS] * B[i*ldb + :].
template <int MR, int DV, int RS, int IS>
inline void acc_block(const float* __restrict a, const float* __restrict b, int64_t ldb, int64_t K,
                      float* __restrict c, int64_t ldc, int mode, const float* __restrict alpha) {
  Vec acc[MR][DV];
  if (mode == kOverwrite) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) acc[r][j] = Vec::zero();
  } else if (mode == kAccumulate) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) acc[r][j] = Vec::load(c + r * ldc + j * W);
  } else {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec s = Vec::set1(alpha[r]);
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) acc[r][j] = Vec::load(c + r * ldc + j * W) * s;
    }
  }
  for (int64_t i = 0; i < K; ++i) {
    Vec bv[DV];
#pragma GCC unroll 4
    for (int j = 0; j < DV; ++j) bv[j] = Vec::load(b + i * ldb + j * W);
    const float* ai = a + i * IS;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec ar = Vec::set1(ai[r * RS]);
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) acc[r][j] = fmadd(ar, bv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < DV; ++j) acc[r][j].store(c + r * ldc + j * W);
}

// The tail rows (fewer than a full micro-tile) dispatched to a block of exactly that height.
template <int M, int DV, int RS, int IS>
inline void acc_tail(int64_t rows, const float* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc,
                     int mode, const float* alpha) {
  if constexpr (M >= 1) {
    if (rows == M) {
      acc_block<M, DV, RS, IS>(a, b, ldb, K, c, ldc, mode, alpha);
    } else {
      acc_tail<M - 1, DV, RS, IS>(rows, a, b, ldb, K, c, ldc, mode, alpha);
    }
  }
}

template <int DV, int RS, int IS>
inline void acc_rows(const float* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc, int mode,
                     const float* alpha, int64_t rows) {
  constexpr int MR = acc_mr<DV>();
  int64_t r = 0;
  for (; r + MR <= rows; r += MR) {
    acc_block<MR, DV, RS, IS>(a + r * RS, b, ldb, K, c + r * ldc, ldc, mode, alpha ? alpha + r : nullptr);
  }
  if (r < rows) {
    acc_tail<MR - 1, DV, RS, IS>(rows - r, a + r * RS, b, ldb, K, c + r * ldc, ldc, mode,
                                 alpha ? alpha + r : nullptr);
  }
}

// C [rows, nvec*W] (row stride ldc) = (see AccMode) + A B, where A is rows x K with element (r, i) at
// a[r*RS + i*IS] and B is K x nvec*W with row stride ldb.
template <int RS, int IS>
inline void acc_gemm(const float* a, const float* b, int64_t ldb, int64_t K, float* c, int64_t ldc, int mode,
                     const float* alpha, int64_t rows, int64_t nvec) {
  int64_t v = 0;
  for (; v + 4 <= nvec; v += 4) acc_rows<4, RS, IS>(a, b + v * W, ldb, K, c + v * W, ldc, mode, alpha, rows);
  switch (nvec - v) {
    case 3: acc_rows<3, RS, IS>(a, b + v * W, ldb, K, c + v * W, ldc, mode, alpha, rows); break;
    case 2: acc_rows<2, RS, IS>(a, b + v * W, ldb, K, c + v * W, ldc, mode, alpha, rows); break;
    case 1: acc_rows<1, RS, IS>(a, b + v * W, ldb, K, c + v * W, ldc, mode, alpha, rows); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Packing (with conversion to fp32). `src` rows are tokens with stride `ld` elements.
// ---------------------------------------------------------------------------------------------------

// Token rows of one head are H*Dh apart, so a sequence's rows cross a page every few rows and the
// hardware prefetchers lose the stream; fetch a few rows ahead explicitly.
constexpr int64_t kPrefetchRows = 16;

template <typename scalar_t>
inline void prefetch_row(const scalar_t* p, int64_t dh) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < dh * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(c + off, 0, 3);
}

#if defined(__AVX512F__)
// In-register transpose of 16 rows of 16 floats: on return r[j] holds column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[g][c]: rows 4g..4g+3 of columns c, c+4, c+8, c+12 (one per 128-bit lane).
  __m512 u[4][4];
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[g][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0x88), v1 = _mm512_shuffle_f32x4(u[0][c], u[1][c], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0x88), v3 = _mm512_shuffle_f32x4(u[2][c], u[3][c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
    r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
  }
}
#endif

// Transposed query block: out[d*bqp + i] = mult * src[i*ld + d] for i < rows, 0 for rows <= i < bqp.
template <typename scalar_t>
void pack_transposed(const scalar_t* src, int64_t ld, int64_t rows, int64_t dh, int64_t bqp, float mult,
                     float* out) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (bqp % 16 == 0) {
      const __m512 m = _mm512_set1_ps(mult);
      for (int64_t i = 0; i < rows; ++i) prefetch_row(src + i * ld, dh);
      for (int64_t i0 = 0; i0 < bqp; i0 += 16) {
        const int64_t nr = std::max<int64_t>(0, std::min<int64_t>(16, rows - i0));
        for (int64_t d0 = 0; d0 < dh; d0 += 16) {
          const int64_t nc = std::min<int64_t>(16, dh - d0);
          const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1u);
          __m512 r[16];
#pragma GCC unroll 16
          for (int i = 0; i < 16; ++i) {
            r[i] = i < nr ? _mm512_maskz_loadu_ps(cm, src + (i0 + i) * ld + d0) : _mm512_setzero_ps();
          }
          transpose16(r);
          for (int64_t j = 0; j < nc; ++j) _mm512_storeu_ps(out + (d0 + j) * bqp + i0, _mm512_mul_ps(r[j], m));
        }
      }
      return;
    }
  }
#endif
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* s = src + i * ld;
    for (int64_t d = 0; d < dh; ++d) out[d * bqp + i] = mult * static_cast<float>(s[d]);
  }
  for (int64_t d = 0; d < dh; ++d)
    for (int64_t i = rows; i < bqp; ++i) out[d * bqp + i] = 0.f;
}

inline void ensure(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
}

// Per-thread scratch outlives the call (see run_items); one very long sequence must not pin its
// buffers for the life of the process, so anything above this is released after the call.
constexpr size_t kKeepScratchBytes = size_t{32} << 20;

template <typename... Buffers>
void trim_buffers(Buffers&... buffers) {
  const size_t bytes = (... + (buffers.capacity() * sizeof(typename Buffers::value_type)));
  if (bytes > kKeepScratchBytes) (..., std::decay_t<Buffers>().swap(buffers));
}

// Scratch of the float64 path and of paths without scratch.
template <typename T>
struct PlainScratch {
  std::vector<T> buf;
  void trim() { trim_buffers(buf); }
};

// ---------------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------------
struct Problem {
  int64_t B, H, Dh, Nq, Nk;
  at::Tensor q_offsets, kv_offsets;  // contiguous int64 on CPU
};

void check_offsets(const at::Tensor& offsets, const char* name, int64_t total, const char* values_name) {
  TORCH_CHECK(offsets.device().is_cpu(), name, " must be on the CPU (like q), got ", offsets.device());
  TORCH_CHECK(offsets.scalar_type() == at::kLong, name, " must be int64, got ", offsets.scalar_type());
  check_dim(offsets, 1, name);
  TORCH_CHECK(offsets.numel() >= 1, name, " must have B+1 >= 1 entries, got 0");
  check_offsets_cpu<int64_t>(offsets, name, -1, total, values_name, "sample");
  const int64_t last = offsets.contiguous().data_ptr<int64_t>()[offsets.numel() - 1];
  TORCH_CHECK(last == total, name, "[-1] must equal the number of rows of ", values_name, " (", total, "), got ",
              last);
}

Problem check_inputs(const at::Tensor& q, const at::Tensor& q_offsets, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& kv_offsets, double scale) {
  check_dim(q, 3, "q");
  check_dim(k, 3, "k");
  check_dim(v, 3, "v");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "jagged_attention (CPU): q, k, v must be on the CPU, got ", q.device(), ", ", k.device(), ", ",
              v.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "q must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt, "k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == dt, "v must have q's dtype ", dt, ", got ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(k.size(1) == q.size(1), "k must have q's number of heads ", q.size(1), ", got ", k.size(1),
              " (k shape ", k.sizes(), ")");
  TORCH_CHECK(k.size(2) == q.size(2), "k must have q's head dim ", q.size(2), ", got ", k.size(2), " (k shape ",
              k.sizes(), ")");
  TORCH_CHECK(q.size(2) >= 1, "q must have a head dim >= 1, got shape ", q.sizes());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  check_offsets(q_offsets, "q_offsets", q.size(0), "q");
  check_offsets(kv_offsets, "kv_offsets", k.size(0), "k");
  TORCH_CHECK(q_offsets.numel() == kv_offsets.numel(),
              "q_offsets and kv_offsets must describe the same number of samples: q_offsets has ",
              q_offsets.numel() - 1, " samples (", q_offsets.numel(), " entries), kv_offsets has ",
              kv_offsets.numel() - 1, " (", kv_offsets.numel(), " entries)");
  return Problem{q_offsets.numel() - 1, q.size(1), q.size(2), q.size(0), k.size(0), q_offsets.contiguous(),
                 kv_offsets.contiguous()};
}

int num_threads() {
#ifdef _OPENMP
  // Nested inside another parallel region (e.g. an inter-op thread), run serially.
  return omp_in_parallel() ? 1 : at::get_num_threads();
#else
  return 1;
#endif
}

// A work item: sample b, heads [h0, h1), queries [q0, q1) of the sample. Samples with few queries
// (the summary-token direction) take all their heads in one item, so their K/V rows stream from memory
// in order; long ones are split per head (and per query chunk in the forward) for balance.
struct Item {
  int64_t b, h0, h1, q0, q1;
  double cost;
  // Backward only: the item's keys [k0, k1), and where its partial grad_q goes when the sample's keys
  // are split over several items (-1: the item has all keys and writes grad_q itself).
  int64_t k0 = 0, k1 = std::numeric_limits<int64_t>::max();
  int64_t dq_slot = -1;
};
constexpr int64_t kGroupHeadsMaxQueries = 32;

// Largest first, so dynamic scheduling leaves no long item for the end.
void sort_items(std::vector<Item>& items) {
  std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
}

// Number of keys visible to query i (local) of a sample with n queries and m keys.
inline int64_t visible_keys(int64_t i, int64_t n, int64_t m, bool causal) {
  if (!causal) return m;
  return std::max<int64_t>(0, std::min<int64_t>(m, i + (m - n) + 1));
}

// Rows [0, rows) of nh consecutive heads as fp32: out[hh*hs + r*dhp + d] = src[r*ld + hh*dh + d], zero
// columns up to dhp. Reads each token's heads in order (one contiguous span per token).
template <typename scalar_t>
void pack_heads(const scalar_t* src, int64_t ld, int64_t rows, int64_t nh, int64_t dh, int64_t dhp, int64_t hs,
                float* out) {
  const int64_t span = nh * dh;
  for (int64_t r = 0; r < std::min(rows, kPrefetchRows); ++r) prefetch_row(src + r * ld, span);
  for (int64_t r = 0; r < rows; ++r) {
    if (r + kPrefetchRows < rows) prefetch_row(src + (r + kPrefetchRows) * ld, span);
    for (int64_t hh = 0; hh < nh; ++hh) {
      const scalar_t* sr = src + r * ld + hh * dh;
      float* o = out + hh * hs + r * dhp;
      int64_t d = 0;
      if constexpr (std::is_same_v<scalar_t, float>) {
        for (; d + W <= dh; d += W) Vec::load(sr + d).store(o + d);
      }
      for (; d < dh; ++d) o[d] = static_cast<float>(sr[d]);
      for (; d < dhp; ++d) o[d] = 0.f;
    }
  }
}

// dst[0:dh] = mult * src[0:dh] (converted to scalar_t). (Plain stores: the outputs are fresh tensors
// whose pages the kernel zeroes on first touch, which leaves their lines cached; streaming stores
// measured slower.)
template <typename scalar_t>
inline void store_row(const float* src, int64_t dh, float mult, scalar_t* dst) {
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vec m = Vec::set1(mult);
    for (; d + W <= dh; d += W) (Vec::load(src + d) * m).store(dst + d);
  }
  for (; d < dh; ++d) dst[d] = static_cast<scalar_t>(src[d] * mult);
}


// sum_d a[d] * b[d] in fp32.
template <typename scalar_t>
inline float dot_row(const scalar_t* a, const scalar_t* b, int64_t dh) {
  int64_t d = 0;
  float acc = 0.f;
  if constexpr (std::is_same_v<scalar_t, float>) {
    Vec v = Vec::zero();
    for (; d + W <= dh; d += W) v = fmadd(Vec::load(a + d), Vec::load(b + d), v);
    float lanes[W];
    v.store(lanes);
    for (int l = 0; l < W; ++l) acc += lanes[l];
  }
  for (; d < dh; ++d) acc += static_cast<float>(a[d]) * static_cast<float>(b[d]);
  return acc;
}

// Key (row) r of the tile starting at k0 is hidden from the block's lane l (query i0 + l) when
// k0 + r > i0 + l + off, i.e. l < r + (k0 - off - i0); rows below i0 + off + 1 - k0 hide nothing.
inline TileMask causal_mask(bool causal, int64_t k0, int64_t i0, int64_t off) {
  if (!causal) return TileMask{std::numeric_limits<int64_t>::max(), 0};
  return TileMask{std::max<int64_t>(0, i0 + off + 1 - k0), k0 - off - i0};
}

// ---------------------------------------------------------------------------------------------------
// Forward, fast path
// ---------------------------------------------------------------------------------------------------
struct FwdScratch {
  std::vector<float> qt, kp, vp, st, o, mx, l, alpha;
  void trim() { trim_buffers(qt, kp, vp, st, o, mx, l, alpha); }
};

template <typename scalar_t, int NV>
void forward_item(const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out, float* lse,
                  const int64_t* qo, const int64_t* ko, int64_t H, int64_t Dh, float scale, bool causal,
                  const Item& it, FwdScratch& s) {
  constexpr int BQP = NV * W;
  constexpr int SMR = score_mr<NV>();
  const int64_t b = it.b, h0 = it.h0, nh = it.h1 - it.h0;
  const int64_t n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b], off = m - n;
  const int64_t ld = H * Dh;
  const int64_t dhp = round_up(Dh, W), nvec = dhp / W;
  const int64_t nq = it.q1 - it.q0, nblk = (nq + BQP - 1) / BQP;
  const int64_t kend = causal ? std::max<int64_t>(0, std::min<int64_t>(m, it.q1 - 1 + off + 1)) : m;
  const int64_t ktile = std::min<int64_t>(kBK, std::max<int64_t>(kend, 1));
  // Per-head strides of the scratch arrays.
  const int64_t qt_hs = nblk * Dh * BQP, o_hs = nblk * BQP * dhp, st_hs = nblk * BQP, kv_hs = ktile * dhp;
  // With few queries, each K/V row is used once: fp32 rows with whole vectors are read where they are
  // (row stride H*Dh). With many, rows are reused by every query block, so they are packed contiguously.
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool in_place = kFloat && Dh == dhp && nq <= kGroupHeadsMaxQueries;
  const int64_t ldkv = in_place ? ld : dhp;

  ensure(s.qt, nh * qt_hs);
  ensure(s.o, nh * o_hs);
  ensure(s.mx, nh * st_hs);
  ensure(s.l, nh * st_hs);
  ensure(s.alpha, BQP);
  if (!in_place) {
    ensure(s.kp, nh * kv_hs);
    ensure(s.vp, nh * kv_hs);
  }
  ensure(s.st, round_up(kBK, SMR) * BQP);
  for (int64_t hh = 0; hh < nh; ++hh) {
    const scalar_t* qh = q + (qo[b] * H + h0 + hh) * Dh;
    for (int64_t blk = 0; blk < nblk; ++blk) {
      const int64_t i0 = it.q0 + blk * BQP;
      pack_transposed(qh + i0 * ld, ld, std::min<int64_t>(BQP, it.q1 - i0), Dh, BQP, scale,
                      s.qt.data() + hh * qt_hs + blk * Dh * BQP);
    }
  }
  std::fill_n(s.mx.data(), nh * st_hs, kNegInf);
  std::fill_n(s.l.data(), nh * st_hs, 0.f);

  for (int64_t k0 = 0; k0 < kend; k0 += kBK) {
    const int64_t kc = std::min<int64_t>(kBK, kend - k0);
    const scalar_t* k_tile = k + ((ko[b] + k0) * H + h0) * Dh;
    const scalar_t* v_tile = v + ((ko[b] + k0) * H + h0) * Dh;
    if (!in_place) {
      pack_heads(k_tile, ld, kc, nh, Dh, dhp, kv_hs, s.kp.data());
      pack_heads(v_tile, ld, kc, nh, Dh, dhp, kv_hs, s.vp.data());
    }
    for (int64_t hh = 0; hh < nh; ++hh) {
      const float* kt = in_place ? reinterpret_cast<const float*>(k_tile) + hh * Dh : s.kp.data() + hh * kv_hs;
      const float* vt = in_place ? reinterpret_cast<const float*>(v_tile) + hh * Dh : s.vp.data() + hh * kv_hs;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t i0 = it.q0 + blk * BQP, nb = std::min<int64_t>(BQP, it.q1 - i0);
        // Keys of this tile that some query of the block can see.
        int64_t kcb = kc;
        if (causal) kcb = std::min<int64_t>(kc, i0 + nb - 1 + off + 1 - k0);
        if (kcb <= 0) continue;
        float* st = s.st.data();
        Vec tmax[NV];
        for (int j = 0; j < NV; ++j) tmax[j] = Vec::set1(kNegInf);
        score_tile<NV>(kt, ldkv, kcb, s.qt.data() + hh * qt_hs + blk * Dh * BQP, Dh, st,
                       causal_mask(causal, k0, i0, off), tmax);
        float* mx = s.mx.data() + hh * st_hs + blk * BQP;
        float* l = s.l.data() + hh * st_hs + blk * BQP;
        for (int j = 0; j < NV; ++j) {
          const Vec m_old = Vec::load(mx + j * W);
          const Vec m_new = vmax(m_old, tmax[j]);
          // A lane that has seen no visible key keeps max -inf; subtract 0 there so exp gives 0, not NaN.
          const Vec m_use = select_eq(m_new, Vec::set1(kNegInf), Vec::zero(), m_new);
          Vec sum = Vec::zero();
          for (int64_t r = 0; r < kcb; ++r) {
            const Vec p = (Vec::load(st + r * BQP + j * W) - m_use).exp();
            p.store(st + r * BQP + j * W);
            sum = sum + p;
          }
          const Vec alpha = (m_old - m_use).exp();
          (fmadd(Vec::load(l + j * W), alpha, sum)).store(l + j * W);
          m_new.store(mx + j * W);
          alpha.store(s.alpha.data() + j * W);
        }
        // A block is first touched by the first tile (visibility only shrinks with k0).
        acc_gemm<1, BQP>(st, vt, ldkv, kcb, s.o.data() + hh * o_hs + blk * BQP * dhp, dhp,
                         k0 == 0 ? kOverwrite : kRescale, s.alpha.data(), nb, nvec);
      }
    }
  }

  for (int64_t i = 0; i < nq; ++i) {
    const int64_t row = qo[b] + it.q0 + i;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const int64_t h = h0 + hh;
      const float li = s.l[hh * st_hs + i], mi = s.mx[hh * st_hs + i];
      scalar_t* o = out + (row * H + h) * Dh;
      if (li > 0.f) {
        store_row(s.o.data() + hh * o_hs + i * dhp, Dh, 1.f / li, o);
        lse[row * H + h] = mi + std::log(li);
      } else {
        std::fill_n(o, Dh, static_cast<scalar_t>(0.f));
        lse[row * H + h] = kNegInf;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, fast path: an item owns all queries and keys of its (sample, heads), so grad_k/grad_v rows
// are written by exactly one thread and nothing needs a reduction.
// ---------------------------------------------------------------------------------------------------
struct BwdScratch {
  std::vector<float> qt, dot, lse, dd, qrows, dorows, dq, kp, vp, st, dpt, dk, dv;
  void trim() { trim_buffers(qt, dot, lse, dd, qrows, dorows, dq, kp, vp, st, dpt, dk, dv); }
};

template <typename scalar_t, int NV>
void backward_item(const scalar_t* go, const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
                   const float* lse, scalar_t* gq, scalar_t* gk, scalar_t* gv, float* dq_partial, const int64_t* qo,
                   const int64_t* ko, int64_t H, int64_t Dh, float scale, bool causal, const Item& it,
                   BwdScratch& s) {
  constexpr int BQP = NV * W;
  constexpr int SMR = score_mr<NV>();
  const int64_t b = it.b, h0 = it.h0, nh = it.h1 - it.h0;
  const int64_t n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b], off = m - n;
  const int64_t ld = H * Dh;
  const int64_t dhp = round_up(Dh, W), nvec = dhp / W;
  const int64_t nblk = (n + BQP - 1) / BQP;
  // Keys no query sees get zero gradients (a sample without queries; causal never hides the last key
  // from the last query).
  const int64_t kend = n == 0 ? 0 : causal ? std::max<int64_t>(0, std::min<int64_t>(m, n - 1 + off + 1)) : m;
  const int64_t ktile = std::min<int64_t>(kBK, std::max<int64_t>(kend, 1));
  const int64_t qt_hs = nblk * Dh * BQP, v_hs = nblk * BQP, r_hs = std::max<int64_t>(n, 1) * dhp,
                kv_hs = ktile * dhp;
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool in_place = kFloat && Dh == dhp && n <= kGroupHeadsMaxQueries;  // as in the forward
  const int64_t ldkv = in_place ? ld : dhp;

  ensure(s.qt, nh * qt_hs);
  ensure(s.dot, nh * qt_hs);
  ensure(s.lse, nh * v_hs);
  ensure(s.dd, nh * v_hs);
  ensure(s.qrows, nh * r_hs);
  ensure(s.dorows, nh * r_hs);
  ensure(s.dq, nh * r_hs);
  ensure(s.kp, nh * kv_hs);
  ensure(s.vp, nh * kv_hs);
  ensure(s.dk, nh * kv_hs);
  ensure(s.dv, nh * kv_hs);
  ensure(s.st, round_up(kBK, SMR) * BQP);
  ensure(s.dpt, round_up(kBK, SMR) * BQP);

  if (n > 0) {
    const scalar_t* qb = q + (qo[b] * H + h0) * Dh;
    const scalar_t* gob = go + (qo[b] * H + h0) * Dh;
    pack_heads(qb, ld, n, nh, Dh, dhp, r_hs, s.qrows.data());
    pack_heads(gob, ld, n, nh, Dh, dhp, r_hs, s.dorows.data());
    for (int64_t hh = 0; hh < nh; ++hh) {
      for (int64_t blk = 0; blk < nblk; ++blk) {
        const int64_t i0 = blk * BQP, nb = std::min<int64_t>(BQP, n - i0);
        // From the packed fp32 rows (row stride dhp): the transposes read cache-resident data.
        pack_transposed(s.qrows.data() + hh * r_hs + i0 * dhp, dhp, nb, Dh, BQP, scale,
                        s.qt.data() + hh * qt_hs + blk * Dh * BQP);
        pack_transposed(s.dorows.data() + hh * r_hs + i0 * dhp, dhp, nb, Dh, BQP, 1.f,
                        s.dot.data() + hh * qt_hs + blk * Dh * BQP);
      }
      float* lse_h = s.lse.data() + hh * v_hs;
      float* dd_h = s.dd.data() + hh * v_hs;
      for (int64_t i = 0; i < nblk * BQP; ++i) {
        if (i < n) {
          const int64_t row = qo[b] + i, h = h0 + hh;
          const float li = lse[row * H + h];
          // -inf: the query saw no key; +inf makes exp(s - lse) exactly 0 for it (and for padding lanes).
          lse_h[i] = li == kNegInf ? kPosInf : li;
          dd_h[i] = dot_row(go + (row * H + h) * Dh, out + (row * H + h) * Dh, Dh);
        } else {
          lse_h[i] = kPosInf;
          dd_h[i] = 0.f;
        }
      }
    }
    std::fill_n(s.dq.data(), nh * r_hs, 0.f);
  }

  const int64_t kstop = std::min(kend, it.k1);
  for (int64_t k0 = it.k0; k0 < kstop; k0 += kBK) {
    const int64_t kc = std::min<int64_t>(kBK, kstop - k0);
    const scalar_t* k_tile = k + ((ko[b] + k0) * H + h0) * Dh;
    const scalar_t* v_tile = v + ((ko[b] + k0) * H + h0) * Dh;
    if (!in_place) {
      pack_heads(k_tile, ld, kc, nh, Dh, dhp, kv_hs, s.kp.data());
      pack_heads(v_tile, ld, kc, nh, Dh, dhp, kv_hs, s.vp.data());
    }
    // dK/dV rows of the tile are overwritten by the first block that reaches them (blocks reach a
    // non-decreasing number of keys), so the tile needs no zero fill; rows no block reaches stay zero.
    int64_t kinit = 0;
    // The first query that sees key k0 is k0 - off.
    const int64_t blk_begin = causal ? std::max<int64_t>(0, k0 - off) / BQP : 0;
    for (int64_t hh = 0; hh < nh; ++hh) {
      const float* krows = in_place ? reinterpret_cast<const float*>(k_tile) + hh * Dh : s.kp.data() + hh * kv_hs;
      const float* vrows = in_place ? reinterpret_cast<const float*>(v_tile) + hh * Dh : s.vp.data() + hh * kv_hs;
      const float* qrows = s.qrows.data() + hh * r_hs;
      const float* dorows = s.dorows.data() + hh * r_hs;
      float* dk = s.dk.data() + hh * kv_hs;
      float* dv = s.dv.data() + hh * kv_hs;
      float* dq = s.dq.data() + hh * r_hs;
      kinit = 0;
      for (int64_t blk = blk_begin; blk < nblk; ++blk) {
        const int64_t i0 = blk * BQP, nb = std::min<int64_t>(BQP, n - i0);
        int64_t kcb = kc;
        if (causal) kcb = std::min<int64_t>(kc, i0 + nb - 1 + off + 1 - k0);
        if (kcb <= 0) continue;
        float* st = s.st.data();
        float* dpt = s.dpt.data();
        // Hidden scores are -inf, so their probabilities come out 0.
        score_tile<NV>(krows, ldkv, kcb, s.qt.data() + hh * qt_hs + blk * Dh * BQP, Dh, st,
                       causal_mask(causal, k0, i0, off), nullptr);
        score_tile<NV>(vrows, ldkv, kcb, s.dot.data() + hh * qt_hs + blk * Dh * BQP, Dh, dpt, causal_mask(false, 0, 0, 0),
                       nullptr);
        for (int j = 0; j < NV; ++j) {
          const Vec lse_j = Vec::load(s.lse.data() + hh * v_hs + i0 + j * W);
          const Vec d_j = Vec::load(s.dd.data() + hh * v_hs + i0 + j * W);
          for (int64_t r = 0; r < kcb; ++r) {
            const Vec p = (Vec::load(st + r * BQP + j * W) - lse_j).exp();
            p.store(st + r * BQP + j * W);
            (p * (Vec::load(dpt + r * BQP + j * W) - d_j)).store(dpt + r * BQP + j * W);
          }
        }
        // dV += P^T dO ; dK += dS^T Q (scaled at the end) ; dQ += dS K (scaled at the end).
        const int64_t acc_rows = std::min(kinit, kcb);
        if (acc_rows > 0) {
          acc_gemm<BQP, 1>(st, dorows + i0 * dhp, dhp, nb, dv, dhp, kAccumulate, nullptr, acc_rows, nvec);
          acc_gemm<BQP, 1>(dpt, qrows + i0 * dhp, dhp, nb, dk, dhp, kAccumulate, nullptr, acc_rows, nvec);
        }
        if (kcb > acc_rows) {
          acc_gemm<BQP, 1>(st + acc_rows * BQP, dorows + i0 * dhp, dhp, nb, dv + acc_rows * dhp, dhp, kOverwrite,
                           nullptr, kcb - acc_rows, nvec);
          acc_gemm<BQP, 1>(dpt + acc_rows * BQP, qrows + i0 * dhp, dhp, nb, dk + acc_rows * dhp, dhp, kOverwrite,
                           nullptr, kcb - acc_rows, nvec);
        }
        kinit = std::max(kinit, kcb);
        acc_gemm<1, BQP>(dpt, krows, ldkv, kcb, dq + i0 * dhp, dhp, kAccumulate, nullptr, nb, nvec);
      }
    }
    for (int64_t r = 0; r < kc; ++r) {
      const int64_t row = ko[b] + k0 + r;
      if (r >= kinit) {
        std::fill_n(gk + (row * H + h0) * Dh, nh * Dh, static_cast<scalar_t>(0.f));
        std::fill_n(gv + (row * H + h0) * Dh, nh * Dh, static_cast<scalar_t>(0.f));
        continue;
      }
      for (int64_t hh = 0; hh < nh; ++hh) {
        store_row(s.dk.data() + hh * kv_hs + r * dhp, Dh, scale, gk + (row * H + h0 + hh) * Dh);
        store_row(s.dv.data() + hh * kv_hs + r * dhp, Dh, 1.f, gv + (row * H + h0 + hh) * Dh);
      }
    }
  }
  if (it.k0 == 0) {  // the first key chunk also clears the keys nobody sees
    for (int64_t r = kend; r < m; ++r) {
      const int64_t row = ko[b] + r;
      std::fill_n(gk + (row * H + h0) * Dh, nh * Dh, static_cast<scalar_t>(0.f));
      std::fill_n(gv + (row * H + h0) * Dh, nh * Dh, static_cast<scalar_t>(0.f));
    }
  }
  if (it.dq_slot >= 0) {  // a key chunk: its share of grad_q, unscaled, [nh, n, Dh]
    float* part = dq_partial + it.dq_slot;
    for (int64_t hh = 0; hh < nh; ++hh)
      for (int64_t i = 0; i < n; ++i) std::copy_n(s.dq.data() + hh * r_hs + i * dhp, Dh, part + (hh * n + i) * Dh);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = qo[b] + i;
    for (int64_t hh = 0; hh < nh; ++hh) {
      store_row(s.dq.data() + hh * r_hs + i * dhp, Dh, scale, gq + (row * H + h0 + hh) * Dh);
    }
  }
}

// Splits backward items whose cost is far above the average share of a thread into key chunks (whole
// tiles). Returns the number of floats the chunks' partial grad_q need; sets their k0, k1, dq_slot.
int64_t split_backward_items(std::vector<Item>& items, const int64_t* qo, const int64_t* ko, int64_t Dh,
                             int threads) {
  if (threads <= 1 || items.empty()) return 0;
  double total = 0;
  for (const Item& it : items) total += it.cost;
  const double target = total / (4.0 * threads);
  std::vector<Item> out;
  out.reserve(items.size());
  int64_t slots = 0;
  for (const Item& it : items) {
    const int64_t n = qo[it.b + 1] - qo[it.b], m = ko[it.b + 1] - ko[it.b];
    const int64_t tiles = (m + kBK - 1) / kBK;
    const int64_t chunks = std::min<int64_t>(tiles, static_cast<int64_t>(it.cost / target));
    if (chunks < 2 || n == 0) {
      out.push_back(it);
      continue;
    }
    const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
    for (int64_t t0 = 0; t0 < tiles; t0 += tiles_per_chunk) {
      Item part = it;
      part.k0 = t0 * kBK;
      part.k1 = std::min<int64_t>(m, (t0 + tiles_per_chunk) * kBK);
      part.cost = it.cost * static_cast<double>(part.k1 - part.k0) / static_cast<double>(m);
      part.dq_slot = slots;
      slots += (it.h1 - it.h0) * n * Dh;
      out.push_back(part);
    }
  }
  items.swap(out);
  return slots;
}

// grad_q = scale * (sum of the key chunks' partial grad_q) for every split (sample, heads).
template <typename scalar_t>
void reduce_dq_partials(const std::vector<Item>& items, const float* dq_partial, scalar_t* gq, const int64_t* qo,
                        int64_t H, int64_t Dh, float scale) {
  // Group the chunks of each (sample, first head): they are consecutive in slot order.
  std::vector<const Item*> split;
  for (const Item& it : items)
    if (it.dq_slot >= 0) split.push_back(&it);
  std::sort(split.begin(), split.end(), [](const Item* a, const Item* b) { return a->dq_slot < b->dq_slot; });
  std::vector<std::pair<size_t, size_t>> groups;  // [first, last) in `split`
  for (size_t i = 0; i < split.size();) {
    size_t j = i + 1;
    while (j < split.size() && split[j]->b == split[i]->b && split[j]->h0 == split[i]->h0) ++j;
    groups.emplace_back(i, j);
    i = j;
  }
  const int64_t count = static_cast<int64_t>(groups.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) if (count > 1)
  for (int64_t g = 0; g < count; ++g) {
    const Item& first = *split[groups[g].first];
    const int64_t n = qo[first.b + 1] - qo[first.b], nh = first.h1 - first.h0;
    std::vector<float> acc(static_cast<size_t>(n * Dh));
    for (int64_t hh = 0; hh < nh; ++hh) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (size_t c = groups[g].first; c < groups[g].second; ++c) {
        const float* part = dq_partial + split[c]->dq_slot + hh * n * Dh;
        for (int64_t x = 0; x < n * Dh; ++x) acc[x] += part[x];
      }
      for (int64_t i = 0; i < n; ++i) {
        scalar_t* dst = gq + ((qo[first.b] + i) * H + first.h0 + hh) * Dh;
        for (int64_t d = 0; d < Dh; ++d) dst[d] = static_cast<scalar_t>(acc[i * Dh + d] * scale);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float64: plain scalar loops (gradcheck and exactness), same semantics.
// ---------------------------------------------------------------------------------------------------
void forward_double(const double* q, const double* k, const double* v, double* out, float* lse, const int64_t* qo,
                    const int64_t* ko, int64_t H, int64_t Dh, double scale, bool causal, const Item& it, int64_t h,
                    std::vector<double>& sc) {
  const int64_t b = it.b, n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b];
  const int64_t ld = H * Dh;
  if (static_cast<int64_t>(sc.size()) < m) sc.resize(m);
  for (int64_t i = it.q0; i < it.q1; ++i) {
    const int64_t row = qo[b] + i;
    const double* qi = q + (row * H + h) * Dh;
    double* oi = out + (row * H + h) * Dh;
    const int64_t vis = visible_keys(i, n, m, causal);
    std::fill_n(oi, Dh, 0.0);
    if (vis == 0) {
      lse[row * H + h] = kNegInf;
      continue;
    }
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < vis; ++j) {
      const double* kj = k + ((ko[b] + j) * H + h) * Dh;
      double acc = 0;
      for (int64_t d = 0; d < Dh; ++d) acc += qi[d] * kj[d];
      sc[j] = acc * scale;
      mx = std::max(mx, sc[j]);
    }
    double sum = 0;
    for (int64_t j = 0; j < vis; ++j) {
      const double p = std::exp(sc[j] - mx);
      sum += p;
      const double* vj = v + ((ko[b] + j) * H + h) * Dh;
      for (int64_t d = 0; d < Dh; ++d) oi[d] += p * vj[d];
    }
    for (int64_t d = 0; d < Dh; ++d) oi[d] /= sum;
    lse[row * H + h] = static_cast<float>(mx + std::log(sum));
  }
  (void)ld;
}

void backward_double(const double* go, const double* q, const double* k, const double* v, const double* out,
                     const float* lse, double* gq, double* gk, double* gv, const int64_t* qo, const int64_t* ko,
                     int64_t H, int64_t Dh, double scale, bool causal, const Item& it, int64_t h) {
  const int64_t b = it.b, n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b];
  for (int64_t j = 0; j < m; ++j) {
    std::fill_n(gk + ((ko[b] + j) * H + h) * Dh, Dh, 0.0);
    std::fill_n(gv + ((ko[b] + j) * H + h) * Dh, Dh, 0.0);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = qo[b] + i;
    const double* qi = q + (row * H + h) * Dh;
    const double* goi = go + (row * H + h) * Dh;
    const double* oi = out + (row * H + h) * Dh;
    double* gqi = gq + (row * H + h) * Dh;
    std::fill_n(gqi, Dh, 0.0);
    const int64_t vis = visible_keys(i, n, m, causal);
    if (vis == 0) continue;
    // lse is stored in fp32; recompute it in double so the float64 path stays exact.
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < vis; ++j) {
      const double* kj = k + ((ko[b] + j) * H + h) * Dh;
      double acc = 0;
      for (int64_t d = 0; d < Dh; ++d) acc += qi[d] * kj[d];
      mx = std::max(mx, acc * scale);
    }
    double sum = 0;
    for (int64_t j = 0; j < vis; ++j) {
      const double* kj = k + ((ko[b] + j) * H + h) * Dh;
      double acc = 0;
      for (int64_t d = 0; d < Dh; ++d) acc += qi[d] * kj[d];
      sum += std::exp(acc * scale - mx);
    }
    const double lse_i = mx + std::log(sum);
    double dd = 0;
    for (int64_t d = 0; d < Dh; ++d) dd += goi[d] * oi[d];
    for (int64_t j = 0; j < vis; ++j) {
      const double* kj = k + ((ko[b] + j) * H + h) * Dh;
      const double* vj = v + ((ko[b] + j) * H + h) * Dh;
      double* gkj = gk + ((ko[b] + j) * H + h) * Dh;
      double* gvj = gv + ((ko[b] + j) * H + h) * Dh;
      double s = 0, dp = 0;
      for (int64_t d = 0; d < Dh; ++d) {
        s += qi[d] * kj[d];
        dp += goi[d] * vj[d];
      }
      const double p = std::exp(s * scale - lse_i);
      const double ds = p * (dp - dd) * scale;
      for (int64_t d = 0; d < Dh; ++d) {
        gvj[d] += p * goi[d];
        gqi[d] += ds * kj[d];
        gkj[d] += ds * qi[d];
      }
    }
  }
  (void)lse;
}

template <typename F>
void run_items(const std::vector<Item>& items, F&& body) {
  const int64_t count = static_cast<int64_t>(items.size());
  const int nt = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, count)));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // Kept per thread across calls: no allocation or first-touch page faults on the hot path.
    static thread_local typename std::decay_t<F>::Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < count; ++t) body(items[t], scratch);
    scratch.trim();
  }
}

template <typename S, typename F>
struct WithScratch {
  using Scratch = S;
  F f;
  void operator()(const Item& it, S& s) const { f(it, s); }
};
template <typename S, typename F>
WithScratch<S, F> with_scratch(F f) {
  return WithScratch<S, F>{std::move(f)};
}

// ---------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> jagged_attention_cpu(const at::Tensor& q_in, const at::Tensor& q_offsets,
                                                         const at::Tensor& k_in, const at::Tensor& v_in,
                                                         const at::Tensor& kv_offsets, double scale, bool causal) {
  const Problem pb = check_inputs(q_in, q_offsets, k_in, v_in, kv_offsets, scale);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out = cpu::empty_output(q.sizes(), q.options());
  at::Tensor lse = at::empty({pb.Nq, pb.H}, q.options().dtype(at::kFloat));
  if (pb.Nq == 0 || pb.H == 0) return {out, lse};
  const int64_t* qo = pb.q_offsets.data_ptr<int64_t>();
  const int64_t* ko = pb.kv_offsets.data_ptr<int64_t>();
  const int64_t H = pb.H, Dh = pb.Dh;

  std::vector<Item> items;
  items.reserve(pb.B * H);
  for (int64_t b = 0; b < pb.B; ++b) {
    const int64_t n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b];
    if (n == 0) continue;
    if (n <= kGroupHeadsMaxQueries) {
      const double keys = causal ? 0.5 * (visible_keys(0, n, m, true) + visible_keys(n - 1, n, m, true)) : m;
      items.push_back(Item{b, 0, H, 0, n, static_cast<double>(H) * (n * (keys + 8) + 2.0 * m)});
      continue;
    }
    for (int64_t q0 = 0; q0 < n; q0 += kQChunk) {
      const int64_t q1 = std::min<int64_t>(n, q0 + kQChunk);
      const double keys = causal ? 0.5 * (visible_keys(q0, n, m, true) + visible_keys(q1 - 1, n, m, true)) : m;
      // Per-query and per-key overheads (packing, finalizing) count as a few keys.
      const double cost = static_cast<double>(q1 - q0) * (keys + 8) + 2.0 * m;
      for (int64_t h = 0; h < H; ++h) items.push_back(Item{b, h, h + 1, q0, q1, cost});
    }
  }
  sort_items(items);
  float* lse_p = lse.data_ptr<float>();

  if (q.scalar_type() == at::kDouble) {
    const double *qp = q.data_ptr<double>(), *kp = k.data_ptr<double>(), *vp = v.data_ptr<double>();
    double* op = out.data_ptr<double>();
    run_items(items, with_scratch<PlainScratch<double>>([&](const Item& it, PlainScratch<double>& sc) {
                for (int64_t h = it.h0; h < it.h1; ++h) {
                  forward_double(qp, kp, vp, op, lse_p, qo, ko, H, Dh, scale, causal, it, h, sc.buf);
                }
              }));
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "jagged_attention_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
      scalar_t* op = out.data_ptr<scalar_t>();
      const float sc = static_cast<float>(scale);
      run_items(items, with_scratch<FwdScratch>([&](const Item& it, FwdScratch& s) {
                  if (it.q1 - it.q0 <= W) {
                    forward_item<scalar_t, 1>(qp, kp, vp, op, lse_p, qo, ko, H, Dh, sc, causal, it, s);
                  } else {
                    forward_item<scalar_t, 2>(qp, kp, vp, op, lse_p, qo, ko, H, Dh, sc, causal, it, s);
                  }
                }));
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> jagged_attention_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& q_offsets, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& kv_offsets, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, bool causal) {
  const Problem pb = check_inputs(q_in, q_offsets, k_in, v_in, kv_offsets, scale);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes(), "grad_out must have q's shape ", q_in.sizes(), ", got ",
              grad_out_in.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), "out must have q's shape ", q_in.sizes(), ", got ", out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == q_in.scalar_type(), "grad_out must have q's dtype ", q_in.scalar_type(),
              ", got ", grad_out_in.scalar_type());
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), "out must have q's dtype ", q_in.scalar_type(), ", got ",
              out_in.scalar_type());
  TORCH_CHECK(lse_in.dim() == 2 && lse_in.size(0) == pb.Nq && lse_in.size(1) == pb.H, "lse must have shape [",
              pb.Nq, ", ", pb.H, "], got ", lse_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat, "lse must be float32, got ", lse_in.scalar_type());
  TORCH_CHECK(grad_out_in.device().is_cpu() && out_in.device().is_cpu() && lse_in.device().is_cpu(),
              "jagged_attention_backward (CPU): grad_out, out and lse must be on the CPU");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor gq = cpu::empty_output(q.sizes(), q.options());
  // Every row of grad_k/grad_v is written by the item of its sample (zeros for keys no query sees).
  at::Tensor gk = cpu::empty_output(k.sizes(), k.options());
  at::Tensor gv = cpu::empty_output(v.sizes(), v.options());
  if (pb.H == 0) return {gq, gk, gv};
  const int64_t* qo = pb.q_offsets.data_ptr<int64_t>();
  const int64_t* ko = pb.kv_offsets.data_ptr<int64_t>();
  const int64_t H = pb.H, Dh = pb.Dh;

  std::vector<Item> items;
  items.reserve(pb.B * H);
  for (int64_t b = 0; b < pb.B; ++b) {
    const int64_t n = qo[b + 1] - qo[b], m = ko[b + 1] - ko[b];
    const double keys =
        n == 0 ? 0.0 : causal ? 0.5 * (visible_keys(0, n, m, true) + visible_keys(n - 1, n, m, true)) : m;
    const double cost = static_cast<double>(n) * (keys + 8) + static_cast<double>(m) * 8;
    if (n <= kGroupHeadsMaxQueries) {
      items.push_back(Item{b, 0, H, 0, n, cost * static_cast<double>(H)});
    } else {
      for (int64_t h = 0; h < H; ++h) items.push_back(Item{b, h, h + 1, 0, n, cost});
    }
  }
  sort_items(items);
  const float* lse_p = lse.data_ptr<float>();

  if (q.scalar_type() == at::kDouble) {
    const double *gop = go.data_ptr<double>(), *qp = q.data_ptr<double>(), *kp = k.data_ptr<double>(),
                 *vp = v.data_ptr<double>(), *op = out.data_ptr<double>();
    double *gqp = gq.data_ptr<double>(), *gkp = gk.data_ptr<double>(), *gvp = gv.data_ptr<double>();
    run_items(items, with_scratch<PlainScratch<double>>([&](const Item& it, PlainScratch<double>&) {
                for (int64_t h = it.h0; h < it.h1; ++h) {
                  backward_double(gop, qp, kp, vp, op, lse_p, gqp, gkp, gvp, qo, ko, H, Dh, scale, causal, it, h);
                }
              }));
    return {gq, gk, gv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "jagged_attention_backward_cpu", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      const scalar_t *gop = go.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(),
                     *vp = v.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
      scalar_t *gqp = gq.data_ptr<scalar_t>(), *gkp = gk.data_ptr<scalar_t>(), *gvp = gv.data_ptr<scalar_t>();
      const float sc = static_cast<float>(scale);
      // A few long samples would leave threads idle: split their keys over several items, each with its
      // own partial grad_q (fp32, reduced below). grad_k/grad_v rows still have exactly one writer.
      const int64_t dq_floats = split_backward_items(items, qo, ko, Dh, num_threads());
      sort_items(items);
      std::vector<float> dq_partial(static_cast<size_t>(dq_floats));
      run_items(items, with_scratch<BwdScratch>([&](const Item& it, BwdScratch& s) {
                  if (it.q1 - it.q0 <= W) {
                    backward_item<scalar_t, 1>(gop, qp, kp, vp, op, lse_p, gqp, gkp, gvp, dq_partial.data(), qo, ko, H,
                                               Dh, sc, causal, it, s);
                  } else {
                    backward_item<scalar_t, 2>(gop, qp, kp, vp, op, lse_p, gqp, gkp, gvp, dq_partial.data(), qo, ko, H,
                                               Dh, sc, causal, it, s);
                  }
                }));
      if (dq_floats > 0) reduce_dq_partials(items, dq_partial.data(), gqp, qo, H, Dh, sc);
    }
  });
  return {gq, gk, gv};
}

}  // namespace
}  // namespace lattice

LATTICE_REGISTER_CPU_KERNELS(jagged_attention, m) {
  m.impl("jagged_attention", &lattice::jagged_attention_cpu);
  m.impl("jagged_attention_backward", &lattice::jagged_attention_backward_cpu);
}
