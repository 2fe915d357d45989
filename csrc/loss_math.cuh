// Device helpers of the loss kernels: numerically careful scalar functions and block-wide sums
// and fills over one sequence's token range.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.cuh"

namespace fastpref {

// One block per pair (or per sequence for KTO); sequences are short, so 4 warps suffice.
constexpr int kLossThreads = 128;
constexpr int kLossWarps = kLossThreads / kWarpSize;

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// log s(x) = min(x, 0) - log1p(exp(-|x|)): no overflow, full precision in both tails.
__device__ __forceinline__ float log_sigmoid(float x) {
  return fminf(x, 0.0f) - log1pf(expf(-fabsf(x)));
}

// log(1 - exp(x)) for x < 0, switching at -log 2 between the two cancellation-free forms.
__device__ __forceinline__ float log1m_exp(float x) {
  return x > -0.6931471805599453f ? logf(-expm1f(x)) : log1pf(-expf(x));
}

// Sum of values[start:end], returned to every thread of the block (bitwise identical in all).
// Called by all threads with the same range; safe to call repeatedly.
__device__ __forceinline__ float block_range_sum(const float* __restrict__ values, int64_t start,
                                                 int64_t end) {
  __shared__ float warp_totals[kLossWarps];
  float acc = 0.0f;
  for (int64_t i = start + threadIdx.x; i < end; i += kLossThreads) acc += values[i];
  acc = warp_sum(acc);
  if (threadIdx.x % kWarpSize == 0) warp_totals[threadIdx.x / kWarpSize] = acc;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kLossWarps; ++w) total += warp_totals[w];
  // A following call overwrites warp_totals only after every thread has read them.
  __syncthreads();
  return total;
}

__device__ __forceinline__ void block_range_fill(float* __restrict__ values, int64_t start,
                                                 int64_t end, float value) {
  for (int64_t i = start + threadIdx.x; i < end; i += kLossThreads) values[i] = value;
}

}  // namespace fastpref
