// Forward of the fused linear log-prob op: per (row block, vocabulary split), stream the split's
// logits tile by tile through an online softmax in float32, keeping per row
//
//     m' = max(m, max_v z_v)
//     s' = s exp(m - m') + sum_{v != t} exp(z_v - m')      (the target is kept out of the sum)
//     z_t  picked up from the one tile that holds the target
//
// and write (m, s, z_t) of every split to [num_splits, num_rows] buffers. The caller merges the
// splits: S = sum_i s_i exp(m_i - M), lse = M + log(S + exp(z_t - M)), miss = S / (S + exp(z_t - M)),
// so that 1 - p_t comes out without cancellation. Splitting the vocabulary keeps the GPU busy
// when there are few rows. No logits leave the chip.
#include <cmath>

#include "logits_tile.cuh"

namespace fastpref {
namespace {

constexpr int kRowsPerWarp = kRowBlock / kGemmWarps;
constexpr int kColsPerLane = kVocabBlock / kWarpSize;
static_assert(kRowBlock % kGemmWarps == 0 && kVocabBlock % kWarpSize == 0, "tile must split evenly");

template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
linear_logprobs_forward_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                               const T* __restrict__ bias, const int64_t* __restrict__ targets,
                               float* __restrict__ split_max, float* __restrict__ split_sum_excl,
                               float* __restrict__ split_target_logit, int64_t num_rows,
                               int64_t vocab, int64_t width, int64_t vocab_per_split) {
  using Smem = LogitsTileSmem<T>;
  __shared__ __align__(kSmemAlign) unsigned char smem[Smem::kBytes];
  const float* logits = Smem::logits(smem);

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int64_t v_begin = static_cast<int64_t>(blockIdx.y) * vocab_per_split;
  const int64_t v_end = min(v_begin + vocab_per_split, vocab);
  const bool hidden_vector_ok = vector_loadable(hidden, width);
  const bool weight_vector_ok = vector_loadable(weight, width);

  // Warp w owns tile rows w * kRowsPerWarp + i for the whole split. Its lanes each hold all of
  // their rows' state; warp reductions leave identical values in every lane.
  int64_t target[kRowsPerWarp];
  float running_max[kRowsPerWarp];
  float sum_excl[kRowsPerWarp];
  float target_logit[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    target[i] = row < num_rows ? targets[row] : -1;
    running_max[i] = -INFINITY;
    sum_excl[i] = 0.0f;
    target_logit[i] = 0.0f;
  }

  for (int64_t v0 = v_begin; v0 < v_end; v0 += kVocabBlock) {
    compute_logits_tile<T>(smem, hidden, weight, bias, row0, num_rows, v0, v_end, width,
                           hidden_vector_ok, weight_vector_ok);
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const float* z_row = logits + (warp * kRowsPerWarp + i) * Smem::kLogitsLd;
      float z[kColsPerLane];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        z[j] = z_row[lane + j * kWarpSize];  // consecutive lanes, consecutive banks
        tile_max = fmaxf(tile_max, z[j]);
      }
      // Every tile holds at least one column < v_end, so new_max is finite and the rescale
      // below never meets exp(-inf - (-inf)).
      const float new_max = fmaxf(running_max[i], warp_max(tile_max));
      float others = 0.0f;
      float at_target = 0.0f;
#pragma unroll
      for (int j = 0; j < kColsPerLane; ++j) {
        const int64_t col = v0 + lane + j * kWarpSize;
        if (col < v_end && col == target[i]) {
          at_target += z[j];
        } else {
          others += expf(z[j] - new_max);  // masked columns hold -inf: exp gives 0
        }
      }
      sum_excl[i] = sum_excl[i] * expf(running_max[i] - new_max) + warp_sum(others);
      target_logit[i] += warp_sum(at_target);
      running_max[i] = new_max;
    }
    // The next tile's operand loads overwrite the logits every warp is reading.
    __syncthreads();
  }

  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int64_t row = row0 + warp * kRowsPerWarp + i;
      if (row < num_rows) {
        const int64_t out = static_cast<int64_t>(blockIdx.y) * num_rows + row;
        split_max[out] = running_max[i];
        split_sum_excl[out] = sum_excl[i];
        split_target_logit[out] = target_logit[i];
      }
    }
  }
}

}  // namespace

void launch_linear_logprobs_forward(const ForwardArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  const dim3 grid(static_cast<unsigned>(ceil_div(args.num_rows, kRowBlock)),
                  static_cast<unsigned>(args.num_splits));
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    linear_logprobs_forward_kernel<T><<<grid, kGemmThreads, 0, as_stream(ctx)>>>(
        static_cast<const T*>(args.hidden), static_cast<const T*>(args.weight),
        static_cast<const T*>(args.bias), args.targets, args.row_max, args.sum_excl,
        args.target_logit, args.num_rows, args.vocab, args.width, args.vocab_per_split);
    check_launch("linear_logprobs_forward_kernel");
  });
}

}  // namespace fastpref
