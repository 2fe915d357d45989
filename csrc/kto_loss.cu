// Fused KTO loss: reduction, loss and gradient in one kernel over all (unpaired) sequences.
//
// Block s owns sequence s: with D = pi - ref (summed, or averaged over the response tokens),
// sign = +1 for a desirable sequence and -1 otherwise, z = beta (D - z0) sign,
//
//     loss_s = w_s (1 - s(z)) / S,     d loss_s / d D = -w_s beta sign s(z) (1 - s(z)) / S,
//
// written back over the sequence's tokens as the per-token gradient scale. z0 (the KL reference
// point) is a detached scalar read from device memory, so no host synchronisation is needed.
#include <cmath>

#include "loss_math.cuh"

namespace fastpref {
namespace {

__global__ void __launch_bounds__(kLossThreads)
kto_loss_kernel(KtoLossArgs args) {
  const int64_t seq = blockIdx.x;
  const int64_t start = args.cu_seqlens[seq];
  const int64_t end = args.cu_seqlens[seq + 1];
  const float total = block_range_sum(args.token_logp, start, end);

  // Every thread evaluates the (cheap) scalar part identically; thread 0 stores it.
  const float scale = args.average ? 1.0f / static_cast<float>(args.lengths[seq]) : 1.0f;
  const bool desirable = args.desirable[seq] != 0;
  const float sign = desirable ? 1.0f : -1.0f;
  const float weight = desirable ? args.desirable_weight : args.undesirable_weight;
  const float num_sequences = static_cast<float>(args.num_sequences);
  const float z = args.beta * ((total - args.reference_logps[seq]) * scale - *args.kl) * sign;
  const float s = sigmoid(z);
  const float grad = -weight * args.beta * sign * s * (1.0f - s) / num_sequences * scale;
  if (threadIdx.x == 0) {
    args.sequence_logps[seq] = total;
    args.parts[seq] = weight * (1.0f - s) / num_sequences;
  }
  block_range_fill(args.token_grad, start, end, grad);
}

}  // namespace

void launch_kto_loss(const KtoLossArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  kto_loss_kernel<<<static_cast<unsigned>(args.num_sequences), kLossThreads, 0, as_stream(ctx)>>>(args);
  check_launch("kto_loss_kernel");
}

}  // namespace fastpref
