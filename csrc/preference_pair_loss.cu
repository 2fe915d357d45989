// Fused per-pair preference loss: reduction, loss and gradient in one kernel over all pairs.
//
// Block p owns pair p. It sums the per-token log-probs of its chosen and rejected sequences
// (tokens outside responses are already 0), evaluates every loss type of the weighted sum
// (formulas in fastpref.loss_spec) with its derivative with respect to the two sequence
// log-probs, and writes that derivative over the pair's tokens as the per-token gradient scale:
// the backward of the whole loss is then one multiply by the upstream gradient.
//
// Per-type weights and reductions (sum or mean log-probs) come as [9] arrays in the order of
// loss_spec.PAIRED_LOSS_TYPES; a type of weight 0 contributes exactly nothing (not even a NaN).
// The scalar part is cheap, so every thread evaluates it (identically) instead of broadcasting
// thread 0's result; thread 0 alone stores the per-pair outputs.
#include <cmath>

#include "loss_math.cuh"

namespace fastpref {
namespace {

enum PairedLossType : int {
  kSigmoid = 0,
  kIpo,
  kSimpo,
  kHinge,
  kRobust,
  kOrpo,
  kApoZero,
  kApoDown,
  kSft,
};
static_assert(kSft + 1 == kNumPairedLossTypes, "PAIRED_LOSS_TYPES has 9 entries");

// One loss type's view of the pair: its weight, the policy and reference log-probs under its
// reduction, and d(reduced)/d(sum) for the chosen and rejected sequences.
struct Reduced {
  float weight;
  float policy_c, policy_r;
  float ref_c, ref_r;
  float scale_c, scale_r;
};

__device__ __forceinline__ Reduced reduced_for(int kind, const float* __restrict__ weights,
                                               const int32_t* __restrict__ averages, float sum_c,
                                               float sum_r, float ref_c, float ref_r,
                                               float inv_len_c, float inv_len_r) {
  const bool average = averages[kind] != 0;
  const float scale_c = average ? inv_len_c : 1.0f;
  const float scale_r = average ? inv_len_r : 1.0f;
  return {weights[kind], sum_c * scale_c, sum_r * scale_r, ref_c * scale_c, ref_r * scale_r,
          scale_c, scale_r};
}

__global__ void __launch_bounds__(kLossThreads)
preference_pair_loss_kernel(PairLossArgs args) {
  const int64_t pair = blockIdx.x;
  const int64_t num_pairs = args.num_pairs;
  const int64_t chosen = args.chosen_index[pair];
  const int64_t rejected = args.rejected_index[pair];
  const int64_t c_start = args.cu_seqlens[chosen];
  const int64_t c_end = args.cu_seqlens[chosen + 1];
  const int64_t r_start = args.cu_seqlens[rejected];
  const int64_t r_end = args.cu_seqlens[rejected + 1];
  const float sum_c = block_range_sum(args.token_logp, c_start, c_end);
  const float sum_r = block_range_sum(args.token_logp, r_start, r_end);

  // Every division is taken once here: each IEEE division inlines a slow-path call, and a dozen
  // of them made ptxas spill on sm_90.
  const float inv_len_c = 1.0f / static_cast<float>(args.lengths[chosen]);
  const float inv_len_r = 1.0f / static_cast<float>(args.lengths[rejected]);
  const bool has_reference = args.reference_logps != nullptr;
  const float ref_c = has_reference ? args.reference_logps[chosen] : 0.0f;
  const float ref_r = has_reference ? args.reference_logps[rejected] : 0.0f;
  const float beta = args.beta;
  const float eps = args.label_smoothing;
  const float inv_pairs = 1.0f / static_cast<float>(num_pairs);
  const float chosen_tokens = *args.chosen_tokens;
  const float d_nll = -1.0f / chosen_tokens;  // d nll / d sum_c
  const float nll = sum_c * d_nll;
  const float inv_robust = 1.0f / (1.0f - 2.0f * eps);
  const float ipo_margin = 0.5f / beta;

  const bool writer = threadIdx.x == 0;
  float grad_c = 0.0f;
  float grad_r = 0.0f;
  auto store_part = [&](int kind, float weight, float value) {
    if (writer) args.parts[kind * num_pairs + pair] = weight != 0.0f ? value : 0.0f;
  };

  {  // sigmoid (DPO), with conservative label smoothing
    const Reduced p = reduced_for(kSigmoid, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float d = beta * ((p.policy_c - p.ref_c) - (p.policy_r - p.ref_r));
    const float value = (-(1.0f - eps) * log_sigmoid(d) - eps * log_sigmoid(-d)) * inv_pairs;
    const float slope = (-(1.0f - eps) * sigmoid(-d) + eps * sigmoid(d)) * beta * inv_pairs;
    store_part(kSigmoid, p.weight, value);
    if (p.weight != 0.0f) {
      grad_c += p.weight * slope * p.scale_c;
      grad_r -= p.weight * slope * p.scale_r;
    }
  }
  {  // ipo
    const Reduced p = reduced_for(kIpo, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float gap = (p.policy_c - p.ref_c) - (p.policy_r - p.ref_r) - ipo_margin;
    store_part(kIpo, p.weight, gap * gap * inv_pairs);
    if (p.weight != 0.0f) {
      grad_c += p.weight * 2.0f * gap * inv_pairs * p.scale_c;
      grad_r -= p.weight * 2.0f * gap * inv_pairs * p.scale_r;
    }
  }
  {  // simpo (reference-free, length-averaged, margin gamma)
    const Reduced p = reduced_for(kSimpo, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float x = beta * (p.policy_c - p.policy_r) - args.simpo_gamma;
    const float value = (-(1.0f - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)) * inv_pairs;
    const float slope = (-(1.0f - eps) * sigmoid(-x) + eps * sigmoid(x)) * beta * inv_pairs;
    store_part(kSimpo, p.weight, value);
    if (p.weight != 0.0f) {
      grad_c += p.weight * slope * p.scale_c;
      grad_r -= p.weight * slope * p.scale_r;
    }
  }
  {  // hinge
    const Reduced p = reduced_for(kHinge, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float d = beta * ((p.policy_c - p.ref_c) - (p.policy_r - p.ref_r));
    const float value = fmaxf(1.0f - d, 0.0f) * inv_pairs;
    const float slope = d < 1.0f ? -beta * inv_pairs : 0.0f;
    store_part(kHinge, p.weight, value);
    if (p.weight != 0.0f) {
      grad_c += p.weight * slope * p.scale_c;
      grad_r -= p.weight * slope * p.scale_r;
    }
  }
  {  // robust (cDPO): unbiased under a fraction eps of flipped labels
    const Reduced p = reduced_for(kRobust, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float d = beta * ((p.policy_c - p.ref_c) - (p.policy_r - p.ref_r));
    const float value =
        (-(1.0f - eps) * log_sigmoid(d) + eps * log_sigmoid(-d)) * inv_robust * inv_pairs;
    const float slope =
        (-(1.0f - eps) * sigmoid(-d) - eps * sigmoid(d)) * inv_robust * beta * inv_pairs;
    store_part(kRobust, p.weight, value);
    if (p.weight != 0.0f) {
      grad_c += p.weight * slope * p.scale_c;
      grad_r -= p.weight * slope * p.scale_r;
    }
  }
  {  // orpo: nll - beta log s(log odds ratio), on mean log-probs
    const Reduced p = reduced_for(kOrpo, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    // A mean log-prob of exactly 0 (p = 1) has infinite odds: keep it a hair below.
    const float pc_safe = fminf(p.policy_c, -1e-30f);
    const float pr_safe = fminf(p.policy_r, -1e-30f);
    const float log_odds = (pc_safe - pr_safe) - (log1m_exp(pc_safe) - log1m_exp(pr_safe));
    const float value = -beta * log_sigmoid(log_odds) * inv_pairs + nll;
    const float slope = -beta * sigmoid(-log_odds) * inv_pairs;  // d value / d log_odds
    store_part(kOrpo, p.weight, value);
    if (p.weight != 0.0f) {
      grad_c += p.weight * (slope * (-1.0f / expm1f(pc_safe)) * p.scale_c + d_nll);
      grad_r += p.weight * slope * (1.0f / expm1f(pr_safe)) * p.scale_r;
    }
  }
  {  // apo_zero
    const Reduced p = reduced_for(kApoZero, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float s_c = sigmoid(beta * (p.policy_c - p.ref_c));
    const float s_r = sigmoid(beta * (p.policy_r - p.ref_r));
    store_part(kApoZero, p.weight, (1.0f - s_c + s_r) * inv_pairs);
    if (p.weight != 0.0f) {
      grad_c += -p.weight * beta * s_c * (1.0f - s_c) * inv_pairs * p.scale_c;
      grad_r += p.weight * beta * s_r * (1.0f - s_r) * inv_pairs * p.scale_r;
    }
  }
  {  // apo_down
    const Reduced p = reduced_for(kApoDown, args.weights, args.averages, sum_c, sum_r, ref_c, ref_r, inv_len_c, inv_len_r);
    const float s_c = sigmoid(beta * (p.policy_c - p.ref_c));
    const float s_d = sigmoid(beta * ((p.policy_c - p.ref_c) - (p.policy_r - p.ref_r)));
    store_part(kApoDown, p.weight, (s_c + 1.0f - s_d) * inv_pairs);
    if (p.weight != 0.0f) {
      grad_c += p.weight * beta * (s_c * (1.0f - s_c) - s_d * (1.0f - s_d)) * inv_pairs * p.scale_c;
      grad_r += p.weight * beta * s_d * (1.0f - s_d) * inv_pairs * p.scale_r;
    }
  }
  {  // sft: token-mean nll of the chosen responses
    const float weight = args.weights[kSft];
    store_part(kSft, weight, nll);
    if (weight != 0.0f) grad_c += weight * d_nll;
  }

  if (writer) {
    args.sequence_logps[chosen] = sum_c;
    args.sequence_logps[rejected] = sum_r;
  }
  block_range_fill(args.token_grad, c_start, c_end, grad_c);
  block_range_fill(args.token_grad, r_start, r_end, grad_r);
}

}  // namespace

void launch_preference_pair_loss(const PairLossArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  preference_pair_loss_kernel<<<static_cast<unsigned>(args.num_pairs), kLossThreads, 0,
                                as_stream(ctx)>>>(args);
  check_launch("preference_pair_loss_kernel");
}

}  // namespace fastpref
