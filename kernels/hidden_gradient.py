"""The backward's hidden gradient, accumulated over vocabulary slabs without a float32 [N, H] buffer.

Per slab s of the vocabulary (columns [c0, c0 + Vs)), with dz the slab's logit gradient [N, Vs]:

    d_hidden += dz W_s        (W_s = W[c0 : c0 + Vs], [Vs, H])

The product is a GEMM (K = Vs) accumulated in float32 registers. Summing the slabs' products in
a float32 [N, H] buffer would cost 4NH bytes: 256 MiB at N = 16,384, H = 4,096, more than the 1%
of the materialized baseline's memory that the whole backward may take. For half-precision inputs
the running sum is instead held as an unevaluated pair

    d_hidden = hi + lo,   hi in the inputs' dtype (the gradient returned),  lo in bfloat16,

and each tile's epilogue does, in float32,

    s  = hi + lo + (dz W_s)_tile,    hi <- round(s),    lo <- round_bf16(s - hi).

s - hi is exact in float32, so the pair carries about 16 significant bits (19 for a float16 hi)
from slab to slab: the returned hi is the float32-accumulated sum rounded once, up to about 2^-17
of the running partial sum per slab, far below that final rounding unless partial sums cancel;
a plain half-precision running sum would add a full rounding (2^-9) per slab. lo costs 2NH bytes
(128 MiB at that shape). Float32 inputs accumulate straight into their float32 d_hidden (no lo).

Programs are rasterised in groups of GROUP_N row blocks that share a tile of W_s (read from L2).
"""
import torch
import triton
import triton.language as tl

from .grouped_tiles import grouped_tile


@triton.jit
def _accumulate_hidden_gradient_kernel(
    dz_ptr, weight_ptr, hi_ptr, lo_ptr,
    num_rows, slab_columns, width, slab_start, dz_row_stride,
    HAS_LO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block, col_block = grouped_tile(tl.program_id(0), num_rows, width, BLOCK_N, BLOCK_H, GROUP_N)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col_block.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < num_rows
    col_mask = cols < width
    acc = tl.zeros((BLOCK_N, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, slab_columns, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < slab_columns
        dz = tl.load(dz_ptr + rows[:, None] * dz_row_stride + k[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + (slab_start + k.to(tl.int64))[:, None] * width + cols[None, :],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            dz = dz.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dz, w, acc, input_precision=DOT_PRECISION)

    offsets = rows[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    total = acc + tl.load(hi_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_LO:
        total += tl.load(lo_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    rounded = total.to(hi_ptr.dtype.element_ty)
    tl.store(hi_ptr + offsets, rounded, mask=mask)
    if HAS_LO:
        tl.store(lo_ptr + offsets, (total - rounded.to(tl.float32)).to(lo_ptr.dtype.element_ty), mask=mask)


def accumulate_hidden_gradient(dz, weight, slab_start, d_hidden, d_hidden_low, *,
                               block_n, block_h, block_k, group_n, num_warps, num_stages, upcast):
    """d_hidden (+ d_hidden_low) += dz @ weight[slab_start : slab_start + dz.shape[1]].

    dz: [N, Vs] (rows may be strided); d_hidden: [N, H] contiguous, the running sum's rounded
    part; d_hidden_low: [N, H] contiguous, its remainder (dtype backends.low_part_dtype), or None for
    float32 d_hidden.
    """
    num_rows, width = d_hidden.shape
    grid = (triton.cdiv(num_rows, block_n) * triton.cdiv(width, block_h),)
    _accumulate_hidden_gradient_kernel[grid](
        dz, weight, d_hidden, d_hidden if d_hidden_low is None else d_hidden_low,
        num_rows, dz.shape[1], width, slab_start, dz.stride(0),
        HAS_LO=d_hidden_low is not None, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_K=block_k,
        GROUP_N=group_n, UPCAST=upcast,
        DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
