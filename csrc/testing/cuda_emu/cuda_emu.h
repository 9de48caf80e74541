// CUDA execution-model emulator: compiles lattice's CUDA kernels (csrc/cuda/*.cuh, *.cu) as host C++ and
// runs them on the CPU, for tests on machines without a GPU. See README.md in this folder.
//
// This header is force-included (`-include cuda_emu.h`) when a .cu/.cuh file is compiled as C++ with
// -DLATTICE_CUDA_EMULATION; the shadow headers in include/ (cuda_runtime.h, cuda_fp16.h, ...) include it too.
// It provides the CUDA keywords, built-in variables, vector and half types, math intrinsics, atomics, warp
// collectives, __syncthreads(), a small runtime API (cudaMalloc, cudaMemcpyAsync, ...) and
// lattice::cuda::launch(), with the same signature as csrc/include/lattice/cuda/launch.cuh.
//
// Execution model (implemented in cuda_emu.cpp): blocks run one at a time; each thread of a block is a fiber
// (its own stack, guard page below) scheduled cooperatively on one OS thread. A fiber runs until it reaches a
// synchronization point (__syncthreads, a warp collective, __nanosleep) and the scheduler then picks the next
// runnable fiber in a configurable order (forward, reverse, seeded random), so different schedules expose
// races. Device memory is guarded host memory (PROT_NONE pages around each allocation plus canary bytes).
#pragma once

#ifndef LATTICE_CUDA_EMULATION
#define LATTICE_CUDA_EMULATION 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <math.h>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------
// Keywords
// ---------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
// Blocks run one at a time on one OS thread, so a function-local static IS per-block shared storage.
// (It is not re-poisoned between blocks: prefer dynamic shared memory, lattice::cuda::dynamic_shared<T>(),
// which is guarded and poisoned per block. Static arrays get bounds-checked indexing via -fsanitize=bounds.)
#define __shared__ static
#define __constant__ static
#define __managed__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

// ---------------------------------------------------------------------------------------------------------
// Vector types (CUDA's layout and alignment)
// ---------------------------------------------------------------------------------------------------------
#define LATTICE_EMU_VEC1(T, N, A) \
  struct __attribute__((aligned(A))) N##1 { T x; };
#define LATTICE_EMU_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N##2 { T x, y; };
#define LATTICE_EMU_VEC3(T, N) \
  struct N##3 { T x, y, z; };
#define LATTICE_EMU_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N##4 { T x, y, z, w; };
#define LATTICE_EMU_VECS(T, N, A1, A2, A4)                                                       \
  LATTICE_EMU_VEC1(T, N, A1) LATTICE_EMU_VEC2(T, N, A2) LATTICE_EMU_VEC3(T, N)                   \
  LATTICE_EMU_VEC4(T, N, A4)                                                                     \
  inline N##1 make_##N##1(T x) { return N##1{x}; }                                               \
  inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }                                       \
  inline N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }                               \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }

LATTICE_EMU_VECS(signed char, char, 1, 2, 4)
LATTICE_EMU_VECS(unsigned char, uchar, 1, 2, 4)
LATTICE_EMU_VECS(short, short, 2, 4, 8)
LATTICE_EMU_VECS(unsigned short, ushort, 2, 4, 8)
LATTICE_EMU_VECS(int, int, 4, 8, 16)
LATTICE_EMU_VECS(unsigned int, uint, 4, 8, 16)
LATTICE_EMU_VECS(long long, longlong, 8, 16, 32)
LATTICE_EMU_VECS(unsigned long long, ulonglong, 8, 16, 32)
LATTICE_EMU_VECS(float, float, 4, 8, 16)
LATTICE_EMU_VECS(double, double, 8, 16, 32)
#undef LATTICE_EMU_VEC1
#undef LATTICE_EMU_VEC2
#undef LATTICE_EMU_VEC3
#undef LATTICE_EMU_VEC4
#undef LATTICE_EMU_VECS

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// Built-in variables: the scheduler rewrites them before resuming each fiber. Kernel code only reads them
// and every switch happens inside an out-of-line call, so the compiler reloads them after each one.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------------------
// Half precision types (IEEE binary16 and bfloat16), round-to-nearest-even conversions
// ---------------------------------------------------------------------------------------------------------
namespace lattice_emu {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline unsigned short float_to_half_bits(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) return static_cast<unsigned short>(sign | (absx > 0x7f800000u ? 0x7fffu : 0x7c00u));
  if (absx >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (absx < 0x38800000u) {  // subnormal half (or zero): value = m * 2^-24
    if (absx < 0x33000000u) return static_cast<unsigned short>(sign);  // < 2^-25: rounds to 0
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24 bits dropped from the 24-bit significand
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<unsigned short>(sign | r);
  }
  uint32_t r = ((absx >> 13) - (112u << 10));  // rebias exponent 127 -> 15
  const uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<unsigned short>(sign | r);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);
    return sign ? -v : v;
  }
  if (e == 31) return u2f(sign | 0x7f800000u | (m << 13));
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short float_to_bf16_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN (CUDA returns the canonical 0x7fff)
  const uint32_t lsb = (x >> 16) & 1u;
  return static_cast<unsigned short>((x + 0x7fffu + lsb) >> 16);
}
inline float bf16_bits_to_float(unsigned short b) { return u2f(static_cast<uint32_t>(b) << 16); }
}  // namespace lattice_emu

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

struct __attribute__((aligned(2))) __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(lattice_emu::float_to_half_bits(f)) {}
  __half(double f) : __x(lattice_emu::float_to_half_bits(static_cast<float>(f))) {}
  __half(int i) : __x(lattice_emu::float_to_half_bits(static_cast<float>(i))) {}
  __half(long long i) : __x(lattice_emu::float_to_half_bits(static_cast<float>(i))) {}
  __half(unsigned int i) : __x(lattice_emu::float_to_half_bits(static_cast<float>(i))) {}
  operator float() const { return lattice_emu::half_bits_to_float(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct __attribute__((aligned(2))) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(lattice_emu::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(lattice_emu::float_to_bf16_bits(static_cast<float>(f))) {}
  __nv_bfloat16(int i) : __x(lattice_emu::float_to_bf16_bits(static_cast<float>(i))) {}
  __nv_bfloat16(long long i) : __x(lattice_emu::float_to_bf16_bits(static_cast<float>(i))) {}
  __nv_bfloat16(unsigned int i) : __x(lattice_emu::float_to_bf16_bits(static_cast<float>(i))) {}
  operator float() const { return lattice_emu::bf16_bits_to_float(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __half2{__half(v.x), __half(v.y)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__half(a), __half(a)}; }
inline float2 __half22float2(__half2 h) { return float2{static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return static_cast<float>(h.x); }
inline float __high2float(__half2 h) { return static_cast<float>(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __nv_bfloat162{__nv_bfloat16(v.x), __nv_bfloat16(v.y)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{static_cast<float>(h.x), static_cast<float>(h.y)}; }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return static_cast<float>(h.x); }
inline float __high2float(__nv_bfloat162 h) { return static_cast<float>(h.y); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return static_cast<short>(h.__x); }

#define LATTICE_EMU_HALF_OPS(H)                                                                   \
  inline H operator+(H a, H b) { return H(static_cast<float>(a) + static_cast<float>(b)); }      \
  inline H operator-(H a, H b) { return H(static_cast<float>(a) - static_cast<float>(b)); }      \
  inline H operator*(H a, H b) { return H(static_cast<float>(a) * static_cast<float>(b)); }      \
  inline H operator/(H a, H b) { return H(static_cast<float>(a) / static_cast<float>(b)); }      \
  inline H operator-(H a) { H r = a; r.__x ^= 0x8000u; return r; }                                 \
  inline H& operator+=(H& a, H b) { return a = a + b; }                                            \
  inline H& operator-=(H& a, H b) { return a = a - b; }                                            \
  inline H& operator*=(H& a, H b) { return a = a * b; }                                            \
  inline H& operator/=(H& a, H b) { return a = a / b; }                                            \
  inline bool operator==(H a, H b) { return static_cast<float>(a) == static_cast<float>(b); }     \
  inline bool operator!=(H a, H b) { return static_cast<float>(a) != static_cast<float>(b); }     \
  inline bool operator<(H a, H b) { return static_cast<float>(a) < static_cast<float>(b); }       \
  inline bool operator>(H a, H b) { return static_cast<float>(a) > static_cast<float>(b); }       \
  inline bool operator<=(H a, H b) { return static_cast<float>(a) <= static_cast<float>(b); }     \
  inline bool operator>=(H a, H b) { return static_cast<float>(a) >= static_cast<float>(b); }     \
  inline H __hadd(H a, H b) { return a + b; }                                                      \
  inline H __hsub(H a, H b) { return a - b; }                                                      \
  inline H __hmul(H a, H b) { return a * b; }                                                      \
  inline H __hdiv(H a, H b) { return a / b; }                                                      \
  inline H __hneg(H a) { return -a; }                                                              \
  inline H __habs(H a) { H r = a; r.__x &= 0x7fffu; return r; }                                    \
  inline H __hfma(H a, H b, H c) {                                                                 \
    return H(static_cast<float>(static_cast<double>(a) * static_cast<double>(b) + static_cast<double>(c))); \
  }                                                                                                \
  inline H __hmax(H a, H b) { return H(std::fmax(static_cast<float>(a), static_cast<float>(b))); } \
  inline H __hmin(H a, H b) { return H(std::fmin(static_cast<float>(a), static_cast<float>(b))); } \
  inline bool __hisnan(H a) { return std::isnan(static_cast<float>(a)); }                         \
  inline bool __heq(H a, H b) { return a == b; }                                                   \
  inline bool __hlt(H a, H b) { return a < b; }                                                    \
  inline bool __hgt(H a, H b) { return a > b; }
LATTICE_EMU_HALF_OPS(__half)
LATTICE_EMU_HALF_OPS(__nv_bfloat16)
#undef LATTICE_EMU_HALF_OPS
#define LATTICE_EMU_HALF2_OPS(H2, H)                                                               \
  inline H2 __hadd2(H2 a, H2 b) { return H2{a.x + b.x, a.y + b.y}; }                                \
  inline H2 __hsub2(H2 a, H2 b) { return H2{a.x - b.x, a.y - b.y}; }                                \
  inline H2 __hmul2(H2 a, H2 b) { return H2{a.x * b.x, a.y * b.y}; }                                \
  inline H2 __h2div(H2 a, H2 b) { return H2{a.x / b.x, a.y / b.y}; }                                \
  inline H2 __hfma2(H2 a, H2 b, H2 c) { return H2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; } \
  inline H2 __hmax2(H2 a, H2 b) { return H2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                  \
  inline H2 __hmin2(H2 a, H2 b) { return H2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }                  \
  inline H2 operator+(H2 a, H2 b) { return __hadd2(a, b); }                                         \
  inline H2 operator-(H2 a, H2 b) { return __hsub2(a, b); }                                         \
  inline H2 operator*(H2 a, H2 b) { return __hmul2(a, b); }
LATTICE_EMU_HALF2_OPS(__half2, __half)
LATTICE_EMU_HALF2_OPS(__nv_bfloat162, __nv_bfloat16)
#undef LATTICE_EMU_HALF2_OPS

// ---------------------------------------------------------------------------------------------------------
// Math and bit intrinsics (device-only names; the C library covers expf, logf, fmaxf, ...)
// ---------------------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return std::fma(x, y, z); }
inline double __fma_rn(double x, double y, double z) { return std::fma(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline float __saturatef(float x) { return x != x ? 0.0f : std::fmin(std::fmax(x, 0.0f), 1.0f); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned __float2uint_rn(float x) { return static_cast<unsigned>(std::nearbyint(x)); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline long long __double_as_longlong(double x) { long long i; std::memcpy(&i, &x, 8); return i; }
inline double __longlong_as_double(long long i) { double x; std::memcpy(&x, &i, 8); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned>(x))) << 32) | __brev(static_cast<unsigned>(x >> 32));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (s & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (s & 31u));
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return static_cast<long long>((static_cast<__int128>(a) * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __hadd(int a, int b) { return static_cast<int>((static_cast<long long>(a) + b) >> 1); }
inline int __rhadd(int a, int b) { return static_cast<int>((static_cast<long long>(a) + b + 1) >> 1); }

// CUDA's device min/max overloads (the host has none in the global namespace).
#define LATTICE_EMU_MINMAX(A, B, R)                                                   \
  inline R min(A a, B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); } \
  inline R max(A a, B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b); }
LATTICE_EMU_MINMAX(int, int, int)
LATTICE_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
LATTICE_EMU_MINMAX(int, unsigned int, unsigned int)
LATTICE_EMU_MINMAX(unsigned int, int, unsigned int)
LATTICE_EMU_MINMAX(long, long, long)
LATTICE_EMU_MINMAX(unsigned long, unsigned long, unsigned long)
LATTICE_EMU_MINMAX(long, unsigned long, unsigned long)
LATTICE_EMU_MINMAX(unsigned long, long, unsigned long)
LATTICE_EMU_MINMAX(long long, long long, long long)
LATTICE_EMU_MINMAX(unsigned long long, unsigned long long, unsigned long long)
LATTICE_EMU_MINMAX(long long, unsigned long long, unsigned long long)
LATTICE_EMU_MINMAX(unsigned long long, long long, unsigned long long)
#undef LATTICE_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin(static_cast<double>(a), b); }
inline double max(float a, double b) { return std::fmax(static_cast<double>(a), b); }
inline double min(double a, float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(double a, float b) { return std::fmax(a, static_cast<double>(b)); }

// ---------------------------------------------------------------------------------------------------------
// Scheduler entry points (cuda_emu.cpp). Every call that may switch fibers is out of line.
// ---------------------------------------------------------------------------------------------------------
namespace lattice_emu {

enum WarpOp : int {
  kShflIdx = 0, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kUni, kMatchAny, kMatchAll,
  kReduceAddU, kReduceAddI, kReduceMinU, kReduceMinI, kReduceMaxU, kReduceMaxI, kReduceAnd, kReduceOr,
  kReduceXor, kSyncWarp, kWmmaFill, kWmmaLoad, kWmmaStore, kWmmaMma, kNumWarpOps
};
// The nvcuda::wmma collectives (wmma_emu.h) pass a signature (pointer, ldm, layout, call site) as `value`
// and the call's line as `arg`; every lane of the warp must agree on both.

// A warp collective among the lanes named by `mask` (which must include the calling lane and match the
// other participants' masks exactly). Returns the op's result; for kMatchAll *pred receives the predicate.
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int arg, int width, int* pred);
// __syncthreads() and its reducing variants (kind: 0 plain, 1 count, 2 and, 3 or).
int block_barrier(int kind, int predicate);
unsigned active_mask();
void yield_thread();  // __nanosleep and friends: let other threads run
[[noreturn]] void trap(const char* what);
// Reports a misuse of a device API (e.g. a wmma pointer that is not 32-byte aligned) with kernel and thread.
[[noreturn]] void misuse(const std::string& what);
unsigned lane_id();
long long clock_ticks();
void* dynamic_shared_base();
size_t dynamic_shared_size();

// Raw bits of a value of 1, 2, 4 or 8 bytes, for the collectives.
template <typename T>
inline uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "warp collectives take <= 8-byte values");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace lattice_emu

// ---------------------------------------------------------------------------------------------------------
// Synchronization, warp shuffles and votes
// ---------------------------------------------------------------------------------------------------------
#define __syncthreads() ((void)::lattice_emu::block_barrier(0, 0))
inline int __syncthreads_count(int p) { return lattice_emu::block_barrier(1, p != 0); }
inline int __syncthreads_and(int p) { return lattice_emu::block_barrier(2, p != 0); }
inline int __syncthreads_or(int p) { return lattice_emu::block_barrier(3, p != 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  lattice_emu::warp_collective(lattice_emu::kSyncWarp, mask, 0, 0, 32, nullptr);
}
inline void __threadfence() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __nanosleep(unsigned) { lattice_emu::yield_thread(); }
inline unsigned __activemask() { return lattice_emu::active_mask(); }
inline long long clock64() { return lattice_emu::clock_ticks(); }
[[noreturn]] inline void __trap() { lattice_emu::trap("__trap()"); }
[[noreturn]] inline void __brkpt() { lattice_emu::trap("__brkpt()"); }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return lattice_emu::from_bits<T>(
      lattice_emu::warp_collective(lattice_emu::kShflIdx, mask, lattice_emu::to_bits(var), src_lane, width, nullptr));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return lattice_emu::from_bits<T>(lattice_emu::warp_collective(lattice_emu::kShflUp, mask, lattice_emu::to_bits(var),
                                                               static_cast<int>(delta), width, nullptr));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return lattice_emu::from_bits<T>(lattice_emu::warp_collective(lattice_emu::kShflDown, mask,
                                                               lattice_emu::to_bits(var), static_cast<int>(delta),
                                                               width, nullptr));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return lattice_emu::from_bits<T>(
      lattice_emu::warp_collective(lattice_emu::kShflXor, mask, lattice_emu::to_bits(var), lane_mask, width, nullptr));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kBallot, mask, pred != 0, 0, 32, nullptr));
}
inline int __any_sync(unsigned mask, int pred) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kAny, mask, pred != 0, 0, 32, nullptr));
}
inline int __all_sync(unsigned mask, int pred) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kAll, mask, pred != 0, 0, 32, nullptr));
}
inline int __uni_sync(unsigned mask, int pred) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kUni, mask, pred != 0, 0, 32, nullptr));
}
template <typename T>
inline unsigned __match_any_sync(unsigned mask, T value) {
  return static_cast<unsigned>(
      lattice_emu::warp_collective(lattice_emu::kMatchAny, mask, lattice_emu::to_bits(value), 0, 32, nullptr));
}
template <typename T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred) {
  return static_cast<unsigned>(
      lattice_emu::warp_collective(lattice_emu::kMatchAll, mask, lattice_emu::to_bits(value), 0, 32, pred));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceAddU, mask, v, 0, 32, nullptr));
}
inline int __reduce_add_sync(unsigned mask, int v) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kReduceAddI, mask, static_cast<uint32_t>(v), 0, 32, nullptr));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceMinU, mask, v, 0, 32, nullptr));
}
inline int __reduce_min_sync(unsigned mask, int v) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kReduceMinI, mask, static_cast<uint32_t>(v), 0, 32, nullptr));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceMaxU, mask, v, 0, 32, nullptr));
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return static_cast<int>(lattice_emu::warp_collective(lattice_emu::kReduceMaxI, mask, static_cast<uint32_t>(v), 0, 32, nullptr));
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceAnd, mask, v, 0, 32, nullptr));
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceOr, mask, v, 0, 32, nullptr));
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v) {
  return static_cast<unsigned>(lattice_emu::warp_collective(lattice_emu::kReduceXor, mask, v, 0, 32, nullptr));
}

// ---------------------------------------------------------------------------------------------------------
// Loads with cache hints, atomics (fibers never switch inside them, so plain read-modify-write is atomic)
// ---------------------------------------------------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

#define LATTICE_EMU_ATOMIC(NAME, T, EXPR)           \
  inline T NAME(T* address, T val) {                \
    const T old = *address;                         \
    *address = (EXPR);                              \
    return old;                                     \
  }
LATTICE_EMU_ATOMIC(atomicAdd, int, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, unsigned int, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, unsigned long long int, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, float, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, double, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, __half, old + val)
LATTICE_EMU_ATOMIC(atomicAdd, __nv_bfloat16, old + val)
LATTICE_EMU_ATOMIC(atomicSub, int, old - val)
LATTICE_EMU_ATOMIC(atomicSub, unsigned int, old - val)
LATTICE_EMU_ATOMIC(atomicExch, int, val)
LATTICE_EMU_ATOMIC(atomicExch, unsigned int, val)
LATTICE_EMU_ATOMIC(atomicExch, unsigned long long int, val)
LATTICE_EMU_ATOMIC(atomicExch, float, val)
LATTICE_EMU_ATOMIC(atomicMin, int, val < old ? val : old)
LATTICE_EMU_ATOMIC(atomicMin, unsigned int, val < old ? val : old)
LATTICE_EMU_ATOMIC(atomicMin, long long, val < old ? val : old)
LATTICE_EMU_ATOMIC(atomicMin, unsigned long long, val < old ? val : old)
LATTICE_EMU_ATOMIC(atomicMax, int, val > old ? val : old)
LATTICE_EMU_ATOMIC(atomicMax, unsigned int, val > old ? val : old)
LATTICE_EMU_ATOMIC(atomicMax, long long, val > old ? val : old)
LATTICE_EMU_ATOMIC(atomicMax, unsigned long long, val > old ? val : old)
LATTICE_EMU_ATOMIC(atomicAnd, int, old & val)
LATTICE_EMU_ATOMIC(atomicAnd, unsigned int, old & val)
LATTICE_EMU_ATOMIC(atomicAnd, long long, old & val)
LATTICE_EMU_ATOMIC(atomicAnd, unsigned long long, old & val)
LATTICE_EMU_ATOMIC(atomicOr, int, old | val)
LATTICE_EMU_ATOMIC(atomicOr, unsigned int, old | val)
LATTICE_EMU_ATOMIC(atomicOr, long long, old | val)
LATTICE_EMU_ATOMIC(atomicOr, unsigned long long, old | val)
LATTICE_EMU_ATOMIC(atomicXor, int, old ^ val)
LATTICE_EMU_ATOMIC(atomicXor, unsigned int, old ^ val)
LATTICE_EMU_ATOMIC(atomicXor, long long, old ^ val)
LATTICE_EMU_ATOMIC(atomicXor, unsigned long long, old ^ val)
LATTICE_EMU_ATOMIC(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
LATTICE_EMU_ATOMIC(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef LATTICE_EMU_ATOMIC
#define LATTICE_EMU_CAS(T)                                   \
  inline T atomicCAS(T* address, T compare, T val) {         \
    const T old = *address;                                  \
    if (old == compare) *address = val;                      \
    return old;                                              \
  }
LATTICE_EMU_CAS(int)
LATTICE_EMU_CAS(unsigned int)
LATTICE_EMU_CAS(unsigned long long int)
LATTICE_EMU_CAS(unsigned short int)
#undef LATTICE_EMU_CAS

// ---------------------------------------------------------------------------------------------------------
// Runtime API subset
// ---------------------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
enum cudaMemcpyKind : int {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

cudaError_t cudaMalloc(void** ptr, size_t bytes);
template <typename T>
inline cudaError_t cudaMalloc(T** ptr, size_t bytes) { return cudaMalloc(reinterpret_cast<void**>(ptr), bytes); }
cudaError_t cudaFree(void* ptr);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream = nullptr);
cudaError_t cudaMemset(void* dst, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaFuncSetAttribute_impl(const void* func, cudaFuncAttribute attr, int value);
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute_impl(reinterpret_cast<const void*>(func), attr, value);
}

// ---------------------------------------------------------------------------------------------------------
// Launch
// ---------------------------------------------------------------------------------------------------------
namespace lattice_emu {

// Guarded "device" memory: PROT_NONE pages around each allocation, canary-filled slack, contents poisoned
// (0xff bytes: NaN for floats, -1 for integers) so reads of never-written memory show up.
void* device_malloc(size_t bytes, const char* label);
void device_free(void* ptr);
// Throws unless [p, p+bytes) lies inside one live device allocation.
void check_device_range(const void* p, size_t bytes, const char* what);
// Checks a pointer kernel argument (null, or inside / one past the end of a live device allocation).
void check_pointer_argument(const void* kernel, int index, const void* p);

using Body = void (*)(void* ctx);
// Runs `body(ctx)` as every thread of every block of the grid; throws std::runtime_error on any error
// (out-of-bounds access, barrier or warp-mask misuse, deadlock, trap, timeout), naming kernel and thread.
void run_kernel(const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, Body body, void* ctx);

template <typename Kernel, typename Tuple>
struct LaunchCtx {
  Kernel kernel;
  Tuple* args;
};
template <typename Kernel, typename Tuple>
void launch_thunk(void* c) {
  auto* ctx = static_cast<LaunchCtx<Kernel, Tuple>*>(c);
  std::apply(ctx->kernel, *ctx->args);  // by-value kernel parameters: every thread gets its own copy
}
template <typename Tuple, size_t... I>
void check_pointer_arguments(const void* kernel, const Tuple& t, std::index_sequence<I...>) {
  (void)kernel;
  (void)t;
  (
      [&] {
        using E = std::tuple_element_t<I, Tuple>;
        if constexpr (std::is_pointer<E>::value) {
          check_pointer_argument(kernel, static_cast<int>(I), reinterpret_cast<const void*>(std::get<I>(t)));
        }
      }(),
      ...);
}
}  // namespace lattice_emu

namespace lattice {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lattice CUDA error in ") + what + ": " + cudaGetErrorString(err));
  }
}

template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  static_assert(sizeof...(KernelArgs) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  (void)stream;  // the emulator is synchronous: every stream is the null stream
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  using Tuple = std::tuple<std::decay_t<KernelArgs>...>;
  Tuple packed(std::forward<Args>(args)...);
  const void* key = reinterpret_cast<const void*>(kernel);
  lattice_emu::check_pointer_arguments(key, packed, std::index_sequence_for<KernelArgs...>{});
  lattice_emu::LaunchCtx<decltype(kernel), Tuple> ctx{kernel, &packed};
  lattice_emu::run_kernel(key, grid, block, shared_bytes, &lattice_emu::launch_thunk<decltype(kernel), Tuple>, &ctx);
}

}  // namespace cuda
}  // namespace lattice
