// Python bindings of the CUDA kernels: module fastpref._C.
//
// Every function takes raw device pointers (tensor.data_ptr(), 0 for "none"), shapes, a dtype
// code, the device ordinal and a stream handle (torch.cuda.current_stream().cuda_stream), all as
// keyword arguments. Arguments are validated here, on the host, before any CUDA call: a bad one
// raises ValueError naming it (std::invalid_argument). CUDA failures raise RuntimeError with the
// CUDA error string (std::runtime_error from the launchers). Launches are asynchronous.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "fastpref_ops.h"

namespace py = pybind11;

namespace fastpref {
namespace {

// Sizes index rows, columns and grid blocks; past 2^31 - 1 they stop being sane shapes.
constexpr int64_t kMaxExtent = std::numeric_limits<int32_t>::max();

[[noreturn]] void invalid(const std::string& message) { throw std::invalid_argument(message); }

template <typename Pointer>
Pointer pointer(const char* name, std::uintptr_t address) {
  if (address == 0) invalid(std::string(name) + " must be a device pointer, got null (0)");
  return reinterpret_cast<Pointer>(address);
}

template <typename Pointer>
Pointer optional_pointer(std::uintptr_t address) {
  return reinterpret_cast<Pointer>(address);
}

int64_t extent(const char* name, int64_t value, int64_t max = kMaxExtent) {
  if (value <= 0 || value > max) {
    invalid(std::string(name) + " must lie in [1, " + std::to_string(max) + "], got " +
            std::to_string(value));
  }
  return value;
}

DType dtype_of(int code) {
  switch (code) {
    case static_cast<int>(DType::kFloat32):
    case static_cast<int>(DType::kFloat16):
    case static_cast<int>(DType::kBFloat16):
      return static_cast<DType>(code);
    default:
      invalid("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(code));
  }
}

float positive(const char* name, double value) {
  if (!(value > 0.0) || !std::isfinite(value)) {
    invalid(std::string(name) + " must be a finite number > 0, got " + std::to_string(value));
  }
  return static_cast<float>(value);
}

float finite(const char* name, double value) {
  if (!std::isfinite(value)) invalid(std::string(name) + " must be finite, got " + std::to_string(value));
  return static_cast<float>(value);
}

LaunchContext context(int64_t device, std::uintptr_t stream) {
  if (device < 0 || device > std::numeric_limits<int>::max()) {
    invalid("device must be a CUDA device ordinal >= 0, got " + std::to_string(device));
  }
  return {static_cast<int>(device), reinterpret_cast<void*>(stream)};
}

// How to split the vocabulary over about `splits_wanted` blocks per row block: whole
// kVocabBlock tiles per split, no split empty. Returns (num_splits, vocab_per_split).
py::tuple vocab_split(int64_t vocab, int64_t splits_wanted) {
  extent("vocab", vocab);
  if (splits_wanted <= 0) invalid("splits_wanted must be >= 1, got " + std::to_string(splits_wanted));
  const int64_t vocab_blocks = ceil_div(vocab, kVocabBlock);
  int64_t num_splits = std::min(std::min(splits_wanted, vocab_blocks), kMaxGridY);
  const int64_t vocab_per_split = ceil_div(vocab_blocks, num_splits) * kVocabBlock;
  num_splits = ceil_div(vocab, vocab_per_split);
  return py::make_tuple(num_splits, vocab_per_split);
}

void linear_logprobs_forward(std::uintptr_t hidden, std::uintptr_t weight, std::uintptr_t bias,
                             std::uintptr_t targets, std::uintptr_t row_max,
                             std::uintptr_t sum_excl, std::uintptr_t target_logit,
                             int64_t num_rows, int64_t vocab, int64_t width, int64_t num_splits,
                             int64_t vocab_per_split, int dtype, int64_t device,
                             std::uintptr_t stream) {
  ForwardArgs args{};
  args.hidden = pointer<const void*>("hidden", hidden);
  args.weight = pointer<const void*>("weight", weight);
  args.bias = optional_pointer<const void*>(bias);
  args.targets = pointer<const int64_t*>("targets", targets);
  args.row_max = pointer<float*>("row_max", row_max);
  args.sum_excl = pointer<float*>("sum_excl", sum_excl);
  args.target_logit = pointer<float*>("target_logit", target_logit);
  args.num_rows = extent("num_rows", num_rows);
  args.vocab = extent("vocab", vocab);
  args.width = extent("width", width);
  args.num_splits = extent("num_splits", num_splits, kMaxGridY);
  args.vocab_per_split = extent("vocab_per_split", vocab_per_split);
  if (vocab_per_split % kVocabBlock != 0) {
    invalid("vocab_per_split must be a multiple of " + std::to_string(kVocabBlock) + ", got " +
            std::to_string(vocab_per_split));
  }
  // Every split non-empty and together covering the vocabulary (see vocab_split).
  if ((num_splits - 1) * vocab_per_split >= vocab || num_splits * vocab_per_split < vocab) {
    invalid("num_splits = " + std::to_string(num_splits) + " splits of vocab_per_split = " +
            std::to_string(vocab_per_split) + " must cover vocab = " + std::to_string(vocab) +
            " with none empty (use vocab_split)");
  }
  args.dtype = dtype_of(dtype);
  const LaunchContext ctx = context(device, stream);
  launch_linear_logprobs_forward(args, ctx);
}

void linear_logprobs_backward(std::uintptr_t hidden, std::uintptr_t weight, std::uintptr_t bias,
                              std::uintptr_t targets, std::uintptr_t lse, std::uintptr_t miss,
                              std::uintptr_t grad_logp, std::uintptr_t d_hidden,
                              std::uintptr_t d_weight, std::uintptr_t d_bias, int64_t num_rows,
                              int64_t vocab, int64_t width, int dtype, int64_t device,
                              std::uintptr_t stream) {
  BackwardArgs args{};
  args.hidden = pointer<const void*>("hidden", hidden);
  args.weight = pointer<const void*>("weight", weight);
  args.bias = optional_pointer<const void*>(bias);
  args.targets = pointer<const int64_t*>("targets", targets);
  args.lse = pointer<const float*>("lse", lse);
  args.miss = pointer<const float*>("miss", miss);
  args.grad_logp = pointer<const float*>("grad_logp", grad_logp);
  args.d_hidden = optional_pointer<float*>(d_hidden);
  args.d_weight = optional_pointer<float*>(d_weight);
  args.d_bias = optional_pointer<float*>(d_bias);
  if (d_hidden == 0 && d_weight == 0 && d_bias == 0) {
    invalid("d_hidden, d_weight and d_bias are all null: request at least one gradient");
  }
  if (d_bias != 0 && bias == 0) invalid("d_bias is requested but bias is null (no bias to differentiate)");
  args.num_rows = extent("num_rows", num_rows);
  args.vocab = extent("vocab", vocab, kMaxGridY * kVocabBlock);
  args.width = extent("width", width);
  args.dtype = dtype_of(dtype);
  const LaunchContext ctx = context(device, stream);
  launch_linear_logprobs_backward(args, ctx);
}

void preference_pair_loss(std::uintptr_t token_logp, std::uintptr_t cu_seqlens,
                          std::uintptr_t lengths, std::uintptr_t chosen_index,
                          std::uintptr_t rejected_index, std::uintptr_t reference_logps,
                          std::uintptr_t weights, std::uintptr_t averages,
                          std::uintptr_t chosen_tokens, std::uintptr_t sequence_logps,
                          std::uintptr_t parts, std::uintptr_t token_grad, int64_t num_pairs,
                          double beta, double label_smoothing, double simpo_gamma, int64_t device,
                          std::uintptr_t stream) {
  PairLossArgs args{};
  args.token_logp = pointer<const float*>("token_logp", token_logp);
  args.cu_seqlens = pointer<const int64_t*>("cu_seqlens", cu_seqlens);
  args.lengths = pointer<const int64_t*>("lengths", lengths);
  args.chosen_index = pointer<const int64_t*>("chosen_index", chosen_index);
  args.rejected_index = pointer<const int64_t*>("rejected_index", rejected_index);
  args.reference_logps = optional_pointer<const float*>(reference_logps);
  args.weights = pointer<const float*>("weights", weights);
  args.averages = pointer<const int32_t*>("averages", averages);
  args.chosen_tokens = pointer<const float*>("chosen_tokens", chosen_tokens);
  args.sequence_logps = pointer<float*>("sequence_logps", sequence_logps);
  args.parts = pointer<float*>("parts", parts);
  args.token_grad = pointer<float*>("token_grad", token_grad);
  args.num_pairs = extent("num_pairs", num_pairs);
  args.beta = positive("beta", beta);
  if (!(label_smoothing >= 0.0 && label_smoothing < 0.5)) {
    invalid("label_smoothing must lie in [0, 0.5), got " + std::to_string(label_smoothing));
  }
  args.label_smoothing = static_cast<float>(label_smoothing);
  args.simpo_gamma = finite("simpo_gamma", simpo_gamma);
  const LaunchContext ctx = context(device, stream);
  launch_preference_pair_loss(args, ctx);
}

void kto_loss(std::uintptr_t token_logp, std::uintptr_t cu_seqlens, std::uintptr_t lengths,
              std::uintptr_t desirable, std::uintptr_t reference_logps, std::uintptr_t kl,
              std::uintptr_t sequence_logps, std::uintptr_t parts, std::uintptr_t token_grad,
              int64_t num_sequences, double beta, double desirable_weight,
              double undesirable_weight, bool average, int64_t device, std::uintptr_t stream) {
  KtoLossArgs args{};
  args.token_logp = pointer<const float*>("token_logp", token_logp);
  args.cu_seqlens = pointer<const int64_t*>("cu_seqlens", cu_seqlens);
  args.lengths = pointer<const int64_t*>("lengths", lengths);
  args.desirable = pointer<const uint8_t*>("desirable", desirable);
  args.reference_logps = pointer<const float*>("reference_logps", reference_logps);
  args.kl = pointer<const float*>("kl", kl);
  args.sequence_logps = pointer<float*>("sequence_logps", sequence_logps);
  args.parts = pointer<float*>("parts", parts);
  args.token_grad = pointer<float*>("token_grad", token_grad);
  args.num_sequences = extent("num_sequences", num_sequences);
  args.beta = positive("beta", beta);
  args.desirable_weight = positive("desirable_weight", desirable_weight);
  args.undesirable_weight = positive("undesirable_weight", undesirable_weight);
  args.average = average;
  const LaunchContext ctx = context(device, stream);
  launch_kto_loss(args, ctx);
}

}  // namespace
}  // namespace fastpref

PYBIND11_MODULE(_C, m) {
  using namespace fastpref;
  m.doc() = "fastpref CUDA kernels (raw-pointer interface; see csrc/README.md)";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("ROW_BLOCK") = kRowBlock;
  m.attr("VOCAB_BLOCK") = kVocabBlock;
  m.attr("NUM_PAIRED_LOSS_TYPES") = kNumPairedLossTypes;

  // Launchers release the GIL: they only validate and enqueue work.
  const auto release = py::call_guard<py::gil_scoped_release>();

  m.def("vocab_split", &vocab_split, py::kw_only(), py::arg("vocab"), py::arg("splits_wanted"),
        "(num_splits, vocab_per_split) for the forward: whole tiles per split, none empty.");

  m.def("linear_logprobs_forward", &linear_logprobs_forward, py::kw_only(),
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"),
        py::arg("row_max"), py::arg("sum_excl"), py::arg("target_logit"), py::arg("num_rows"),
        py::arg("vocab"), py::arg("width"), py::arg("num_splits"), py::arg("vocab_per_split"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), release,
        "Per-split online-softmax partials [num_splits, num_rows] (float32) of z = h W^T (+ b).");

  m.def("linear_logprobs_backward", &linear_logprobs_backward, py::kw_only(),
        py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("targets"), py::arg("lse"),
        py::arg("miss"), py::arg("grad_logp"), py::arg("d_hidden"), py::arg("d_weight"),
        py::arg("d_bias"), py::arg("num_rows"), py::arg("vocab"), py::arg("width"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), release,
        "Adds the requested float32 gradients (null pointer: not requested) with atomics.");

  m.def("preference_pair_loss", &preference_pair_loss, py::kw_only(),
        py::arg("token_logp"), py::arg("cu_seqlens"), py::arg("lengths"),
        py::arg("chosen_index"), py::arg("rejected_index"), py::arg("reference_logps"),
        py::arg("weights"), py::arg("averages"), py::arg("chosen_tokens"),
        py::arg("sequence_logps"), py::arg("parts"), py::arg("token_grad"), py::arg("num_pairs"),
        py::arg("beta"), py::arg("label_smoothing"), py::arg("simpo_gamma"), py::arg("device"),
        py::arg("stream"), release,
        "Fused paired preference loss: parts [9, P], sequence log-probs [S], token gradient [N].");

  m.def("kto_loss", &kto_loss, py::kw_only(),
        py::arg("token_logp"), py::arg("cu_seqlens"), py::arg("lengths"), py::arg("desirable"),
        py::arg("reference_logps"), py::arg("kl"), py::arg("sequence_logps"), py::arg("parts"),
        py::arg("token_grad"), py::arg("num_sequences"), py::arg("beta"),
        py::arg("desirable_weight"), py::arg("undesirable_weight"), py::arg("average"),
        py::arg("device"), py::arg("stream"), release,
        "Fused KTO loss: parts [1, S], sequence log-probs [S], token gradient [N].");
}
