// Vectorized embedding-row primitives for the CPU kernels: load a row slice of fp32 / bf16 / fp16
// storage (or of uint8 codes) as fp32 lanes, store fp32 lanes back in the storage type, prefetch a whole row.
//
// Three implementations, one chosen at build time by what -march targets:
//   * AVX-512 (F + BW + VL): 16 fp32 lanes per __m512, masked tails, bf16/fp16 converted in registers;
//   * AVX2 + FMA + F16C (x86-64-v3, e.g. AMD Zen 2/3 and Intel client cores): 8 fp32 lanes per __m256,
//     tails through lane masks, bf16/fp16 converted in registers;
// both behind one interface (vec_t, tail_t, Vecs<NV, W>, kLanes) so each kernel is written once; and
//   * a portable one (plain loops), which also serves float64 storage (accumulated in float64) and is
//     selectable at run time with LATTICE_CPU_ISA=generic so tests cover it on SIMD machines too.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LATTICE_HAVE_AVX512 1
#define LATTICE_HAVE_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LATTICE_HAVE_AVX512 0
#define LATTICE_HAVE_AVX2 1
#include <immintrin.h>
#else
#define LATTICE_HAVE_AVX512 0
#define LATTICE_HAVE_AVX2 0
#endif
#define LATTICE_HAVE_SIMD (LATTICE_HAVE_AVX512 || LATTICE_HAVE_AVX2)

namespace lattice {
namespace cpu {

// Accumulation type: float64 storage accumulates in float64, everything else in fp32.
template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

// True when the SIMD (AVX-512 or AVX2) kernels are compiled in and not switched off with
// LATTICE_CPU_ISA=generic.
inline bool use_simd() {
#if LATTICE_HAVE_SIMD
  static const bool enabled = [] {
    const char* isa = std::getenv("LATTICE_CPU_ISA");
    return !(isa != nullptr && std::strcmp(isa, "generic") == 0);
  }();
  return enabled;
#else
  return false;
#endif
}

// Prefetch every cache line of `bytes` bytes starting at p (for write when kWrite).
template <bool kWrite = false>
inline void prefetch_bytes(const void* p, int64_t bytes) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes) - 1) & ~uintptr_t(63);
  for (uintptr_t line = first; line <= last; line += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(line), kWrite ? 1 : 0, 3);
  }
}

// Prefetch of the kLines cache lines from p on, unrolled: a line loop with a run-time count costs a few
// percent in a hot loop. kLocality is __builtin_prefetch's (3 = T0 into L1, 2 = T1 into L2).
template <int kLines, bool kWrite = false, int kLocality = 3>
inline void prefetch_lines(const void* p) {
  const char* c = static_cast<const char*>(p);
#pragma GCC unroll 16
  for (int l = 0; l < kLines; ++l) __builtin_prefetch(c + 64 * l, kWrite ? 1 : 0, kLocality);
}

// A row of `bytes` bytes and at most kLines cache lines: kLines lines from p cover a 64-byte aligned row;
// `ragged` (rows whose width is not a multiple of 64 bytes, or an unaligned table) adds the line holding the
// row's last byte.
template <int kLines, bool kWrite = false>
inline void prefetch_row_lines(const void* p, int64_t bytes, bool ragged) {
  prefetch_lines<kLines, kWrite>(p);
  if (ragged) __builtin_prefetch(static_cast<const char*>(p) + bytes - 1, kWrite ? 1 : 0, 3);
}

// ---- portable element conversion --------------------------------------------------------------
template <typename A, typename W>
inline A to_acc(W x) {
  return static_cast<A>(static_cast<float>(x));
}
template <>
inline double to_acc<double, double>(double x) {
  return x;
}
template <>
inline float to_acc<float, float>(float x) {
  return x;
}

template <typename W, typename A>
inline W from_acc(A x) {
  return static_cast<W>(x);
}

#if LATTICE_HAVE_AVX512
// ---- AVX-512: 16 fp32 lanes ---------------------------------------------------------------------
// Sum of the 16 lanes (shuffles within zmm: GCC's _mm512_reduce_add_ps trips -Wmaybe-uninitialized).
inline float hsum16(__m512 v) {
  __m512 t = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm512_add_ps(t, _mm512_permute_ps(t, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm512_cvtss_f32(t);
}

inline __mmask16 tail_mask(int64_t width) {  // lanes in use in the last vector of a `width`-wide slice
  const int rem = static_cast<int>(width & 15);
  return rem == 0 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1u);
}

template <bool kMasked>
inline __m512 load16(const float* p, __mmask16 m) {
  return kMasked ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}
template <bool kMasked>
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i x = kMasked ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
template <bool kMasked>
inline __m512 load16(const c10::Half* p, __mmask16 m) {
  const __m256i x = kMasked ? _mm256_maskz_loadu_epi16(m, p) : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_cvtph_ps(x);
}
// uint8 codes (int8 row-wise quantized tables) widened to fp32 lanes; the scale and bias are applied by the caller.
template <bool kMasked>
inline __m512 load16(const uint8_t* p, __mmask16 m) {
  const __m128i x = kMasked ? _mm_maskz_loadu_epi8(m, p) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x));
}

// fp32 -> bf16 with round-to-nearest-even (what c10::BFloat16(float) does); NaN stays NaN.
inline __m256i cvt_bf16(__m512 v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  __m512i r = _mm512_srli_epi32(rounded, 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}

template <bool kMasked>
inline void store16(float* p, __m512 v, __mmask16 m) {
  if (kMasked) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm512_storeu_ps(p, v);
  }
}
template <bool kMasked>
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  const __m256i x = cvt_bf16(v);
  if (kMasked) {
    _mm256_mask_storeu_epi16(p, m, x);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
}
template <bool kMasked>
inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  const __m256i x = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  if (kMasked) {
    _mm256_mask_storeu_epi16(p, m, x);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x);
  }
}

using vec_t = __m512;
using tail_t = __mmask16;
constexpr int kLanes = 16;
inline vec_t vzero() { return _mm512_setzero_ps(); }
inline vec_t vset1(float x) { return _mm512_set1_ps(x); }
inline vec_t vadd(vec_t a, vec_t b) { return _mm512_add_ps(a, b); }
inline vec_t vmul(vec_t a, vec_t b) { return _mm512_mul_ps(a, b); }
inline vec_t vfmadd(vec_t a, vec_t b, vec_t c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c
inline vec_t vfnmadd(vec_t a, vec_t b, vec_t c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline float vhsum(vec_t v) { return hsum16(v); }
template <bool kMasked, typename S>
inline vec_t vload(const S* p, const tail_t& m) {
  return load16<kMasked>(p, m);
}
template <bool kMasked, typename S>
inline void vstore(S* p, vec_t v, const tail_t& m) {
  store16<kMasked>(p, v, m);
}
#endif  // LATTICE_HAVE_AVX512

#if LATTICE_HAVE_AVX2
// ---- AVX2 + FMA + F16C: 8 fp32 lanes -------------------------------------------------------------
using vec_t = __m256;
// The last vector of a slice: a lane mask for fp32 (vmaskmov) and the lane count for 16-bit storage,
// which AVX2 cannot load or store under a mask (those go through a small stack buffer).
struct tail_t {
  __m256i mask;
  int lanes;
};
constexpr int kLanes = 8;

inline tail_t tail_mask(int64_t width) {  // lanes in use in the last vector of a `width`-wide slice
  const int rem = static_cast<int>(width & 7);
  const int lanes = rem == 0 ? 8 : rem;
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return tail_t{_mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), idx), lanes};
}

inline vec_t vzero() { return _mm256_setzero_ps(); }
inline vec_t vset1(float x) { return _mm256_set1_ps(x); }
inline vec_t vadd(vec_t a, vec_t b) { return _mm256_add_ps(a, b); }
inline vec_t vmul(vec_t a, vec_t b) { return _mm256_mul_ps(a, b); }
inline vec_t vfmadd(vec_t a, vec_t b, vec_t c) { return _mm256_fmadd_ps(a, b, c); }
inline vec_t vfnmadd(vec_t a, vec_t b, vec_t c) { return _mm256_fnmadd_ps(a, b, c); }
inline float vhsum(vec_t v) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  t = _mm_add_ss(t, _mm_movehdup_ps(t));
  return _mm_cvtss_f32(t);
}

// 8 x 16-bit values from p (the first `lanes` only when masked; the rest read as 0).
template <bool kMasked>
inline __m128i load8x16(const void* p, int lanes) {
  if (!kMasked || lanes == 8) return _mm_loadu_si128(static_cast<const __m128i*>(p));
  alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(buf, p, static_cast<size_t>(lanes) * 2);
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
}
template <bool kMasked>
inline void store8x16(void* p, __m128i x, int lanes) {
  if (!kMasked || lanes == 8) {
    _mm_storeu_si128(static_cast<__m128i*>(p), x);
    return;
  }
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), x);
  std::memcpy(p, buf, static_cast<size_t>(lanes) * 2);
}

// A full last vector takes the plain load/store: vmaskmovps is slow on some cores (AMD Zen).
template <bool kMasked>
inline vec_t vload(const float* p, const tail_t& m) {
  return kMasked && m.lanes != 8 ? _mm256_maskload_ps(p, m.mask) : _mm256_loadu_ps(p);
}
template <bool kMasked>
inline vec_t vload(const c10::BFloat16* p, const tail_t& m) {
  const __m256i x = _mm256_cvtepu16_epi32(load8x16<kMasked>(p, m.lanes));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
template <bool kMasked>
inline vec_t vload(const c10::Half* p, const tail_t& m) {
  return _mm256_cvtph_ps(load8x16<kMasked>(p, m.lanes));
}
// uint8 codes widened to fp32 lanes. The 8-byte load needs no mask: int8 rows pad their codes to a multiple of
// 8 bytes, so it never leaves the row (lanes past the row's width are dropped by the masked store).
template <bool kMasked>
inline vec_t vload(const uint8_t* p, const tail_t&) {
  const __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
}

// fp32 -> bf16 with round-to-nearest-even (what c10::BFloat16(float) does); NaN stays NaN.
inline __m128i cvt_bf16(vec_t v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  __m256i r = _mm256_srli_epi32(rounded, 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // every lane is < 2^16, so the unsigned saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <bool kMasked>
inline void vstore(float* p, vec_t v, const tail_t& m) {
  if (kMasked && m.lanes != 8) {
    _mm256_maskstore_ps(p, m.mask, v);
  } else {
    _mm256_storeu_ps(p, v);
  }
}
template <bool kMasked>
inline void vstore(c10::BFloat16* p, vec_t v, const tail_t& m) {
  store8x16<kMasked>(p, cvt_bf16(v), m.lanes);
}
template <bool kMasked>
inline void vstore(c10::Half* p, vec_t v, const tail_t& m) {
  store8x16<kMasked>(p, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), m.lanes);
}
#endif  // LATTICE_HAVE_AVX2

#if LATTICE_HAVE_SIMD
// Column blocks of at most 128 lanes, held in registers across a bag or segment (8 zmm with AVX-512;
// 16 ymm with AVX2, whose adds take the row straight from memory, so the sum still fits the 16
// registers).
constexpr int kMaxNV = 128 / kLanes;

// Vectors needed for a `width`-wide slice.
inline int num_vecs(int64_t width) { return static_cast<int>((width + kLanes - 1) / kLanes); }

// Cache lines of a row slice of NV vectors stored as S (the tail vector counted whole).
template <int NV, typename S>
constexpr int row_lines() {
  return static_cast<int>((NV * kLanes * sizeof(S) + 63) / 64);
}

// NV consecutive vectors of a row slice; the last one honours `tail`.
template <int NV, typename W>
struct Vecs {
  vec_t v[NV];

  inline void zero() {
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) v[i] = vzero();
  }
  template <typename S>
  inline void load(const S* p, const tail_t& tail) {
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) v[i] = vload<false>(p + kLanes * i, tail);
    v[NV - 1] = vload<true>(p + kLanes * (NV - 1), tail);
  }
  template <typename S>
  inline void add(const S* p, const tail_t& tail) {
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) v[i] = vadd(v[i], vload<false>(p + kLanes * i, tail));
    v[NV - 1] = vadd(v[NV - 1], vload<true>(p + kLanes * (NV - 1), tail));
  }
  template <typename S>
  inline void fmadd(vec_t s, const S* p, const tail_t& tail) {
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) v[i] = vfmadd(s, vload<false>(p + kLanes * i, tail), v[i]);
    v[NV - 1] = vfmadd(s, vload<true>(p + kLanes * (NV - 1), tail), v[NV - 1]);
  }
  inline void scale(vec_t s) {
#pragma GCC unroll 16
    for (int i = 0; i < NV; ++i) v[i] = vmul(v[i], s);
  }
  template <typename S>
  inline void store(S* p, const tail_t& tail) const {
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) vstore<false>(p + kLanes * i, v[i], tail);
    vstore<true>(p + kLanes * (NV - 1), v[NV - 1], tail);
  }
  // sum over lanes of v * v (masked tail lanes are zero)
  inline float sum_squares() const {
    vec_t s = vmul(v[0], v[0]);
#pragma GCC unroll 16
    for (int i = 1; i < NV; ++i) s = vfmadd(v[i], v[i], s);
    return vhsum(s);
  }
  // sum over lanes of v * other(p)
  template <typename S>
  inline float dot(const S* p, const tail_t& tail) const {
    vec_t s = vmul(v[NV - 1], vload<true>(p + kLanes * (NV - 1), tail));
#pragma GCC unroll 16
    for (int i = 0; i < NV - 1; ++i) s = vfmadd(v[i], vload<false>(p + kLanes * i, tail), s);
    return vhsum(s);
  }
};

// Calls f(std::integral_constant<int, NV>) for NV = nv in [1, kMaxNV) and NV = kMaxNV otherwise.
template <typename F, int... I>
inline void dispatch_nv_impl(int nv, F&& f, std::integer_sequence<int, I...>) {
  const int n = nv >= 1 && nv < kMaxNV ? nv : kMaxNV;
  (void)((n == I + 1 ? (f(std::integral_constant<int, I + 1>()), true) : false) || ...);
}
template <typename F>
inline void dispatch_nv(int nv, F&& f) {
  dispatch_nv_impl(nv, std::forward<F>(f), std::make_integer_sequence<int, kMaxNV>());
}
#endif  // LATTICE_HAVE_SIMD

// Widest column slice the SIMD kernels hold in registers (kMaxNV vectors).
constexpr int64_t kBlock = 128;

}  // namespace cpu
}  // namespace lattice
