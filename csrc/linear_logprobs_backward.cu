// Backward of the fused linear log-prob op, one [kRowBlock x kVocabBlock] tile per block.
//
// Each block recomputes its tile of logits, forms from the saved log-sum-exp
//
//     dz_{n,v} = g_n (1[v = t_n] - exp(z_{n,v} - lse_n))
//
// (on the target column as g_n miss_n, the forward's 1 - p_t free of cancellation) and adds its
// share of every requested gradient with float32 atomics:
//
//     d_hidden[n] += dz[n, :] W[v-block]        (tensor cores for 16-bit inputs)
//     d_weight[v] += dz[:, v]^T h[n-block]      (only when requested: a frozen head does none)
//     d_bias[v]   += sum_n dz[n, v]
//
// dz enters the products in the inputs' dtype, as in the Triton backend. The atomics make the
// summation order, and so the last bits of the gradients, run-dependent; everything else is
// deterministic.
#include <cmath>

#include "logits_tile.cuh"

namespace fastpref {
namespace {

// Shared-memory plan. dz stays for the whole gradient loop; the scratch space after it first
// holds the logits tile, then per hidden chunk the weight chunk (for d_hidden), the hidden chunk
// (for d_weight) and the float32 product on its way to the atomics.
template <typename T>
struct BackwardSmem {
  // Hidden columns per gradient step: float32 halves it to stay near the 16-bit types' footprint.
  static constexpr int kChunk = sizeof(T) == 4 ? 32 : 64;
  static constexpr int kDzLd = kVocabBlock + kSmemPad<T>;
  static constexpr int kChunkLd = kChunk + kSmemPad<T>;
  static constexpr int kProductLd = kChunk + 4;  // WMMA float32 stores need ld % 4 == 0
  static constexpr size_t kDzBytes = align_smem(sizeof(T) * kRowBlock * kDzLd);
  static constexpr size_t kWeightChunkBytes = align_smem(sizeof(T) * kVocabBlock * kChunkLd);
  static constexpr size_t kHiddenChunkBytes = align_smem(sizeof(T) * kRowBlock * kChunkLd);
  // Sized for the larger product, d_weight's [kVocabBlock x kChunk].
  static constexpr size_t kProductBytes = align_smem(sizeof(float) * kVocabBlock * kProductLd);
  static constexpr size_t kGradientBytes = kWeightChunkBytes + kHiddenChunkBytes + kProductBytes;
  static constexpr size_t kScratchBytes = LogitsTileSmem<T>::kBytes > kGradientBytes
                                              ? LogitsTileSmem<T>::kBytes
                                              : kGradientBytes;
  static constexpr size_t kBytes = kDzBytes + kScratchBytes;

  static_assert(sizeof(T) == 4 || (kDzLd % 8 == 0 && kChunkLd % 8 == 0),
                "WMMA 16-bit operands need ld % 8 == 0");
  static_assert(kProductLd % 4 == 0, "WMMA float32 stores need ld % 4 == 0");

  __device__ static T* dz(unsigned char* base) { return reinterpret_cast<T*>(base); }
  __device__ static unsigned char* scratch(unsigned char* base) { return base + kDzBytes; }
  __device__ static T* weight_chunk(unsigned char* base) { return reinterpret_cast<T*>(scratch(base)); }
  __device__ static T* hidden_chunk(unsigned char* base) {
    return reinterpret_cast<T*>(scratch(base) + kWeightChunkBytes);
  }
  __device__ static float* product(unsigned char* base) {
    return reinterpret_cast<float*>(scratch(base) + kWeightChunkBytes + kHiddenChunkBytes);
  }
};

// dst[row0 + r, col0 + c] += tile[r][c] for rows < row_end and columns < width, dst row-major
// [*, width] float32. Consecutive threads take consecutive columns: coalesced atomics.
template <int ROWS, int COLS>
__device__ __forceinline__ void atomic_add_tile(float* __restrict__ dst, int64_t width,
                                                const float* __restrict__ tile, int ld,
                                                int64_t row0, int64_t row_end, int64_t col0) {
  for (int e = threadIdx.x; e < ROWS * COLS; e += kGemmThreads) {
    const int r = e / COLS;
    const int c = e % COLS;
    const int64_t row = row0 + r;
    const int64_t col = col0 + c;
    if (row < row_end && col < width) atomicAdd(dst + row * width + col, tile[r * ld + c]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kGemmThreads)
linear_logprobs_backward_kernel(const T* __restrict__ hidden, const T* __restrict__ weight,
                                const T* __restrict__ bias, const int64_t* __restrict__ targets,
                                const float* __restrict__ lse, const float* __restrict__ miss,
                                const float* __restrict__ grad_logp, float* __restrict__ d_hidden,
                                float* __restrict__ d_weight, float* __restrict__ d_bias,
                                int64_t num_rows, int64_t vocab, int64_t width) {
  using Smem = BackwardSmem<T>;
  using Tile = LogitsTileSmem<T>;
  constexpr int kChunk = Smem::kChunk;
  // The dynamic region's base is only guaranteed 16-byte aligned: the launch asks for
  // kSmemAlign extra bytes and the plan starts at the first kSmemAlign boundary.
  extern __shared__ unsigned char dynamic_smem[];
  const uintptr_t misalignment = reinterpret_cast<uintptr_t>(dynamic_smem) % kSmemAlign;
  unsigned char* smem = dynamic_smem + (misalignment == 0 ? 0 : kSmemAlign - misalignment);
  __shared__ float row_grad[kRowBlock];
  __shared__ float row_lse[kRowBlock];
  __shared__ float row_miss[kRowBlock];
  __shared__ int64_t row_target[kRowBlock];

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowBlock;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kVocabBlock;
  const bool hidden_vector_ok = vector_loadable(hidden, width);
  const bool weight_vector_ok = vector_loadable(weight, width);

  // Per-row inputs, read once per block. Rows past num_rows get g = 0 and are masked below too.
  // They are read after compute_logits_tile, whose closing __syncthreads() publishes them.
  if (threadIdx.x < kRowBlock) {
    const int64_t row = row0 + threadIdx.x;
    const bool valid = row < num_rows;
    row_grad[threadIdx.x] = valid ? grad_logp[row] : 0.0f;
    row_lse[threadIdx.x] = valid ? lse[row] : 0.0f;
    row_miss[threadIdx.x] = valid ? miss[row] : 0.0f;
    row_target[threadIdx.x] = valid ? targets[row] : -1;
  }

  unsigned char* scratch = Smem::scratch(smem);
  compute_logits_tile<T>(scratch, hidden, weight, bias, row0, num_rows, col0, vocab, width,
                         hidden_vector_ok, weight_vector_ok);

  // dz, in float32 over the logits (for the bias sums) and in T as the GEMM operand.
  float* dz_f32 = Tile::logits(scratch);
  T* dz = Smem::dz(smem);
  for (int e = threadIdx.x; e < kRowBlock * kVocabBlock; e += kGemmThreads) {
    const int r = e / kVocabBlock;
    const int c = e % kVocabBlock;
    const int64_t col = col0 + c;
    float& z = dz_f32[r * Tile::kLogitsLd + c];
    float value = 0.0f;
    if (row0 + r < num_rows && col < vocab) {
      value = row_grad[r] * (col == row_target[r] ? row_miss[r] : -expf(z - row_lse[r]));
    }
    z = value;
    dz[r * Smem::kDzLd + c] = from_float<T>(value);
  }
  __syncthreads();

  if (d_bias != nullptr) {
    for (int c = threadIdx.x; c < kVocabBlock; c += kGemmThreads) {
      const int64_t col = col0 + c;
      if (col < vocab) {
        float column_sum = 0.0f;
        for (int r = 0; r < kRowBlock; ++r) column_sum += dz_f32[r * Tile::kLogitsLd + c];
        atomicAdd(d_bias + col, column_sum);
      }
    }
  }
  if (d_hidden == nullptr && d_weight == nullptr) return;  // uniform across the block
  // The bias sums read the space the gradient loop reuses.
  __syncthreads();

  T* weight_chunk = Smem::weight_chunk(smem);
  T* hidden_chunk = Smem::hidden_chunk(smem);
  float* product = Smem::product(smem);
  for (int64_t k0 = 0; k0 < width; k0 += kChunk) {
    if (d_hidden != nullptr) {
      load_tile<T, kVocabBlock, kChunk, Smem::kChunkLd>(weight_chunk, weight, width, col0, vocab, k0,
                                                         weight_vector_ok);
    }
    if (d_weight != nullptr) {
      load_tile<T, kRowBlock, kChunk, Smem::kChunkLd>(hidden_chunk, hidden, width, row0, num_rows,
                                                       k0, hidden_vector_ok);
    }
    __syncthreads();

    if (d_hidden != nullptr) {
      // [rows x chunk] = dz [rows x vocab] . W[v-block, chunk] [vocab x chunk]
      BlockGemm<T, kRowBlock, kChunk, RowMajor, RowMajor> gemm;
      gemm.template mma<kVocabBlock>(dz, Smem::kDzLd, weight_chunk, Smem::kChunkLd);
      gemm.store(product, Smem::kProductLd);
      __syncthreads();
      atomic_add_tile<kRowBlock, kChunk>(d_hidden, width, product, Smem::kProductLd, row0, num_rows, k0);
      // The d_weight product below overwrites `product`.
      if (d_weight != nullptr) __syncthreads();
    }
    if (d_weight != nullptr) {
      // [vocab x chunk] = dz^T [vocab x rows] . h[n-block, chunk] [rows x chunk]; dz^T is dz
      // read as column-major.
      BlockGemm<T, kVocabBlock, kChunk, ColMajor, RowMajor> gemm;
      gemm.template mma<kRowBlock>(dz, Smem::kDzLd, hidden_chunk, Smem::kChunkLd);
      gemm.store(product, Smem::kProductLd);
      __syncthreads();
      atomic_add_tile<kVocabBlock, kChunk>(d_weight, width, product, Smem::kProductLd, col0, vocab, k0);
    }
    // The next step's loads overwrite the chunks and the product being read.
    __syncthreads();
  }
}

}  // namespace

void launch_linear_logprobs_backward(const BackwardArgs& args, const LaunchContext& ctx) {
  DeviceGuard guard(ctx.device);
  const dim3 grid(static_cast<unsigned>(ceil_div(args.num_rows, kRowBlock)),
                  static_cast<unsigned>(ceil_div(args.vocab, kVocabBlock)));
  dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr size_t smem_bytes = BackwardSmem<T>::kBytes + kSmemAlign;  // + base alignment
    // Above the 48 KiB default: opt in (sm_80+ allow up to 163 KiB per block).
    check_cuda(cudaFuncSetAttribute(linear_logprobs_backward_kernel<T>,
                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem_bytes)),
               "cudaFuncSetAttribute(linear_logprobs_backward_kernel)");
    linear_logprobs_backward_kernel<T><<<grid, kGemmThreads, smem_bytes, as_stream(ctx)>>>(
        static_cast<const T*>(args.hidden), static_cast<const T*>(args.weight),
        static_cast<const T*>(args.bias), args.targets, args.lse, args.miss, args.grad_logp,
        args.d_hidden, args.d_weight, args.d_bias, args.num_rows, args.vocab, args.width);
    check_launch("linear_logprobs_backward_kernel");
  });
}

}  // namespace fastpref
