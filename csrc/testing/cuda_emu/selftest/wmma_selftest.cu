// Kernels that test the emulator's warp matrix API (wmma_emu.h; tests/cuda_emu/test_emu_wmma.py): a tiled
// GEMM over every input type and fragment layout, and planted misuses that must be reported.
#include <mma.h>

#include "lattice/cuda/device.cuh"
#include "lattice/cuda/launch.cuh"

#include "../emu_entry.h"

namespace wmma_selftest {

using namespace nvcuda;

template <typename T> struct input { using type = T; static constexpr int k = 16; };
template <> struct input<wmma::precision::tf32> { using type = float; static constexpr int k = 8; };

enum Mode : int {
  kCorrect = 0,
  kDivergentMma = 1,     // odd and even lanes call mma_sync from different call sites
  kPartialMma = 2,       // only lanes 0-15 call mma_sync
  kMisaligned = 3,       // A's pointer is 4 bytes past a 32-byte boundary
  kBadLdm = 4,           // ldm that is not a multiple of 16 bytes
  kAssumedLayout = 5,    // writes the accumulator as if lane l held row l / 2, columns 8 (l % 2) + i
  kUnsyncedReadBack = 6, // reads another lane's stored element without __syncwarp
};

// C [m, n] (fp32, row-major, ldc = n) = A [m, k] B [k, n]: one warp per 16 x 16 tile of C. A is stored
// row-major [m, lda] (LA = row_major) or column-major, i.e. A^T row-major [k, lda]; B likewise ([k, ldb] or
// B^T [n, ldb]). With `store_col` the tile is stored column-major into C^T [n, m] instead.
template <typename T, typename LA, typename LB>
__global__ void gemm_kernel(const typename input<T>::type* a, const typename input<T>::type* b, float* c, int m,
                            int n, int k, int lda, int ldb, int store_col, int mode) {
  using In = typename input<T>::type;
  constexpr int K = input<T>::k;
  constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
  constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const unsigned lane = lattice::cuda::lane_id();
  const int tile = static_cast<int>(blockIdx.x) * (static_cast<int>(blockDim.x) / 32) + warp;
  const int tiles_n = n / 16;
  if (tile >= (m / 16) * tiles_n) return;  // whole warp
  const int r0 = tile / tiles_n * 16, c0 = tile % tiles_n * 16;
  wmma::fragment<wmma::accumulator, 16, 16, K, float> acc;
  wmma::fill_fragment(acc, 0.f);
  for (int k0 = 0; k0 < k; k0 += K) {
    wmma::fragment<wmma::matrix_a, 16, 16, K, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, K, T, LB> fb;
    const In* pa = a_row ? a + r0 * lda + k0 : a + k0 * lda + r0;
    const In* pb = b_row ? b + k0 * ldb + c0 : b + c0 * ldb + k0;
    if (mode == kMisaligned) pa += 1;
    wmma::load_matrix_sync(fa, pa, mode == kBadLdm ? lda - 1 : lda);
    wmma::load_matrix_sync(fb, pb, ldb);
    if constexpr (std::is_same<T, wmma::precision::tf32>::value) {
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
    }
    if (mode == kDivergentMma) {
      if (lane & 1u) {
        wmma::mma_sync(acc, fa, fb, acc);
      } else {
        wmma::mma_sync(acc, fa, fb, acc);
      }
    } else if (mode == kPartialMma) {
      if (lane < 16) wmma::mma_sync(acc, fa, fb, acc);
      __syncwarp();
    } else {
      wmma::mma_sync(acc, fa, fb, acc);
    }
  }
  if (mode == kAssumedLayout) {
    for (int i = 0; i < acc.num_elements; ++i) c[(r0 + lane / 2) * n + c0 + (lane % 2) * 8 + i] = acc.x[i];
    return;
  }
  if (store_col) {
    wmma::store_matrix_sync(c + c0 * m + r0, acc, m, wmma::mem_col_major);
  } else {
    wmma::store_matrix_sync(c + r0 * n + c0, acc, n, wmma::mem_row_major);
  }
  if (mode == kUnsyncedReadBack) {
    // Each lane doubles one element some other lane stored: without __syncwarp() the other lane may not
    // have stored it yet (and may overwrite it afterwards), so the result depends on the schedule.
    float* e = c + (r0 + (lane + 5) % 16) * n + c0 + lane % 16;
    *e = 2.f * *e;
  }
}

template <typename T, typename LA, typename LB>
void launch_gemm(const void* a, const void* b, float* c, int m, int n, int k, int lda, int ldb, int store_col,
                 int mode, int warps) {
  using In = typename input<T>::type;
  const int tiles = (m / 16) * (n / 16);
  lattice::cuda::launch(gemm_kernel<T, LA, LB>, dim3((tiles + warps - 1) / warps), dim3(32 * warps), 0, nullptr,
                        static_cast<const In*>(a), static_cast<const In*>(b), c, m, n, k, lda, ldb, store_col, mode);
}

template <typename T>
void dispatch_layouts(int a_row, int b_row, const void* a, const void* b, float* c, int m, int n, int k, int lda,
                      int ldb, int store_col, int mode, int warps) {
  if (a_row && b_row) return launch_gemm<T, wmma::row_major, wmma::row_major>(a, b, c, m, n, k, lda, ldb, store_col, mode, warps);
  if (a_row) return launch_gemm<T, wmma::row_major, wmma::col_major>(a, b, c, m, n, k, lda, ldb, store_col, mode, warps);
  if (b_row) return launch_gemm<T, wmma::col_major, wmma::row_major>(a, b, c, m, n, k, lda, ldb, store_col, mode, warps);
  return launch_gemm<T, wmma::col_major, wmma::col_major>(a, b, c, m, n, k, lda, ldb, store_col, mode, warps);
}

}  // namespace wmma_selftest

// dtype: 0 half, 1 bf16 (a, b: 2-byte bit patterns), 2 tf32 (a, b: float). a holds A [m, lda] (a_row) or
// A^T [k, lda]; b holds B [k, ldb] (b_row) or B^T [n, ldb]. c: [m, n] or, with store_col, C^T [n, m].
LATTICE_EMU_EXPORT int selftest_wmma_gemm(int dtype, int a_row, int b_row, const void* a, const void* b, float* c,
                                          int m, int n, int k, int lda, int ldb, int store_col, int mode, int warps,
                                          char* err, size_t err_len) {
  return lattice_emu::guarded_call(err, err_len, [&] {
    const size_t esize = dtype == 2 ? 4 : 2;
    const size_t a_elems = static_cast<size_t>(a_row ? m : k) * lda, b_elems = static_cast<size_t>(b_row ? k : n) * ldb;
    lattice_emu::DeviceBuffer da(a, esize * a_elems, "A"), db(b, esize * b_elems, "B");
    lattice_emu::DeviceBuffer dc(sizeof(float) * m * n, "C");
    cudaMemset(dc.get(), 0, dc.bytes());
    switch (dtype) {
      case 0:
        wmma_selftest::dispatch_layouts<__half>(a_row, b_row, da.get(), db.get(), dc.get<float>(), m, n, k, lda, ldb,
                                                store_col, mode, warps);
        break;
      case 1:
        wmma_selftest::dispatch_layouts<__nv_bfloat16>(a_row, b_row, da.get(), db.get(), dc.get<float>(), m, n, k, lda,
                                                       ldb, store_col, mode, warps);
        break;
      default:
        wmma_selftest::dispatch_layouts<nvcuda::wmma::precision::tf32>(a_row, b_row, da.get(), db.get(),
                                                                       dc.get<float>(), m, n, k, lda, ldb, store_col,
                                                                       mode, warps);
    }
    dc.to_host(c);
  });
}
