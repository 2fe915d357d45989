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

// Tile of the linear log-prob kernels: rows (tokens) x vocabulary columns per thread block.
// The forward splits the vocabulary in multiples of kVocabBlock.
constexpr int kRowBlock = 64;
constexpr int kVocabBlock = 128;
// Grid y (vocabulary splits, vocabulary blocks) is limited to 65535 blocks by CUDA.
constexpr int64_t kMaxGridY = 65535;

// Where and how a launch runs.
struct LaunchContext {
  int device;    // CUDA device ordinal the pointers live on
  void* stream;  // cudaStream_t; nullptr is the legacy default stream
};

// Forward partials of z = h W^T (+ b) for each (vocabulary split, row), all [num_splits, num_rows]
// float32: row_max (running max), sum_excl (sum of exp(z - row_max) over the split's columns other
// than the target) and target_logit (z at the target if it falls in the split, else 0).
struct ForwardArgs {
  const void* hidden;     // [num_rows, width], dtype
  const void* weight;     // [vocab, width], dtype
  const void* bias;       // [vocab], dtype, or nullptr
  const int64_t* targets; // [num_rows], every value in [0, vocab)
  float* row_max;
  float* sum_excl;
  float* target_logit;
  int64_t num_rows;
  int64_t vocab;
  int64_t width;
  int64_t num_splits;
  int64_t vocab_per_split;  // multiple of kVocabBlock; split s covers [s * vocab_per_split, ...)
  DType dtype;
};

// Backward: float32 gradients accumulated with atomics into zero-initialised buffers.
// A null gradient pointer means "not requested" and skips that work entirely.
struct BackwardArgs {
  const void* hidden;
  const void* weight;
  const void* bias;        // or nullptr
  const int64_t* targets;
  const float* lse;        // [num_rows] from the forward
  const float* miss;       // [num_rows] 1 - p(target) from the forward
  const float* grad_logp;  // [num_rows] upstream gradient
  float* d_hidden;         // [num_rows, width] or nullptr
  float* d_weight;         // [vocab, width] or nullptr
  float* d_bias;           // [vocab] or nullptr
  int64_t num_rows;
  int64_t vocab;
  int64_t width;
  DType dtype;
};

// Number of paired loss types; their order is fastpref.loss_spec.PAIRED_LOSS_TYPES.
constexpr int kNumPairedLossTypes = 9;

struct PairLossArgs {
  const float* token_logp;       // [num_tokens] 0 outside responses
  const int64_t* cu_seqlens;     // [num_sequences + 1]
  const int64_t* lengths;        // [num_sequences] response tokens per sequence
  const int64_t* chosen_index;   // [num_pairs]
  const int64_t* rejected_index; // [num_pairs]
  const float* reference_logps;  // [num_sequences] or nullptr (reference-free types only)
  const float* weights;          // [kNumPairedLossTypes]
  const int32_t* averages;       // [kNumPairedLossTypes] nonzero: mean log-probs
  const float* chosen_tokens;    // [] response tokens over all chosen sequences
  float* sequence_logps;         // [num_sequences]
  float* parts;                  // [kNumPairedLossTypes, num_pairs]
  float* token_grad;             // [num_tokens]
  int64_t num_pairs;
  float beta;
  float label_smoothing;
  float simpo_gamma;
};

struct KtoLossArgs {
  const float* token_logp;
  const int64_t* cu_seqlens;
  const int64_t* lengths;
  const uint8_t* desirable;      // [num_sequences] nonzero: desirable
  const float* reference_logps;  // [num_sequences]
  const float* kl;               // [] KTO reference point z0
  float* sequence_logps;         // [num_sequences]
  float* parts;                  // [1, num_sequences]
  float* token_grad;             // [num_tokens]
  int64_t num_sequences;
  float beta;
  float desirable_weight;
  float undesirable_weight;
  bool average;
};

void launch_linear_logprobs_forward(const ForwardArgs& args, const LaunchContext& ctx);
void launch_linear_logprobs_backward(const BackwardArgs& args, const LaunchContext& ctx);
void launch_preference_pair_loss(const PairLossArgs& args, const LaunchContext& ctx);
void launch_kto_loss(const KtoLossArgs& args, const LaunchContext& ctx);

}  // namespace fastpref
