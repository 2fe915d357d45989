// Compensated accumulation of the hidden gradient in half precision, without a float32 [N, H].
//
// The backward adds one float32 product p = dz W_slab per vocabulary slab into d_hidden. With
// hi = d_hidden in the inputs' dtype (float16 or bfloat16) and lo a bfloat16 compensation buffer,
// both zero at the start, each element does
//
//     s = hi + lo + p          (in float32)
//     hi = round_T(s)
//     lo = round_bf16(s - hi)  (the rounding error of hi, exact in float32)
//
// so hi + lo carries 8 more significant bits than hi alone, and hi ends as the float32 sum
// rounded about once: plain half-precision accumulation over k slabs would round k times.
// Every element belongs to one thread: no atomics.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace fastpref {
namespace {

template <typename T>
__global__ void __launch_bounds__(kAccumulateThreads)
compensated_accumulate_kernel(const float* __restrict__ product, T* __restrict__ hi,
                              __nv_bfloat16* __restrict__ lo, int64_t count) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kAccumulateThreads + threadIdx.x;
  if (i >= count) return;
  const float sum = to_float(hi[i]) + to_float(lo[i]) + product[i];
  const T rounded = from_float<T>(sum);
  hi[i] = rounded;
  lo[i] = from_float<__nv_bfloat16>(sum - to_float(rounded));
}

template <typename T>
void launch(const CompensatedAccumulateArgs& args, const LaunchContext& ctx) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.count, kAccumulateThreads));
  compensated_accumulate_kernel<T><<<blocks, kAccumulateThreads, 0, as_stream(ctx)>>>(
      args.product, static_cast<T*>(args.hi), static_cast<__nv_bfloat16*>(args.lo), args.count);
  check_launch("compensated_accumulate_kernel");
}

}  // namespace

void launch_compensated_accumulate(const CompensatedAccumulateArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  switch (args.dtype) {
    case DType::kFloat16:
      return launch<__half>(args, ctx);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(args, ctx);
    default:
      throw std::invalid_argument("dtype: compensated accumulation is for float16 and bfloat16, got code " +
                                  std::to_string(static_cast<int>(args.dtype)));
  }
}

}  // namespace fastpref
