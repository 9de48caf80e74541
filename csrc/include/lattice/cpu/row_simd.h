// Vectorized embedding-row primitives for the CPU kernels: load a row slice of fp32 / bf16 / fp16
// storage as fp32 lanes, store fp32 lanes back in the storage type, prefetch a whole row.
//
// Two implementations live side by side:
//   * AVX-512 (F + BW + VL, compiled in when the build targets it): 16 fp32 lanes per __m512, masked
//     tails, bf16/fp16 converted in registers;
//   * a portable one (plain loops the compiler vectorizes for whatever -march it builds for: AVX2 on
//     x86-64-v3), which also serves float64 storage (accumulated in float64) and is selectable at run
//     time with LATTICE_CPU_ISA=generic so tests cover it on AVX-512 machines too.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LATTICE_HAVE_AVX512 1
#include <immintrin.h>
#else
#define LATTICE_HAVE_AVX512 0
#endif

namespace lattice {
namespace cpu {

// Accumulation type: float64 storage accumulates in float64, everything else in fp32.
template <typename W>
using acc_t = std::conditional_t<std::is_same_v<W, double>, double, float>;

// True when the AVX-512 kernels are compiled in and not switched off with LATTICE_CPU_ISA=generic.
inline bool use_avx512() {
#if LATTICE_HAVE_AVX512
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

// NV consecutive 16-lane vectors of a row slice; the last one honours `tail`.
template <int NV, typename W>
struct Vecs {
  __m512 v[NV];

  inline void zero() {
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) v[i] = _mm512_setzero_ps();
  }
  template <typename S>
  inline void load(const S* p, __mmask16 tail) {
#pragma GCC unroll 8
    for (int i = 0; i < NV - 1; ++i) v[i] = load16<false>(p + 16 * i, tail);
    v[NV - 1] = load16<true>(p + 16 * (NV - 1), tail);
  }
  template <typename S>
  inline void add(const S* p, __mmask16 tail) {
#pragma GCC unroll 8
    for (int i = 0; i < NV - 1; ++i) v[i] = _mm512_add_ps(v[i], load16<false>(p + 16 * i, tail));
    v[NV - 1] = _mm512_add_ps(v[NV - 1], load16<true>(p + 16 * (NV - 1), tail));
  }
  template <typename S>
  inline void fmadd(__m512 s, const S* p, __mmask16 tail) {
#pragma GCC unroll 8
    for (int i = 0; i < NV - 1; ++i) v[i] = _mm512_fmadd_ps(s, load16<false>(p + 16 * i, tail), v[i]);
    v[NV - 1] = _mm512_fmadd_ps(s, load16<true>(p + 16 * (NV - 1), tail), v[NV - 1]);
  }
  inline void scale(__m512 s) {
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) v[i] = _mm512_mul_ps(v[i], s);
  }
  template <typename S>
  inline void store(S* p, __mmask16 tail) const {
#pragma GCC unroll 8
    for (int i = 0; i < NV - 1; ++i) store16<false>(p + 16 * i, v[i], tail);
    store16<true>(p + 16 * (NV - 1), v[NV - 1], tail);
  }
  // sum over lanes of v * v (masked tail lanes are zero)
  inline float sum_squares() const {
    __m512 s = _mm512_mul_ps(v[0], v[0]);
#pragma GCC unroll 8
    for (int i = 1; i < NV; ++i) s = _mm512_fmadd_ps(v[i], v[i], s);
    return hsum16(s);
  }
  // sum over lanes of v * other(p)
  template <typename S>
  inline float dot(const S* p, __mmask16 tail) const {
    __m512 s = _mm512_mul_ps(v[NV - 1], load16<true>(p + 16 * (NV - 1), tail));
#pragma GCC unroll 8
    for (int i = 0; i < NV - 1; ++i) s = _mm512_fmadd_ps(v[i], load16<false>(p + 16 * i, tail), s);
    return hsum16(s);
  }
};

// Calls f(std::integral_constant<int, NV>) for NV = nv in [1, 8].
template <typename F>
inline void dispatch_nv(int nv, F&& f) {
  switch (nv) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}
#endif  // LATTICE_HAVE_AVX512

// Column blocks of at most 128 lanes (8 AVX-512 vectors held in registers across a bag or segment).
constexpr int64_t kBlock = 128;

}  // namespace cpu
}  // namespace lattice
