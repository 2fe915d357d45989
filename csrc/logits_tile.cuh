// One [kRowBlock x kVocabBlock] tile of logits z = h W^T (+ b), float32, in shared memory:
// shared by the forward (online softmax over the tiles of a vocabulary split) and the backward
// (recompute z, then form dz).
#pragma once

#include <cmath>
#include <cstdint>

#include "block_gemm.cuh"

namespace fastpref {

// Hidden-dimension step of the logits product.
constexpr int kLogitsDepth = 32;

// Shared-memory plan of one logits tile: the hidden and weight operand tiles of one depth step,
// then the float32 logits, which reuse the operands' space once the product is finished.
template <typename T>
struct LogitsTileSmem {
  static constexpr int kOperandLd = kLogitsDepth + kSmemPad<T>;
  // WMMA float32 stores need ld % 4 == 0; +4 also staggers the rows across banks.
  static constexpr int kLogitsLd = kVocabBlock + 4;
  static constexpr size_t kHiddenBytes = align_smem(sizeof(T) * kRowBlock * kOperandLd);
  static constexpr size_t kWeightBytes = align_smem(sizeof(T) * kVocabBlock * kOperandLd);
  static constexpr size_t kLogitsBytes = align_smem(sizeof(float) * kRowBlock * kLogitsLd);
  static constexpr size_t kBytes =
      kHiddenBytes + kWeightBytes > kLogitsBytes ? kHiddenBytes + kWeightBytes : kLogitsBytes;

  static_assert(sizeof(T) == 4 || kOperandLd % 8 == 0, "WMMA 16-bit operands need ld % 8 == 0");
  static_assert(kLogitsLd % 4 == 0, "WMMA float32 stores need ld % 4 == 0");

  __device__ static T* hidden(unsigned char* base) { return reinterpret_cast<T*>(base); }
  __device__ static T* weight(unsigned char* base) { return reinterpret_cast<T*>(base + kHiddenBytes); }
  __device__ static float* logits(unsigned char* base) { return reinterpret_cast<float*>(base); }
};

// Writes z[r][c] = sum_k h[row0 + r, k] W[col0 + c, k] (+ b[col0 + c]) for r < kRowBlock,
// c < kVocabBlock into LogitsTileSmem<T>::logits(smem), with -inf in the columns at or past
// col_end, so they drop out of every max and every exp. Rows at or past num_rows hold finite
// filler (their hidden rows load as zeros) that callers must not use.
//
// Called by all threads of the block; begins by overwriting `smem` (callers must be done with
// it) and ends with __syncthreads(), so the tile is visible to the whole block on return.
template <typename T>
__device__ void compute_logits_tile(unsigned char* smem, const T* __restrict__ hidden,
                                    const T* __restrict__ weight, const T* __restrict__ bias,
                                    int64_t row0, int64_t num_rows, int64_t col0, int64_t col_end,
                                    int64_t width, bool hidden_vector_ok, bool weight_vector_ok) {
  using Smem = LogitsTileSmem<T>;
  T* hidden_tile = Smem::hidden(smem);
  T* weight_tile = Smem::weight(smem);

  // z = h W^T: A = hidden tile (row-major [rows x depth]); B = W^T, which is the weight tile
  // ([vocab x depth], row-major) read as column-major [depth x vocab].
  BlockGemm<T, kRowBlock, kVocabBlock, RowMajor, ColMajor> gemm;
  for (int64_t k0 = 0; k0 < width; k0 += kLogitsDepth) {
    load_tile<T, kRowBlock, kLogitsDepth, Smem::kOperandLd>(hidden_tile, hidden, width, row0, num_rows,
                                                            k0, hidden_vector_ok);
    load_tile<T, kVocabBlock, kLogitsDepth, Smem::kOperandLd>(weight_tile, weight, width, col0, col_end,
                                                              k0, weight_vector_ok);
    __syncthreads();
    gemm.template mma<kLogitsDepth>(hidden_tile, Smem::kOperandLd, weight_tile, Smem::kOperandLd);
    // The next step's loads (or the logits store below, which aliases the operands) must wait
    // until every warp has read this step's operands.
    __syncthreads();
  }

  float* logits = Smem::logits(smem);
  gemm.store(logits, Smem::kLogitsLd);
  __syncthreads();

  for (int e = threadIdx.x; e < kRowBlock * kVocabBlock; e += kGemmThreads) {
    const int r = e / kVocabBlock;
    const int c = e % kVocabBlock;
    const int64_t col = col0 + c;
    float& z = logits[r * Smem::kLogitsLd + c];
    if (col < col_end) {
      if (bias != nullptr) z += to_float(bias[col]);
    } else {
      z = -INFINITY;
    }
  }
  __syncthreads();
}

}  // namespace fastpref
