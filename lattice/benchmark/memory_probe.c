/* Bare memory-access loops over a benchmark's own rows, to tell what the machine allows for its access
 * pattern: the random row gathers of a pooling forward, and the sparse ascending read-modify-write of a
 * fused optimizer step. No sort, no bags, no gradients: the bytes and the order alone. Compiled and loaded by
 * memory_probe.py; each function's `prefetch` is how many rows ahead it prefetches (0 = none). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

static void prefetch_row(const float* row, int64_t bytes) {
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch((const char*)row + k, 0, 3);
}

/* rows [n], ascending and distinct: every w[r, :] is read and written back (times `scale`). */
void sparse_row_update(float* w, int64_t D, const int64_t* rows, int64_t n, int64_t prefetch, float scale,
                       int threads) {
#pragma omp parallel num_threads(threads)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = n * tid / nt, hi = n * (tid + 1) / nt;
    for (int64_t e = lo; e < hi; ++e) {
      if (prefetch > 0 && e + prefetch < hi) prefetch_row(w + rows[e + prefetch] * D, D * 4);
      float* x = w + rows[e] * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) x[c] *= scale;
    }
  }
}

/* One thread's share of row_gather for a row width known when compiling (the sums stay in registers). */
#define GATHER_FIXED(DIM)                                                                                  \
  static double gather_##DIM(const float* w, const int64_t* rows, int64_t lo, int64_t hi, int64_t prefetch) { \
    float acc[DIM] = {0};                                                                                  \
    for (int64_t e = lo; e < hi; ++e) {                                                                    \
      if (prefetch > 0 && e + prefetch < hi) prefetch_row(w + rows[e + prefetch] * DIM, DIM * 4);          \
      const float* x = w + rows[e] * DIM;                                                                  \
      _Pragma("omp simd") for (int64_t c = 0; c < DIM; ++c) acc[c] += x[c];                                \
    }                                                                                                      \
    double total = 0.0;                                                                                    \
    for (int64_t c = 0; c < DIM; ++c) total += acc[c];                                                     \
    return total;                                                                                          \
  }
GATHER_FIXED(32)
GATHER_FIXED(64)
GATHER_FIXED(128)
GATHER_FIXED(256)

static double gather_any(const float* w, int64_t D, const int64_t* rows, int64_t lo, int64_t hi, int64_t prefetch) {
  float* acc = (float*)calloc((size_t)(D > 0 ? D : 1), sizeof(float));
  for (int64_t e = lo; e < hi; ++e) {
    if (prefetch > 0 && e + prefetch < hi) prefetch_row(w + rows[e + prefetch] * D, D * 4);
    const float* x = w + rows[e] * D;
#pragma omp simd
    for (int64_t c = 0; c < D; ++c) acc[c] += x[c];
  }
  double total = 0.0;
  for (int64_t c = 0; c < D; ++c) total += acc[c];
  free(acc);
  return total;
}

/* rows [n] in any order: every w[r, :] is read and summed; returns the total so nothing is optimized away. */
double row_gather(const float* w, int64_t D, const int64_t* rows, int64_t n, int64_t prefetch, int threads) {
  double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t lo = n * tid / nt, hi = n * (tid + 1) / nt;
    switch (D) {
      case 32: total += gather_32(w, rows, lo, hi, prefetch); break;
      case 64: total += gather_64(w, rows, lo, hi, prefetch); break;
      case 128: total += gather_128(w, rows, lo, hi, prefetch); break;
      case 256: total += gather_256(w, rows, lo, hi, prefetch); break;
      default: total += gather_any(w, D, rows, lo, hi, prefetch);
    }
  }
  return total;
}
