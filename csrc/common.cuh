// Shared host and device helpers of the CUDA kernels: error checking, the device guard, dtype
// and flag dispatch, conversions, and warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "fastpref_ops.h"

namespace fastpref {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

// ---- Host: errors ---------------------------------------------------------------------------

// Turns a failed CUDA call into std::runtime_error (RuntimeError in Python) with CUDA's own
// name and description of the error, and what was being done.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ") in " + what);
  }
}

// A launch reports bad configurations (and earlier asynchronous faults) only through
// cudaGetLastError, so every launch is followed by this.
inline void check_launch(const char* kernel_name) {
  check_cuda(cudaGetLastError(), kernel_name);
}

// Makes `device` current for the launches in scope and restores the caller's device after, so
// tensors on any GPU work whatever device the calling thread had selected.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : device_(device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device_) check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  }
  ~DeviceGuard() {
    // Destructors must not throw; a failure here would already have failed the launch.
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = -1;
};

inline cudaStream_t as_stream(const LaunchContext& ctx) {
  return static_cast<cudaStream_t>(ctx.stream);
}

// ---- Host: dtype dispatch -------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the C++ element type of `dtype`.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(TypeTag<float>{});
      return;
    case DType::kFloat16:
      fn(TypeTag<__half>{});
      return;
    case DType::kBFloat16:
      fn(TypeTag<__nv_bfloat16>{});
      return;
  }
  throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Calls fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a template argument, so
// that every variant a launcher can pick is instantiated (and compiled by the gate).
template <typename Fn>
void dispatch_flag(bool flag, Fn&& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// ---- Device: conversions --------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round to nearest even, as torch's and Triton's casts do.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- Device: warp reductions ----------------------------------------------------------------
// Butterfly (xor) reductions: every lane ends with the same, bitwise identical, result.

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  }
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmaxf(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  }
  return value;
}

}  // namespace fastpref
