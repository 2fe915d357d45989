// Epilogues of the vocabulary-slab GEMMs of the fused linear log-prob op.
//
// The vocabulary is cut into slabs of S columns spanning all N rows. cuBLAS (through torch)
// writes a slab's logits without bias, x = h W_slab^T, as a contiguous float32 [N, S] matrix;
// these kernels read it once, row by row, with the bias and the logit transform applied on the fly
// (fastpref/logit_transform.py: pre and post fold the logit scale, soft cap and temperature):
//
//     z = post tanh(pre (x + b))  under a soft cap,   z = pre (x + b)  without;   J = dz/dx.
//
// forward, slab_softmax_kernel: the online-softmax sums of each row are carried across slabs,
// relative to the running maximum m (fastpref/backends/online_softmax.py lists them and how parts
// merge), with w = exp(m - m') when the maximum grows to m':
//
//     m' = max(m, max_v z_v)
//     s' = s w + sum_{v != t} exp(z_v - m')      (the target is kept out of the sum)
//     z_t  written by the slab that holds the target,
//
// and for the per-token outputs asked for
//
//     sum_all' = sum_all w + sum_v exp(z_v - m')
//     shifted' = (shifted + (m - m') sum_all) w + sum_v exp(z_v - m') (z_v - m')   (entropy)
//     sum_sq'  = sum_sq w^2 + sum_v exp(2 (z_v - m'))                               (log sum p^2)
//     logit_sum' = logit_sum + sum_v z_v                                              (mean logit)
//     max_before' = max(max_before, max_{v < t} z_v)                                  (is_top1)
//
// after the last slab the caller finishes lse, miss = 1 - p_t (without cancellation) and the
// outputs from these sums (merge_vocabulary_parts of the one state);
//
// backward, slab_logit_gradient_kernel: the gradient with respect to x from the forward's lse,
// miss and entropy H, with p = exp(z - lse), g = dL/dlogp and g_H = dL/dH when it is wanted,
//
//     dz_{n,v} = -g_n p_{n,v}  off the target,   g_n miss_n  on it (exactly),
//                - g_H,n p_{n,v} (log p_{n,v} + H_n)  on every column (entropy),
//     dx = J dz,
//
// written in the inputs' dtype for the d_weight and d_hidden GEMMs; when the bias gradient is
// wanted, also in float32 over the logits it came from, so that d_bias = sum_n dx sums unrounded
// values (the rows of a column cancel: rounded terms would leave a large relative error).
//
// One warp per row, its lanes on consecutive columns (coalesced float32 reads); a row's state is
// read and written by one lane (its target logit by the lane that meets the target), so no two
// threads ever write the same address: no atomics.
//
// The soft cap, the forward's output sums and the entropy's gradient are template parameters, not
// runtime flags: a flag would keep every variant's registers in every launch (and a branch per
// element), so that a plain call would pay for the tanh and the extra accumulators: ptxas gives
// the widest variants 36-40 registers against 29-32 for the plain ones, which at 128 threads a
// block is 3/4 of an SM's threads instead of all of them, for an epilogue that lives on hiding
// memory latency. The four output sums share one variant (a few FMAs beside the exp per element;
// only the asked-for ones are reduced and stored), so that the flags make 4 variants per kernel
// and dtype, not 32.
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

struct Transformed {
  float z;      // the logit the softmax sees
  float slope;  // dz/dx
};

// The logit transform of x = h w + b and its slope. Under the cap, 1 - tanh^2 y is taken as
// 4 e / (1 + e)^2 with e = exp(-2 |y|): 1 - t^2 of the rounded t = tanh y loses its digits as the
// cap flattens (all of them from |y| ~ 9, where t rounds to 1); this stays within a few ulps.
template <bool kSoftcap>
__device__ __forceinline__ Transformed transform(float x, float pre, float post) {
  if constexpr (kSoftcap) {
    const float y = pre * x;
    const float e = expf(-2.0f * fabsf(y));
    return {post * tanhf(y), pre * post * (4.0f * e / ((1.0f + e) * (1.0f + e)))};
  } else {
    return {pre * x, pre};
  }
}

// exp(from - to) for from <= to, exactly 1 when equal: two -inf maxima (a row whose columns so far
// are all -inf, as a masked bias gives) rescale by 1 instead of exp(nan).
__device__ __forceinline__ float rescale(float from, float to) {
  return from == to ? 1.0f : expf(from - to);
}

// (from - to) sum_all: the shift of a part's entropy sum to a new maximum; 0 for a part that holds
// nothing yet (from = -inf, sum 0), where the product would be -inf * 0 = NaN.
__device__ __forceinline__ float shift(float from, float to, float sum_all) {
  return sum_all > 0.0f ? (from - to) * sum_all : 0.0f;
}

// Softmax sums over some columns of a row, relative to their maximum (see the file comment); the
// output sums only count when kOutputs.
template <bool kOutputs>
struct Sums {
  float max = -INFINITY;
  float excl = 0.0f;
  float all = 0.0f;
  float shifted = 0.0f;
  float sq = 0.0f;
  float logit_sum = 0.0f;
  float before = -INFINITY;

  // The same sums relative to to >= max, as parts must be to add up.
  __device__ __forceinline__ void rescale_to(float to) {
    const float w = rescale(max, to);
    excl *= w;
    if constexpr (kOutputs) {
      shifted = (shifted + shift(max, to, all)) * w;
      all *= w;
      sq *= w * w;
    }
    max = to;
  }

  // One column z <= max: e = exp(z - max), shifted_z = z - max.
  __device__ __forceinline__ void add(float e, float shifted_z, bool is_target) {
    if (!is_target) excl += e;
    if constexpr (kOutputs) {
      all += e;
      shifted += e * shifted_z;
      sq += e * e;
    }
  }
};

// The warp's sums of one slab from each lane's, all relative to the slab's maximum; the output
// sums whose pointer in `row` is null are left out.
template <bool kOutputs>
__device__ __forceinline__ Sums<kOutputs> warp_sums(Sums<kOutputs> lane, const RowSoftmaxState& row) {
  Sums<kOutputs> slab;
  slab.max = warp_max(lane.max);
  lane.rescale_to(slab.max);
  slab.excl = warp_sum(lane.excl);
  if constexpr (kOutputs) {
    if (row.shifted != nullptr) {
      slab.all = warp_sum(lane.all);
      slab.shifted = warp_sum(lane.shifted);
    }
    if (row.sum_sq != nullptr) slab.sq = warp_sum(lane.sq);
    if (row.logit_sum != nullptr) slab.logit_sum = warp_sum(lane.logit_sum);
    if (row.max_before != nullptr) slab.before = warp_max(lane.before);
  }
  return slab;
}

// Row `r`'s state merged with one slab's sums: both rescaled to their common maximum, then added.
template <bool kOutputs>
__device__ __forceinline__ void merge_into(const RowSoftmaxState& row, int64_t r, Sums<kOutputs> slab) {
  Sums<kOutputs> carried;
  carried.max = row.row_max[r];
  carried.excl = row.sum_excl[r];
  if constexpr (kOutputs) {
    if (row.shifted != nullptr) {
      carried.all = row.sum_all[r];
      carried.shifted = row.shifted[r];
    }
    if (row.sum_sq != nullptr) carried.sq = row.sum_sq[r];
  }
  const float new_max = fmaxf(carried.max, slab.max);
  carried.rescale_to(new_max);
  slab.rescale_to(new_max);
  row.row_max[r] = new_max;
  row.sum_excl[r] = carried.excl + slab.excl;
  if constexpr (kOutputs) {
    if (row.shifted != nullptr) {
      row.sum_all[r] = carried.all + slab.all;
      row.shifted[r] = carried.shifted + slab.shifted;
    }
    if (row.sum_sq != nullptr) row.sum_sq[r] = carried.sq + slab.sq;
    if (row.logit_sum != nullptr) row.logit_sum[r] += slab.logit_sum;
    if (row.max_before != nullptr) row.max_before[r] = fmaxf(row.max_before[r], slab.before);
  }
}

template <typename T, bool kSoftcap, bool kOutputs>
__global__ void __launch_bounds__(kSlabThreads)
slab_softmax_kernel(const float* __restrict__ logits, const T* __restrict__ bias,
                    const int64_t* __restrict__ targets, RowSoftmaxState state, float pre, float post,
                    int64_t num_rows, int64_t columns, int64_t slab_start) {
  const int64_t row = warp_row();
  if (row >= num_rows) return;
  const int lane_id = threadIdx.x % kWarpSize;
  const float* __restrict__ row_logits = logits + row * columns;
  const int64_t target = targets[row] - slab_start;  // outside [0, columns): not in this slab

  // Each lane's own online softmax over its columns: one exp per element.
  Sums<kOutputs> lane;
#pragma unroll 4
  for (int64_t col = lane_id; col < columns; col += kWarpSize) {
    const float z = transform<kSoftcap>(biased(row_logits[col], bias, slab_start + col), pre, post).z;
    const bool is_target = col == target;
    if (is_target) state.target_logit[row] = z;  // the one lane, of the one slab, that holds the target
    if constexpr (kOutputs) {
      lane.logit_sum += z;
      if (col < target) lane.before = fmaxf(lane.before, z);
    }
    if (z > lane.max) {
      lane.rescale_to(z);
      lane.add(1.0f, 0.0f, is_target);
    } else if (z != -INFINITY) {  // a NaN logit still reaches the sums
      lane.add(expf(z - lane.max), z - lane.max, is_target);
    }
  }
  const Sums<kOutputs> slab = warp_sums(lane, state);
  if (lane_id == 0) merge_into(state, row, slab);
}

template <typename T, bool kSoftcap, bool kEntropy>
__global__ void __launch_bounds__(kSlabThreads)
slab_logit_gradient_kernel(float* __restrict__ logits, const T* __restrict__ bias,
                           const int64_t* __restrict__ targets, const float* __restrict__ lse,
                           const float* __restrict__ miss, const float* __restrict__ grad_logp,
                           const float* __restrict__ entropy, const float* __restrict__ grad_entropy,
                           T* __restrict__ dz, bool float32_dz_into_logits, float pre, float post,
                           int64_t num_rows, int64_t columns, int64_t slab_start) {
  const int64_t row = warp_row();
  if (row >= num_rows) return;
  const int lane = threadIdx.x % kWarpSize;
  float* __restrict__ row_logits = logits + row * columns;
  T* __restrict__ row_dz = dz + row * columns;
  const int64_t target = targets[row] - slab_start;
  const float g = grad_logp[row];
  const float row_lse = lse[row];
  const float at_target = g * miss[row];
  const float g_entropy = kEntropy ? grad_entropy[row] : 0.0f;
  const float row_entropy = kEntropy ? entropy[row] : 0.0f;
#pragma unroll 4
  for (int64_t col = lane; col < columns; col += kWarpSize) {
    const Transformed x = transform<kSoftcap>(biased(row_logits[col], bias, slab_start + col), pre, post);
    const float log_p = x.z - row_lse;
    const float p = expf(log_p);
    float gradient = col == target ? at_target : -g * p;
    // p = 0 (a column masked to -inf) has no entropy term; formed, it would be 0 (-inf) = NaN
    if (kEntropy && p > 0.0f) gradient -= g_entropy * p * (log_p + row_entropy);
    gradient *= x.slope;
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
  const RowSoftmaxState& state = args.state;
  const bool outputs = state.shifted != nullptr || state.sum_sq != nullptr ||
                       state.logit_sum != nullptr || state.max_before != nullptr;
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_flag(args.transform.softcap, [&](auto softcap) {
      dispatch_flag(outputs, [&](auto with_outputs) {
        constexpr bool kSoftcap = decltype(softcap)::value;
        constexpr bool kOutputs = decltype(with_outputs)::value;
        slab_softmax_kernel<T, kSoftcap, kOutputs><<<slab_blocks(args.num_rows), kSlabThreads, 0, as_stream(ctx)>>>(
            args.logits, static_cast<const T*>(args.bias), args.targets, state, args.transform.pre,
            args.transform.post,
            args.num_rows, args.columns, args.slab_start);
        check_launch("slab_softmax_kernel");
      });
    });
  });
}

void launch_slab_logit_gradient(const SlabGradientArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_flag(args.transform.softcap, [&](auto softcap) {
      dispatch_flag(args.grad_entropy != nullptr, [&](auto with_entropy) {
        constexpr bool kSoftcap = decltype(softcap)::value;
        constexpr bool kEntropy = decltype(with_entropy)::value;
        slab_logit_gradient_kernel<T, kSoftcap, kEntropy><<<slab_blocks(args.num_rows), kSlabThreads, 0, as_stream(ctx)>>>(
            args.logits, static_cast<const T*>(args.bias), args.targets, args.lse, args.miss,
            args.grad_logp, args.entropy, args.grad_entropy, static_cast<T*>(args.dz),
            args.float32_dz_into_logits, args.transform.pre, args.transform.post, args.num_rows, args.columns, args.slab_start);
        check_launch("slab_logit_gradient_kernel");
      });
    });
  });
}

}  // namespace fastpref
