"""Backward of the fused linear log-prob op over vocabulary slabs, without atomics.

The vocabulary is cut into slabs of Vs columns (Vs from the scratch budget), each spanning all
N rows. Per slab, one fused kernel recomputes the slab's logits tile by tile (x = h W^T + b,
transformed to z), and writes from the saved log-sum-exp, in its epilogue, the gradient with
respect to x (J = dz/dx the transform's slope, p = exp(z - lse), g = dL/dlogp):

    dz_{n,v} = J_{n,v} g_n (1[v = t_n] - p_{n,v})        (on the target column: g_n miss_n,
                                                          the forward's 1 - p_t, no cancellation)

and, when the entropy's gradient g^H is wanted (constexpr), its term
-J g^H_n p_{n,v} (log p_{n,v} + entropy_n) beside it, into a [N, Vs] scratch (the inputs' dtype:
bf16 for a bf16 head). Then two GEMMs:

    d_weight[slab] = dz^T h      K = N: every row of the slab's weight gradient is complete after
                                 one GEMM (cuBLAS) and is written once, in the weight's dtype
    d_hidden      += dz W_slab   kernels/hidden_gradient.py: summed across slabs as the inputs'
                                 dtype plus a bfloat16 remainder
    d_bias[slab]   = sum_n dz    from the kernel's per-row-block column sums of the unrounded dz

so nothing is added twice to the same address from different programs: the result does not
depend on scheduling, and the time goes to matmuls (2 N H V each) instead of read-modify-writes.
FLOPs: recompute 2NHV, d_hidden 2NHV, d_weight 2NHV (when the head is trainable).

Programs are rasterised in groups of GROUP_N row blocks, so that the row blocks sharing a vocabulary
tile run together and its weight rows are read from L2 rather than HBM.
"""
import torch
import triton
import triton.language as tl

from .grouped_tiles import grouped_tile
from .logits_tile import logits_tile, soft_cap_slope, transform_logits


@triton.jit
def logit_gradient_tile(x, rows, row_mask, cols, targets_ptr, lse_ptr, miss_ptr, grad_ptr, entropy_ptr,
                        grad_entropy_ptr, pre, post, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr):
    """dz (float32) of the logit tile x (before the transform) at rows x cols: the module's epilogue,
    shared by the slab kernel and the persistent one (kernels/persistent_logit_gradient.py)."""
    z = transform_logits(x, pre, post, HAS_SOFTCAP)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    miss = tl.load(miss_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    is_target = cols[None, :] == targets[:, None]
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if HAS_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        # 0 where p is (a logit of -inf), not 0 (-inf)
        entropy_term = tl.where(p > 0, g_entropy[:, None] * p * (log_p + entropy[:, None]), 0.0)
        dz = tl.where(is_target, g[:, None] * miss[:, None], -g[:, None] * p) - entropy_term
    else:
        dz = g[:, None] * tl.where(is_target, miss[:, None], -p)
    if HAS_SOFTCAP:
        dz = dz * soft_cap_slope(z, pre, post)
    else:
        dz = dz * pre
    return dz


@triton.jit
def store_bias_gradient_sums(dz, row_mask, local_cols, col_mask, bias_grad_ptr, row_block, bias_grad_row_stride):
    """The row block's column sums of the unrounded dz, at its row of the partial sums (summed over
    row blocks on the host)."""
    column_sums = tl.sum(tl.where(row_mask[:, None], dz, 0.0), axis=0)
    tl.store(bias_grad_ptr + row_block.to(tl.int64) * bias_grad_row_stride + local_cols, column_sums, mask=col_mask)


@triton.jit
def _logit_gradient_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, miss_ptr, grad_ptr, entropy_ptr, grad_entropy_ptr,
    dz_ptr, bias_grad_ptr,
    num_rows, slab_columns, width, slab_start, dz_row_stride, bias_grad_row_stride, pre, post,
    HAS_BIAS: tl.constexpr, NEED_BIAS_GRAD: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block, col_block = grouped_tile(tl.program_id(0), num_rows, slab_columns, BLOCK_N, BLOCK_V, GROUP_N)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    local_cols = col_block.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < num_rows
    col_mask = local_cols < slab_columns
    cols = slab_start + local_cols
    x = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
    dz = logit_gradient_tile(x, rows, row_mask, cols, targets_ptr, lse_ptr, miss_ptr, grad_ptr, entropy_ptr,
                             grad_entropy_ptr, pre, post, HAS_SOFTCAP, HAS_ENTROPY_GRAD)
    tl.store(dz_ptr + rows[:, None] * dz_row_stride + local_cols[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
    if NEED_BIAS_GRAD:
        store_bias_gradient_sums(dz, row_mask, local_cols, col_mask, bias_grad_ptr, row_block, bias_grad_row_stride)


def logit_gradient(hidden, weight, bias, targets, lse, miss, grad, dz, slab_start, bias_grad_partial=None,
                   entropy=None, grad_entropy=None, *, pre, post, softcap,
                   block_n, block_v, block_h, group_n, num_warps, num_stages, upcast):
    """Fill dz [N, Vs] (a view whose rows may be strided) with the logits' gradient of one slab,
    and, when given, bias_grad_partial [cdiv(N, block_n), Vs] (float32, rows may be strided) with
    each row block's column sums of dz before its rounding to dz's dtype (their sum over row blocks
    is the slab's d_bias). entropy and grad_entropy ([N] float32): the entropy term, when given.
    pre, post, softcap: the logit transform (fastpref.logit_transform)."""
    num_rows, width = hidden.shape
    columns = dz.shape[1]
    grid = (triton.cdiv(num_rows, block_n) * triton.cdiv(columns, block_v),)
    has_entropy_grad = grad_entropy is not None
    _logit_gradient_kernel[grid](
        hidden, weight, hidden if bias is None else bias, targets, lse, miss, grad,
        entropy if has_entropy_grad else lse, grad_entropy if has_entropy_grad else grad, dz,
        lse if bias_grad_partial is None else bias_grad_partial,
        num_rows, columns, width, slab_start, dz.stride(0),
        0 if bias_grad_partial is None else bias_grad_partial.stride(0), pre, post,
        HAS_BIAS=bias is not None, NEED_BIAS_GRAD=bias_grad_partial is not None, HAS_SOFTCAP=softcap,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP_N=group_n,
        UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
