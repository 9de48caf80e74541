// The warp matrix API (`nvcuda::wmma`, CUDA's <mma.h>) for the CPU execution emulator; included by the
// shadow include/mma.h. Follows the documented semantics strictly enough to catch code that works on one GPU
// by accident:
//  - fill_fragment, load_matrix_sync, store_matrix_sync and mma_sync are warp collectives over all 32 lanes:
//    every lane must call the same function at the same call site with the same pointer, ldm and layout
//    (a divergent or partial call is reported, like a bad *_sync mask);
//  - ldm must be a multiple of 16 bytes (8 half/bf16 elements, 4 floats) and at least the stored row (or
//    column) length, and the pointer 256-bit (32-byte) aligned;
//  - the mapping of matrix elements to (lane, fragment element) is opaque: the emulator uses a scrambled
//    permutation per fragment type, so code that assumes a layout (e.g. "lane l holds row l / 2") computes
//    wrong results, while element-wise code that treats every element alike (scaling, fill, conversion to
//    tf32) works;
//  - tf32 fragments hold floats; mma_sync uses only their top 19 bits (as the tensor cores do), so a kernel
//    that forgets wmma::__float_to_tf32 still gets tf32 precision, not silently fp32.
// mma_sync exchanges the lanes' fragments through a per-warp area (write, rendezvous, compute own elements,
// rendezvous), so the fibers of a warp may run it in any order. Accumulation is fp32 in k order.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

// Round to nearest, ties away from zero, keeping 10 mantissa bits (cvt.rna.tf32.f32).
inline float __float_to_tf32(float x) {
  uint32_t u = lattice_emu::f2u(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return lattice_emu::u2f(u);
}

namespace detail {

template <typename T>
struct storage { using type = T; };
template <>
struct storage<precision::tf32> { using type = float; };

template <typename T>
inline float to_float(T v) { return static_cast<float>(v); }

// What the tensor cores read of an element: tf32 keeps the top 19 bits of the float.
template <typename T>
inline float mma_input(typename storage<T>::type v) {
  if constexpr (std::is_same<T, precision::tf32>::value) {
    return lattice_emu::u2f(lattice_emu::f2u(v) & 0xffffe000u);
  } else {
    return static_cast<float>(v);
  }
}

template <typename T> constexpr int type_id() { return 0; }
template <> constexpr int type_id<__half>() { return 1; }
template <> constexpr int type_id<__nv_bfloat16>() { return 2; }
template <> constexpr int type_id<precision::tf32>() { return 3; }
template <> constexpr int type_id<float>() { return 4; }
template <typename U> constexpr int use_id() { return std::is_same<U, matrix_a>::value ? 1 : std::is_same<U, matrix_b>::value ? 2 : 3; }
template <typename L> constexpr int layout_id() { return std::is_same<L, row_major>::value ? 1 : std::is_same<L, col_major>::value ? 2 : 0; }

// A fixed pseudo-random permutation of [0, n) per fragment type: entry lane * per_lane + i is the
// row-major index of the matrix element that lane `lane` holds in x[i].
template <int N>
inline std::array<int, N> scrambled(uint64_t seed) {
  std::array<int, N> p{};
  for (int i = 0; i < N; ++i) p[i] = i;
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  for (int i = N - 1; i > 0; --i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const int j = static_cast<int>(s % static_cast<uint64_t>(i + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

inline unsigned warp_index() {
  return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) / 32u;
}

// Rendezvous of all 32 lanes in `op`; `signature` (pointer, ldm, layout, ...) and the call site must agree.
inline void rendezvous(int op, uint64_t signature, const char* file, int line) {
  uint64_t h = signature;
  for (const char* c = file; *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 0x100000001b3ull;
  lattice_emu::warp_collective(op, 0xffffffffu, h, line, 32, nullptr);
}

inline uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull; }

// Exchange area of mma_sync: A, B and C of one warp as floats (at most 16 x 16 each).
inline float* warp_exchange(unsigned warp) {
  static float area[32][3 * 256];
  return area[warp];
}

template <typename E>
inline void check_ldm_and_pointer(const char* fn, const void* p, unsigned ldm, unsigned min_ldm) {
  if ((ldm * sizeof(E)) % 16 != 0) {
    lattice_emu::misuse(std::string("wmma::") + fn + ": ldm = " + std::to_string(ldm) + " is not a multiple of " +
                        std::to_string(16 / sizeof(E)) + " elements (16 bytes)");
  }
  if (ldm < min_ldm) {
    lattice_emu::misuse(std::string("wmma::") + fn + ": ldm = " + std::to_string(ldm) +
                        " is smaller than the stored row length " + std::to_string(min_ldm));
  }
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%p", p);
    lattice_emu::misuse(std::string("wmma::") + fn + ": pointer " + buf + " is not 256-bit (32-byte) aligned");
  }
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && (K == 16 || K == 8), "the emulator implements the m16n16k16 and m16n16k8 shapes");

 public:
  // Only what CUDA's fragment has: element_type, num_elements, x[].
  using element_type = typename detail::storage<T>::type;
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols / 32;
  element_type x[num_elements];

  // Row-major index (row * cols + col) of the element that `lane` holds in x[i].
  static int element(unsigned lane, int i) {
    static const std::array<int, rows * cols> perm = detail::scrambled<rows * cols>(
        detail::use_id<Use>() * 1000003ull + detail::type_id<T>() * 1009ull + detail::layout_id<Layout>() * 31ull + K);
    return perm[lane * num_elements + i];
  }
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  const E e = static_cast<E>(v);
  uint64_t bits = 0;
  std::memcpy(&bits, &e, sizeof(E));
  detail::rendezvous(lattice_emu::kWmmaFill, bits, file, line);
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = e;
}

// matrix_a / matrix_b: the layout is part of the fragment type.
template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load takes a layout_t argument");
  static_assert(std::is_same<P, typename F::element_type>::value, "load_matrix_sync: pointer type != element type");
  constexpr bool row = std::is_same<L, row_major>::value;
  detail::check_ldm_and_pointer<P>("load_matrix_sync", p, ldm, row ? F::cols : F::rows);
  detail::rendezvous(lattice_emu::kWmmaLoad,
                     detail::mix(detail::mix(reinterpret_cast<uintptr_t>(p), ldm), detail::use_id<Use>()), file, line);
  const unsigned lane = lattice_emu::lane_id();
  for (int i = 0; i < F::num_elements; ++i) {
    const int e = F::element(lane, i);
    const int r = e / F::cols, c = e % F::cols;
    f.x[i] = p[row ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r];
  }
}

template <int M, int N, int K, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float, void>& f, const P* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using F = fragment<accumulator, M, N, K, float, void>;
  static_assert(std::is_same<P, float>::value, "the emulator implements float accumulators");
  const bool row = layout == mem_row_major;
  detail::check_ldm_and_pointer<P>("load_matrix_sync", p, ldm, row ? F::cols : F::rows);
  detail::rendezvous(lattice_emu::kWmmaLoad, detail::mix(detail::mix(reinterpret_cast<uintptr_t>(p), ldm), 16 + layout),
                     file, line);
  const unsigned lane = lattice_emu::lane_id();
  for (int i = 0; i < F::num_elements; ++i) {
    const int e = F::element(lane, i);
    const int r = e / F::cols, c = e % F::cols;
    f.x[i] = p[row ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r];
  }
}

template <int M, int N, int K, typename P>
inline void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, float, void>& f, unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using F = fragment<accumulator, M, N, K, float, void>;
  static_assert(std::is_same<P, float>::value, "the emulator implements float accumulators");
  const bool row = layout == mem_row_major;
  detail::check_ldm_and_pointer<P>("store_matrix_sync", p, ldm, row ? F::cols : F::rows);
  detail::rendezvous(lattice_emu::kWmmaStore, detail::mix(detail::mix(reinterpret_cast<uintptr_t>(p), ldm), 16 + layout),
                     file, line);
  const unsigned lane = lattice_emu::lane_id();
  for (int i = 0; i < F::num_elements; ++i) {
    const int e = F::element(lane, i);
    const int r = e / F::cols, c = e % F::cols;
    p[row ? static_cast<size_t>(r) * ldm + c : static_cast<size_t>(c) * ldm + r] = f.x[i];
  }
}

// D = A B + C, fp32 accumulation. d may be c.
template <int M, int N, int K, typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float, void>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float, void>& c,
                     bool satf = false, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using FA = fragment<matrix_a, M, N, K, T, LA>;
  using FB = fragment<matrix_b, M, N, K, T, LB>;
  using FC = fragment<accumulator, M, N, K, float, void>;
  if (satf) lattice_emu::misuse("wmma::mma_sync: satf = true is not emulated");
  const unsigned lane = lattice_emu::lane_id();
  float* xa = detail::warp_exchange(detail::warp_index());
  float* xb = xa + 256;
  float* xc = xb + 256;
  for (int i = 0; i < FA::num_elements; ++i) xa[FA::element(lane, i)] = detail::mma_input<T>(a.x[i]);
  for (int i = 0; i < FB::num_elements; ++i) xb[FB::element(lane, i)] = detail::mma_input<T>(b.x[i]);
  for (int i = 0; i < FC::num_elements; ++i) xc[FC::element(lane, i)] = c.x[i];
  detail::rendezvous(lattice_emu::kWmmaMma, detail::type_id<T>(), file, line);
  float out[FC::num_elements];
  for (int i = 0; i < FC::num_elements; ++i) {
    const int e = FC::element(lane, i);
    const int r = e / N, col = e % N;
    float s = xc[e];
    for (int kk = 0; kk < K; ++kk) s = std::fma(xa[r * K + kk], xb[kk * N + col], s);
    out[i] = s;
  }
  // Nobody refills the exchange area (a next mma_sync) before every lane has read it.
  detail::rendezvous(lattice_emu::kWmmaMma, detail::type_id<T>(), file, line);
  for (int i = 0; i < FC::num_elements; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
