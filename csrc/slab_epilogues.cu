// Epilogues of the vocabulary-slab GEMMs of the fused linear log-prob op.
//
// The vocabulary is cut into slabs of S columns spanning all N rows. cuBLAS (through torch)
// writes a slab's logits without bias, x = h W_slab^T, as a contiguous float32 [N, S] matrix;
// these kernels read it once, row by row, with z = x + b_slab added on the fly:
//
// forward, slab_softmax_kernel: the online-softmax state of each row is carried across slabs,
//
//     m' = max(m, max_v z_v)
//     s' = s exp(m - m') + sum_{v != t} exp(z_v - m')      (the target is kept out of the sum)
//     z_t  written by the slab that holds the target,
//
// after the last slab the caller finishes lse = m + log(s + exp(z_t - m)), miss = s / (s + exp(z_t - m)),
// so that 1 - p_t comes out without cancellation;
//
// backward, slab_logit_gradient_kernel: the logits' gradient from the forward's lse and miss,
//
//     dz_{n,v} = -g_n exp(z_{n,v} - lse_n)   off the target,   g_n miss_n   on it (exactly),
//
// written in the inputs' dtype for the d_weight and d_hidden GEMMs; when the bias gradient is
// wanted, also in float32 over the logits it came from, so that d_bias = sum_n dz sums unrounded
// values (the rows of a column cancel: rounded terms would leave a large relative error).
//
// One warp per row, its lanes on consecutive columns (coalesced float32 reads); a row's state is
// read and written by one lane (its target logit by the lane that meets the target), so no two
// threads ever write the same address: no atomics.
#include <cmath>

#include "common.cuh"

namespace fastpref {
namespace {

constexpr int kSlabThreads = 128;
constexpr int kSlabRowsPerBlock = kSlabThreads / kWarpSize;

// The row of the calling warp; warp-uniform, so a whole warp leaves together (full-mask shuffles).
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kSlabRowsPerBlock + threadIdx.x / kWarpSize;
}

template <typename T>
__device__ __forceinline__ float biased(float logit, const T* __restrict__ bias, int64_t column) {
  return bias == nullptr ? logit : logit + to_float(bias[column]);
}

// exp(from - to) for from <= to, exactly 1 when equal: two -inf maxima (a row whose columns so far
// are all -inf, as a masked bias gives) rescale by 1 instead of exp(nan).
__device__ __forceinline__ float rescale(float from, float to) {
  return from == to ? 1.0f : expf(from - to);
}

template <typename T>
__global__ void __launch_bounds__(kSlabThreads)
slab_softmax_kernel(const float* __restrict__ logits, const T* __restrict__ bias,
                    const int64_t* __restrict__ targets, float* __restrict__ row_max,
                    float* __restrict__ sum_excl, float* __restrict__ target_logit,
                    int64_t num_rows, int64_t columns, int64_t slab_start) {
  const int64_t row = warp_row();
  if (row >= num_rows) return;
  const int lane = threadIdx.x % kWarpSize;
  const float* __restrict__ row_logits = logits + row * columns;
  const int64_t target = targets[row] - slab_start;  // outside [0, columns): not in this slab

  // Each lane's own online softmax over its columns: one exp per element.
  float lane_max = -INFINITY;
  float lane_sum = 0.0f;
#pragma unroll 4
  for (int64_t col = lane; col < columns; col += kWarpSize) {
    const float z = biased(row_logits[col], bias, slab_start + col);
    const bool other = col != target;
    if (!other) target_logit[row] = z;  // the one lane, of the one slab, that holds the target
    if (z > lane_max) {
      lane_sum = lane_sum * rescale(lane_max, z) + (other ? 1.0f : 0.0f);
      lane_max = z;
    } else if (other && z != -INFINITY) {  // a NaN logit still reaches the sum
      lane_sum += expf(z - lane_max);
    }
  }
  const float slab_max = warp_max(lane_max);
  const float slab_sum = warp_sum(lane_sum * rescale(lane_max, slab_max));

  if (lane == 0) {
    const float old_max = row_max[row];
    const float new_max = fmaxf(old_max, slab_max);
    sum_excl[row] = sum_excl[row] * rescale(old_max, new_max) + slab_sum * rescale(slab_max, new_max);
    row_max[row] = new_max;
  }
}

template <typename T>
__global__ void __launch_bounds__(kSlabThreads)
slab_logit_gradient_kernel(float* __restrict__ logits, const T* __restrict__ bias,
                           const int64_t* __restrict__ targets, const float* __restrict__ lse,
                           const float* __restrict__ miss, const float* __restrict__ grad_logp,
                           T* __restrict__ dz, bool float32_dz_into_logits, int64_t num_rows,
                           int64_t columns, int64_t slab_start) {
  const int64_t row = warp_row();
  if (row >= num_rows) return;
  const int lane = threadIdx.x % kWarpSize;
  float* __restrict__ row_logits = logits + row * columns;
  T* __restrict__ row_dz = dz + row * columns;
  const int64_t target = targets[row] - slab_start;
  const float g = grad_logp[row];
  const float row_lse = lse[row];
  const float at_target = g * miss[row];
#pragma unroll 4
  for (int64_t col = lane; col < columns; col += kWarpSize) {
    const float z = biased(row_logits[col], bias, slab_start + col);
    const float gradient = col == target ? at_target : -g * expf(z - row_lse);
    row_dz[col] = from_float<T>(gradient);
    if (float32_dz_into_logits) row_logits[col] = gradient;  // read above by this same thread
  }
}

unsigned slab_blocks(int64_t num_rows) {
  return static_cast<unsigned>(ceil_div(num_rows, kSlabRowsPerBlock));
}

}  // namespace

void launch_slab_softmax(const SlabSoftmaxArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    slab_softmax_kernel<T><<<slab_blocks(args.num_rows), kSlabThreads, 0, as_stream(ctx)>>>(
        args.logits, static_cast<const T*>(args.bias), args.targets, args.row_max, args.sum_excl,
        args.target_logit, args.num_rows, args.columns, args.slab_start);
    check_launch("slab_softmax_kernel");
  });
}

void launch_slab_logit_gradient(const SlabGradientArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    slab_logit_gradient_kernel<T><<<slab_blocks(args.num_rows), kSlabThreads, 0, as_stream(ctx)>>>(
        args.logits, static_cast<const T*>(args.bias), args.targets, args.lse, args.miss,
        args.grad_logp, static_cast<T*>(args.dz), args.float32_dz_into_logits, args.num_rows, args.columns, args.slab_start);
    check_launch("slab_logit_gradient_kernel");
  });
}

}  // namespace fastpref
