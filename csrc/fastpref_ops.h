// Host interface of the CUDA kernels: argument structs and launchers.
//
// Plain C++ (no CUDA headers), so that bindings.cpp compiles with the host compiler alone.
// Launchers assume their arguments were validated (bindings.cpp does that) and throw
// std::runtime_error carrying the CUDA error string when a CUDA call or a launch fails.
// Every launch is asynchronous on the given stream; nothing here synchronises the device.
#pragma once

#include <cstdint>

namespace fastpref {

// Element type of hidden / weight / bias. The values are part of the Python binding contract.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads per block of the compensated accumulation, one element each.
constexpr int kAccumulateThreads = 128;
// Grid x is limited to 2^31 - 1 blocks by CUDA.
constexpr int64_t kMaxGridX = 2147483647;

// Where and how a launch runs.
struct LaunchContext {
  int device;    // CUDA device ordinal the pointers live on
  void* stream;  // cudaStream_t; nullptr is the legacy default stream
};

// The logit transform of the slab kernels (fastpref/logit_transform.py): z = post tanh(pre x)
// when softcap is set, z = pre x without (post unused), x = h w + b.
struct LogitTransformArgs {
  float pre;     // finite
  float post;    // finite, > 0
  bool softcap;
};

// Each row's online-softmax state, [num_rows] float32 buffers carried across the slabs of the
// forward (fastpref/backends/online_softmax.py): the first three always, the others for the
// per-token outputs asked for, nullptr otherwise. Start values: -inf for row_max and max_before,
// 0 for the others.
struct RowSoftmaxState {
  float* row_max;       // running max m of the row's logits z
  float* sum_excl;      // sum of exp(z - m) over the columns other than the target
  float* target_logit;  // z at the target, written by the slab that holds it
  float* sum_all;       // entropy: sum of exp(z - m) over every column (given with shifted)
  float* shifted;       // entropy: sum of exp(z - m) (z - m) (given with sum_all)
  float* sum_sq;        // log_sum_sq_probs: sum of exp(2 (z - m))
  float* logit_sum;     // mean_logits: sum of z
  float* max_before;    // is_top1: max of z over the columns before the target
};

// One vocabulary slab [slab_start, slab_start + columns) of the forward: updates each row's
// online-softmax state from the slab's logits without bias (cuBLAS's output), the bias and the
// logit transform.
struct SlabSoftmaxArgs {
  const float* logits;    // [num_rows, columns] float32, contiguous: x = h W_slab^T
  const void* bias;       // [vocab], dtype, or nullptr
  const int64_t* targets; // [num_rows], every value in [0, vocab)
  RowSoftmaxState state;
  LogitTransformArgs transform;
  int64_t num_rows;
  int64_t columns;
  int64_t slab_start;
  DType dtype;            // of bias
};

// One vocabulary slab of the backward: the gradient with respect to x = h w + b,
// dx = J (g (onehot(t) miss - p) - g_H p (log p + entropy)) with p = exp(z - lse) and J = dz/dx,
// in dtype, and in float32 over the logits when float32_dz_into_logits is set (for the bias
// gradient).
struct SlabGradientArgs {
  float* logits;             // [num_rows, columns] float32, contiguous: x = h W_slab^T
  const void* bias;          // [vocab], dtype, or nullptr
  const int64_t* targets;
  const float* lse;          // [num_rows] from the forward
  const float* miss;         // [num_rows] 1 - p(target) from the forward
  const float* grad_logp;    // [num_rows] upstream gradient of the log-probs
  const float* entropy;      // [num_rows] from the forward, or nullptr (given with grad_entropy)
  const float* grad_entropy; // [num_rows] upstream gradient of the entropy, or nullptr
  void* dz;                  // [num_rows, columns], dtype, contiguous
  bool float32_dz_into_logits;
  LogitTransformArgs transform;
  int64_t num_rows;
  int64_t columns;
  int64_t slab_start;
  DType dtype;
};

// hi, lo += product, compensated: s = hi + lo + product, hi = round(s), lo = round_bf16(s - hi).
struct CompensatedAccumulateArgs {
  const float* product;  // [count] float32
  void* hi;              // [count], dtype (float16 or bfloat16)
  void* lo;              // [count] bfloat16
  int64_t count;
  DType dtype;
};

void launch_slab_softmax(const SlabSoftmaxArgs& args, const LaunchContext& ctx);
void launch_slab_logit_gradient(const SlabGradientArgs& args, const LaunchContext& ctx);
void launch_compensated_accumulate(const CompensatedAccumulateArgs& args, const LaunchContext& ctx);

}  // namespace fastpref
