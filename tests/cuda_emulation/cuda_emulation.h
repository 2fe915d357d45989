// A CPU stand-in for the parts of CUDA that the kernels in csrc/ use, so that a host C++ compiler
// builds them (build.py rewrites only launches and extern __shared__ declarations) and they run on
// CPU memory. It replaces cuda_runtime.h, cuda_fp16.h and cuda_bf16.h: no CUDA toolkit is needed.
// It holds only what csrc/ uses: kernel code that uses more fails to build until it is added here.
//
// Execution model: every CUDA thread of a block is an OS thread running the kernel's own code, so
// the threads of a block really run concurrently and the thread sanitizer can check their shared
// memory accesses. The blocks of a launch run one after another; a launch returns when it is done.
// __syncthreads() is a barrier of the block, a warp shuffle an exchange through a barrier of the
// warp, and __shared__ variables are static: one copy, seen by all threads of the running block.
//
// The hardware rules that CPU memory would not enforce are checked, and a violation becomes the
// error of the next cudaGetLastError(), which the launchers turn into a RuntimeError: launch
// configuration limits, dynamic shared memory beyond what cudaFuncSetAttribute allowed the kernel,
// full-warp shuffle masks. The dynamic shared
// memory region starts 16 bytes past a 128-byte boundary (CUDA promises only 16-byte alignment),
// and every block finds it filled with 0xff bytes (NaN as float), not what the last block left.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <latch>
#include <map>
#include <memory>
#include <new>
#include <system_error>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

using std::max;
using std::min;

// ---- Runtime API types ----------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorIllegalInstruction = 715,
  cudaErrorMisalignedAddress = 716,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- 16-bit floating-point types: storage plus the round-to-nearest-even conversions --------

struct __half {
  _Float16 value;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half x) { return static_cast<float>(x.value); }
inline __half __float2half_rn(float x) { return {static_cast<_Float16>(x)}; }
inline float __bfloat162float(__nv_bfloat16 x) {
  return std::bit_cast<float>(static_cast<uint32_t>(x.bits) << 16);
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  if (std::isnan(x)) return {static_cast<uint16_t>((bits >> 16) | 0x40)};  // stays a (quiet) NaN
  return {static_cast<uint16_t>((bits + 0x7fff + ((bits >> 16) & 1)) >> 16)};
}

// ---- Emulation state ------------------------------------------------------------------------

namespace cuda_emulation {

constexpr unsigned kWarpSize = 32;
constexpr int kDefaultDynamicSmem = 48 * 1024;
constexpr int kMaxDynamicSmem = 163 * 1024;  // sm_80, the oldest architecture the build targets

// What cudaGetErrorString() says: the cause of the last error returned.
inline const char* last_detail = "";

// A failing runtime call: returns `error`, having noted its cause.
inline cudaError_t fail(cudaError_t error, const char* detail) {
  last_detail = detail;
  return error;
}

// The first error of launches and device code since the last cudaGetLastError(), and its cause.
inline std::atomic<cudaError_t> pending_error{cudaSuccess};
inline std::atomic<const char*> pending_detail{""};

inline void report(cudaError_t error, const char* detail) {
  cudaError_t none = cudaSuccess;
  if (pending_error.compare_exchange_strong(none, error)) pending_detail = detail;
}

// Dynamic shared memory each kernel may use, as raised by cudaFuncSetAttribute.
inline std::map<const void*, int> dynamic_smem_limit;

struct Warp {
  std::barrier<> exchange{kWarpSize};
  float values[2][kWarpSize];  // alternate per shuffle, so that one barrier per shuffle suffices
};

struct Block {
  explicit Block(unsigned threads) : sync(threads), warps(threads / kWarpSize) {}
  std::barrier<> sync;
  std::vector<Warp> warps;
};

inline thread_local Block* this_block = nullptr;
inline thread_local unsigned shuffle_parity = 0;
inline unsigned char* dynamic_shared_memory = nullptr;

}  // namespace cuda_emulation

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;  // written only while every thread of the launch waits at a barrier

// ---- Runtime API ----------------------------------------------------------------------------

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  if (device == 0) return cudaSuccess;
  return cuda_emulation::fail(cudaErrorInvalidDevice, "the emulation has device 0 only");
}
inline cudaError_t cudaGetLastError() {
  const char* detail = cuda_emulation::pending_detail.exchange("");
  return cuda_emulation::fail(cuda_emulation::pending_error.exchange(cudaSuccess), detail);
}
inline const char* cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
  }
  return "unknown cudaError_t";
}
inline const char* cudaGetErrorString(cudaError_t) { return cuda_emulation::last_detail; }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > cuda_emulation::kMaxDynamicSmem) {
    return cuda_emulation::fail(cudaErrorInvalidValue,
                                "more shared memory than an sm_80 block can have");
  }
  cuda_emulation::dynamic_smem_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// ---- Device intrinsics ----------------------------------------------------------------------

inline void __syncthreads() { cuda_emulation::this_block->sync.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  using namespace cuda_emulation;
  if (mask != 0xffffffffu) {
    report(cudaErrorIllegalInstruction, "__shfl_xor_sync: only full-warp masks are emulated");
  }
  Warp& warp = this_block->warps[threadIdx.x / kWarpSize];
  float* values = warp.values[shuffle_parity ^= 1];
  const unsigned lane = threadIdx.x % kWarpSize;
  values[lane] = value;
  warp.exchange.arrive_and_wait();
  return values[(lane ^ static_cast<unsigned>(lane_mask)) % kWarpSize];
}

// ---- Launch ---------------------------------------------------------------------------------

namespace cuda_emulation {

// kernel<<<grid, block, dynamic_smem, stream>>>(...), with `run` calling the kernel.
template <typename Kernel, typename Run>
void launch(Kernel* kernel, dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t, Run run) {
  const unsigned threads = block.x;
  if (block.y != 1 || block.z != 1 || threads == 0 || threads > 1024 || threads % kWarpSize != 0 ||
      grid.x == 0 || grid.y == 0 || grid.y > 65535 || grid.z == 0 || grid.z > 65535) {
    report(cudaErrorInvalidConfiguration,
           "launch: bad grid or block (the emulation takes 1-D blocks of whole warps)");
    return;
  }
  const auto opt_in = dynamic_smem_limit.find(reinterpret_cast<const void*>(kernel));
  const int limit = opt_in == dynamic_smem_limit.end() ? kDefaultDynamicSmem : opt_in->second;
  if (dynamic_smem > static_cast<size_t>(limit)) {
    report(cudaErrorInvalidValue, "launch: more dynamic shared memory than the kernel was allowed");
    return;
  }
  // Exactly the requested bytes (so that the address sanitizer sees any overrun), starting 16
  // bytes past a 128-byte boundary.
  constexpr size_t kOffset = 16;
  const auto free_storage = [](unsigned char* p) { ::operator delete[](p, std::align_val_t(128)); };
  std::unique_ptr<unsigned char, decltype(free_storage)> storage(
      static_cast<unsigned char*>(::operator new[](dynamic_smem + kOffset, std::align_val_t(128))),
      free_storage);
  dynamic_shared_memory = storage.get() + kOffset;

  const size_t num_blocks = size_t{grid.x} * grid.y * grid.z;
  size_t next_block = 0;
  auto start_next_block = [&]() noexcept {
    blockIdx = {static_cast<unsigned>(next_block % grid.x),
                static_cast<unsigned>(next_block / grid.x % grid.y),
                static_cast<unsigned>(next_block / grid.x / grid.y)};
    ++next_block;
    std::memset(dynamic_shared_memory, 0xff, dynamic_smem);
  };
  start_next_block();
  std::barrier block_done(threads, start_next_block);
  Block state(threads);
  // The threads start together once all exist: if one cannot be created, the others would wait
  // for it at the first barrier forever.
  std::latch all_created(1);
  bool started = false;
  {
    std::vector<std::jthread> pool;
    try {
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          all_created.wait();
          if (!started) return;
          threadIdx = {t, 0, 0};
          this_block = &state;
          for (size_t b = 0; b < num_blocks; ++b) {
            run();
            block_done.arrive_and_wait();
          }
        });
      }
      started = true;
    } catch (const std::system_error&) {
      report(cudaErrorLaunchOutOfResources, "launch: could not start one thread per CUDA thread");
    }
    all_created.count_down();
  }
  dynamic_shared_memory = nullptr;
}

}  // namespace cuda_emulation
