// Python bindings of the CUDA kernels: module fastpref._C.
//
// Every function takes raw device pointers (tensor.data_ptr(), 0 for "none"), shapes, a dtype
// code, the device ordinal and a stream handle (torch.cuda.current_stream().cuda_stream), all as
// keyword arguments. Arguments are validated here, on the host, before any CUDA call: a bad one
// raises ValueError naming it (std::invalid_argument). CUDA failures raise RuntimeError with the
// CUDA error string (std::runtime_error from the launchers). Launches are asynchronous.
#include <pybind11/pybind11.h>

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

// Numbers reach the kernels as float32: checked after the conversion, so that a finite double
// past float32's range (1e39) is rejected rather than turned into inf.
float positive(const char* name, double value) {
  const float converted = static_cast<float>(value);
  if (!(converted > 0.0f) || !std::isfinite(converted)) {
    invalid(std::string(name) + " must be a finite float32 number > 0, got " + std::to_string(value));
  }
  return converted;
}

float finite(const char* name, double value) {
  const float converted = static_cast<float>(value);
  if (!std::isfinite(converted)) {
    invalid(std::string(name) + " must be a finite float32 number, got " + std::to_string(value));
  }
  return converted;
}

// Optional pointers that come together: both given or both null.
void check_pair(const char* name, std::uintptr_t address, const char* partner, std::uintptr_t partner_address) {
  if ((address == 0) != (partner_address == 0)) {
    const bool missing = address == 0;
    invalid(std::string(missing ? name : partner) + " must be given with " + (missing ? partner : name) +
            " (both device pointers or both null), got null (0)");
  }
}

LogitTransformArgs logit_transform(double pre, double post, bool softcap) {
  return {finite("pre", pre), positive("post", post), softcap};
}

LaunchContext context(int64_t device, std::uintptr_t stream) {
  if (device < 0 || device > std::numeric_limits<int>::max()) {
    invalid("device must be a CUDA device ordinal >= 0, got " + std::to_string(device));
  }
  return {static_cast<int>(device), reinterpret_cast<void*>(stream)};
}

// A vocabulary slab [slab_start, slab_start + columns) inside [0, vocab).
void check_slab(int64_t num_rows, int64_t columns, int64_t slab_start, int64_t vocab) {
  extent("num_rows", num_rows);
  extent("vocab", vocab);
  extent("columns", columns, vocab);
  if (slab_start < 0 || slab_start > vocab - columns) {
    invalid("slab_start must lie in [0, vocab - columns] = [0, " + std::to_string(vocab - columns) +
            "], got " + std::to_string(slab_start));
  }
}

void slab_softmax_update(std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t targets,
                         std::uintptr_t row_max, std::uintptr_t sum_excl,
                         std::uintptr_t target_logit, std::uintptr_t sum_all, std::uintptr_t shifted,
                         std::uintptr_t sum_sq, std::uintptr_t logit_sum, std::uintptr_t max_before,
                         double pre, double post, bool softcap, int64_t num_rows, int64_t columns,
                         int64_t slab_start, int64_t vocab, int dtype, int64_t device,
                         std::uintptr_t stream) {
  SlabSoftmaxArgs args{};
  args.logits = pointer<const float*>("logits", logits);
  args.bias = optional_pointer<const void*>(bias);
  args.targets = pointer<const int64_t*>("targets", targets);
  args.state.row_max = pointer<float*>("row_max", row_max);
  args.state.sum_excl = pointer<float*>("sum_excl", sum_excl);
  args.state.target_logit = pointer<float*>("target_logit", target_logit);
  check_pair("sum_all", sum_all, "shifted", shifted);
  args.state.sum_all = optional_pointer<float*>(sum_all);
  args.state.shifted = optional_pointer<float*>(shifted);
  args.state.sum_sq = optional_pointer<float*>(sum_sq);
  args.state.logit_sum = optional_pointer<float*>(logit_sum);
  args.state.max_before = optional_pointer<float*>(max_before);
  args.transform = logit_transform(pre, post, softcap);
  check_slab(num_rows, columns, slab_start, vocab);
  args.num_rows = num_rows;
  args.columns = columns;
  args.slab_start = slab_start;
  args.dtype = dtype_of(dtype);
  const LaunchContext ctx = context(device, stream);
  launch_slab_softmax(args, ctx);
}

void slab_logit_gradient(std::uintptr_t logits, std::uintptr_t bias, std::uintptr_t targets,
                         std::uintptr_t lse, std::uintptr_t miss, std::uintptr_t grad_logp,
                         std::uintptr_t entropy, std::uintptr_t grad_entropy, std::uintptr_t dz,
                         bool float32_dz_into_logits, double pre, double post, bool softcap,
                         int64_t num_rows, int64_t columns, int64_t slab_start, int64_t vocab,
                         int dtype, int64_t device, std::uintptr_t stream) {
  SlabGradientArgs args{};
  args.logits = pointer<float*>("logits", logits);
  args.bias = optional_pointer<const void*>(bias);
  args.targets = pointer<const int64_t*>("targets", targets);
  args.lse = pointer<const float*>("lse", lse);
  args.miss = pointer<const float*>("miss", miss);
  args.grad_logp = pointer<const float*>("grad_logp", grad_logp);
  check_pair("entropy", entropy, "grad_entropy", grad_entropy);
  args.entropy = optional_pointer<const float*>(entropy);
  args.grad_entropy = optional_pointer<const float*>(grad_entropy);
  args.dz = pointer<void*>("dz", dz);
  args.float32_dz_into_logits = float32_dz_into_logits;
  args.transform = logit_transform(pre, post, softcap);
  check_slab(num_rows, columns, slab_start, vocab);
  args.num_rows = num_rows;
  args.columns = columns;
  args.slab_start = slab_start;
  args.dtype = dtype_of(dtype);
  const LaunchContext ctx = context(device, stream);
  launch_slab_logit_gradient(args, ctx);
}

void compensated_accumulate(std::uintptr_t product, std::uintptr_t hi, std::uintptr_t lo,
                            int64_t count, int dtype, int64_t device, std::uintptr_t stream) {
  CompensatedAccumulateArgs args{};
  args.product = pointer<const float*>("product", product);
  args.hi = pointer<void*>("hi", hi);
  args.lo = pointer<void*>("lo", lo);
  args.count = extent("count", count, kMaxGridX * kAccumulateThreads);
  args.dtype = dtype_of(dtype);
  if (args.dtype == DType::kFloat32) {
    invalid("dtype must be 1 (float16) or 2 (bfloat16): float32 gradients need no compensation, got 0");
  }
  const LaunchContext ctx = context(device, stream);
  launch_compensated_accumulate(args, ctx);
}

}  // namespace
}  // namespace fastpref

PYBIND11_MODULE(_C, m) {
  using namespace fastpref;
  m.doc() = "fastpref CUDA kernels (raw-pointer interface; see csrc/README.md)";

  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::kBFloat16);

  // Launchers release the GIL: they only validate and enqueue work.
  const auto release = py::call_guard<py::gil_scoped_release>();

  m.def("slab_softmax_update", &slab_softmax_update, py::kw_only(),
        py::arg("logits"), py::arg("bias"), py::arg("targets"), py::arg("row_max"),
        py::arg("sum_excl"), py::arg("target_logit"), py::arg("sum_all"), py::arg("shifted"),
        py::arg("sum_sq"), py::arg("logit_sum"), py::arg("max_before"), py::arg("pre"),
        py::arg("post"), py::arg("softcap"), py::arg("num_rows"), py::arg("columns"),
        py::arg("slab_start"), py::arg("vocab"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), release,
        "Updates the rows' online-softmax state [num_rows] (float32; the output sums where not 0) "
        "with one vocabulary slab's logits [num_rows, columns] (float32, bias not yet added), "
        "transformed by (pre, post, softcap).");

  m.def("slab_logit_gradient", &slab_logit_gradient, py::kw_only(),
        py::arg("logits"), py::arg("bias"), py::arg("targets"), py::arg("lse"), py::arg("miss"),
        py::arg("grad_logp"), py::arg("entropy"), py::arg("grad_entropy"), py::arg("dz"),
        py::arg("float32_dz_into_logits"), py::arg("pre"), py::arg("post"), py::arg("softcap"),
        py::arg("num_rows"), py::arg("columns"), py::arg("slab_start"), py::arg("vocab"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"), release,
        "Writes one vocabulary slab's logit gradient dz [num_rows, columns] in dtype (and in "
        "float32 over the logits when float32_dz_into_logits is true), with the entropy's term "
        "when entropy and grad_entropy are given.");

  m.def("compensated_accumulate", &compensated_accumulate, py::kw_only(),
        py::arg("product"), py::arg("hi"), py::arg("lo"), py::arg("count"), py::arg("dtype"),
        py::arg("device"), py::arg("stream"), release,
        "hi (dtype) + lo (bfloat16) += product (float32), element-wise with compensation.");
}
