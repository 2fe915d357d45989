// Block-wide GEMM building blocks of the linear log-prob kernels: bounds-masked tile loads from
// global into shared memory, and C += A B on shared-memory operands with float32 accumulators
// (tensor cores through WMMA for 16-bit types, plain FMA for float32).
#pragma once

#include <mma.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace fastpref {

// Every GEMM kernel runs 8 warps per block; the tile shapes below are laid out for that.
constexpr int kGemmThreads = 256;
constexpr int kGemmWarps = kGemmThreads / kWarpSize;

// Shared-memory regions start on 128-byte boundaries: WMMA fragment pointers need 32-byte
// alignment and the 16-byte vector stores need 16.
constexpr size_t kSmemAlign = 128;
constexpr size_t align_smem(size_t bytes) { return (bytes + kSmemAlign - 1) / kSmemAlign * kSmemAlign; }

// Padding of shared-memory leading dimensions, in elements. WMMA needs ld % 8 == 0 for 16-bit
// types, and 8 extra elements move consecutive rows 16 bytes apart, off each other's banks. The
// float32 FMA path reads ld-strided columns of column-major tiles: an odd ld makes them
// conflict-free (it never uses 16-byte shared stores, so it needs no alignment).
template <typename T>
constexpr int kSmemPad = std::is_same<T, float>::value ? 1 : 8;

struct RowMajor {};
struct ColMajor {};

// Offset of element (row, col) of a matrix stored with leading dimension ld.
template <typename Layout>
__device__ __forceinline__ int tile_offset(int row, int col, int ld) {
  if constexpr (std::is_same<Layout, RowMajor>::value) {
    return row * ld + col;
  } else {
    return col * ld + row;
  }
}

// Whether rows of the row-major matrix [*, width] at `matrix` can be read in 16-byte vectors:
// the base is 16-byte aligned and every row starts on a 16-byte boundary.
template <typename T>
__device__ __forceinline__ bool vector_loadable(const T* matrix, int64_t width) {
  constexpr int kChunk = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(matrix) % 16 == 0 && width % kChunk == 0;
}

// Copies rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of the row-major matrix `src`
// ([*, width], int64 offsets) into `dst` (row-major, leading dimension LD), writing zeros where
// row >= row_end or column >= width, so that partial tiles add exactly nothing to a product.
// Whole 16-byte chunks are read as one vector when `vector_ok` (see vector_loadable) and the
// chunk lies inside the row; anything else falls back to masked element loads.
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src,
                                          int64_t width, int64_t row0, int64_t row_end,
                                          int64_t col0, bool vector_ok) {
  constexpr int kChunk = 16 / sizeof(T);
  static_assert(COLS % kChunk == 0, "tile width must be a whole number of 16-byte chunks");
  constexpr int kChunksPerRow = COLS / kChunk;
  constexpr bool kVectorStore = (LD * sizeof(T)) % 16 == 0;
  const T zero = from_float<T>(0.0f);
  for (int chunk = threadIdx.x; chunk < ROWS * kChunksPerRow; chunk += kGemmThreads) {
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * kChunk;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    const bool row_ok = row < row_end;
    T* out = dst + r * LD + c;
    if (row_ok && vector_ok && col + kChunk <= width) {
      const uint4 packed = *reinterpret_cast<const uint4*>(src + row * width + col);
      if constexpr (kVectorStore) {
        *reinterpret_cast<uint4*>(out) = packed;
      } else {
        const T* values = reinterpret_cast<const T*>(&packed);
#pragma unroll
        for (int e = 0; e < kChunk; ++e) out[e] = values[e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < kChunk; ++e) {
        out[e] = (row_ok && col + e < width) ? src[row * width + col + e] : zero;
      }
    }
  }
}

// C[M x N] += A[M x K] B[K x N] for one block of kGemmThreads threads, A and B in shared memory
// (layouts ALayout / BLayout), C accumulated in float32 registers until store().
//
// Primary template: 16-bit operands on tensor cores through WMMA 16x16x16 fragments. The 8 warps
// form a kWarpsM x kWarpsN grid, each warp owning a kFragsM x kFragsN block of fragments. WMMA
// rather than mma.sync: its fragment layout is defined by the API, so correctness does not hang
// on hand-written lane <-> element maps; the price is a trip through shared memory in store().
template <typename T, int M, int N, typename ALayout, typename BLayout>
class BlockGemm {
  static constexpr int kWarpsM = M > N ? 4 : 2;
  static constexpr int kWarpsN = kGemmWarps / kWarpsM;
  static constexpr int kWarpTileM = M / kWarpsM;
  static constexpr int kWarpTileN = N / kWarpsN;
  static constexpr int kFragsM = kWarpTileM / 16;
  static constexpr int kFragsN = kWarpTileN / 16;
  static_assert(M % (16 * kWarpsM) == 0 && N % (16 * kWarpsN) == 0,
                "each warp needs whole 16x16 fragments");

  using FragmentLayoutA = std::conditional_t<std::is_same<ALayout, RowMajor>::value,
                                             nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using FragmentLayoutB = std::conditional_t<std::is_same<BLayout, RowMajor>::value,
                                             nvcuda::wmma::row_major, nvcuda::wmma::col_major>;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

 public:
  __device__ BlockGemm() {
    const int warp = threadIdx.x / kWarpSize;
    warp_row_ = (warp / kWarpsN) * kWarpTileM;
    warp_col_ = (warp % kWarpsN) * kWarpTileN;
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) nvcuda::wmma::fill_fragment(acc_[i][j], 0.0f);
    }
  }

  // Accumulates over K = DEPTH. lda / ldb are multiples of 8 and the pointers 32-byte aligned.
  template <int DEPTH>
  __device__ void mma(const T* a, int lda, const T* b, int ldb) {
    static_assert(DEPTH % 16 == 0, "WMMA steps K by 16");
#pragma unroll
    for (int k = 0; k < DEPTH; k += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, FragmentLayoutA> a_frag[kFragsM];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, FragmentLayoutB> b_frag[kFragsN];
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
        nvcuda::wmma::load_matrix_sync(a_frag[i], a + tile_offset<ALayout>(warp_row_ + 16 * i, k, lda), lda);
      }
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        nvcuda::wmma::load_matrix_sync(b_frag[j], b + tile_offset<BLayout>(k, warp_col_ + 16 * j, ldb), ldb);
      }
#pragma unroll
      for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
        for (int j = 0; j < kFragsN; ++j) nvcuda::wmma::mma_sync(acc_[i][j], a_frag[i], b_frag[j], acc_[i][j]);
      }
    }
  }

  // Writes C (row-major float32, ldc % 4 == 0, 32-byte aligned) to shared memory.
  __device__ void store(float* c, int ldc) const {
#pragma unroll
    for (int i = 0; i < kFragsM; ++i) {
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) {
        nvcuda::wmma::store_matrix_sync(c + (warp_row_ + 16 * i) * ldc + warp_col_ + 16 * j, acc_[i][j],
                                        ldc, nvcuda::wmma::mem_row_major);
      }
    }
  }

 private:
  Accumulator acc_[kFragsM][kFragsN];
  int warp_row_;
  int warp_col_;
};

// Float32 operands: FMA in full float32 (no TF32: the float32 path must stay near 1e-6
// relative). The block is a 16 x 16 grid of threads; thread (ty, tx) owns rows ty + 16 i and
// columns tx + 16 j. A warp then reads 2 rows of A per k (2 distinct words: broadcasts) and 16
// columns of B (consecutive words when row-major, odd-ld strided when column-major): no bank
// conflicts.
template <int M, int N, typename ALayout, typename BLayout>
class BlockGemm<float, M, N, ALayout, BLayout> {
  static_assert(kGemmThreads == 256, "the FMA path maps 16 x 16 threads onto the tile");
  static_assert(M % 16 == 0 && N % 16 == 0, "tile sides must be multiples of 16");
  static constexpr int kThreadRows = M / 16;
  static constexpr int kThreadCols = N / 16;

 public:
  __device__ BlockGemm() : ty_(threadIdx.x / 16), tx_(threadIdx.x % 16) {
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) acc_[i][j] = 0.0f;
    }
  }

  template <int DEPTH>
  __device__ void mma(const float* a, int lda, const float* b, int ldb) {
#pragma unroll 4
    for (int k = 0; k < DEPTH; ++k) {
      float a_val[kThreadRows];
      float b_val[kThreadCols];
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) a_val[i] = a[tile_offset<ALayout>(ty_ + 16 * i, k, lda)];
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) b_val[j] = b[tile_offset<BLayout>(k, tx_ + 16 * j, ldb)];
#pragma unroll
      for (int i = 0; i < kThreadRows; ++i) {
#pragma unroll
        for (int j = 0; j < kThreadCols; ++j) acc_[i][j] = fmaf(a_val[i], b_val[j], acc_[i][j]);
      }
    }
  }

  __device__ void store(float* c, int ldc) const {
#pragma unroll
    for (int i = 0; i < kThreadRows; ++i) {
#pragma unroll
      for (int j = 0; j < kThreadCols; ++j) c[(ty_ + 16 * i) * ldc + tx_ + 16 * j] = acc_[i][j];
    }
  }

 private:
  float acc_[kThreadRows][kThreadCols];
  int ty_;
  int tx_;
};

}  // namespace fastpref
