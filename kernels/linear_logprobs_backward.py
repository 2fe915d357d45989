"""Backward of the fused linear log-prob op, one [BLOCK_N x BLOCK_V] tile per program.

Each program recomputes its tile of logits from the saved log-sum-exp, forms

    dz_{n,v} = g_n (1[v = t_n] - exp(z_{n,v} - lse_n))

in registers (on the target column as g_n miss_n, the forward's 1 - p_t free of cancellation), and adds its share of every requested gradient with float32 atomics:

    d_hidden[n]  += dz[n, :] @ W[v-block]        (2 * BLOCK_N * BLOCK_V * H FLOPs)
    d_weight[v]  += dz[:, v]^T @ h[n-block]      (only when the weight is trainable)
    d_bias[v]    += sum_n dz[n, v]

A frozen head therefore costs 4NHV in the backward (recompute + d_hidden) and a trainable one
6NHV. Float32 atomics make the summation order, and so the last bits, run-dependent.
"""
import torch
import triton
import triton.language as tl

from ..backends import GradientBuffers
from .logits_tile import logits_tile


@triton.jit
def _backward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, miss_ptr, grad_ptr,
    d_hidden_ptr, d_weight_ptr, d_bias_ptr,
    num_rows, vocab, width,
    HAS_BIAS: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < num_rows
    col_mask = cols < vocab
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width,
                    HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    miss = tl.load(miss_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    p = tl.where(row_mask[:, None] & col_mask[None, :], tl.exp(z - lse[:, None]), 0.0)
    dz = g[:, None] * tl.where(cols[None, :] == targets[:, None], miss[:, None], -p)

    if NEED_BIAS:
        tl.atomic_add(d_bias_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")

    dz_operand = dz.to(hidden_ptr.dtype.element_ty)
    if UPCAST:
        dz_operand = dz_operand.to(tl.float32)
    for k0 in range(0, width, BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        k_mask = k < width
        if NEED_HIDDEN:
            w = tl.load(weight_ptr + cols[:, None] * width + k[None, :],
                        mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            d_h = tl.dot(dz_operand, w, input_precision=DOT_PRECISION)
            tl.atomic_add(d_hidden_ptr + rows[:, None] * width + k[None, :], d_h,
                          mask=row_mask[:, None] & k_mask[None, :], sem="relaxed")
        if NEED_WEIGHT:
            h = tl.load(hidden_ptr + rows[:, None] * width + k[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            d_w = tl.dot(tl.trans(dz_operand), h, input_precision=DOT_PRECISION)
            tl.atomic_add(d_weight_ptr + cols[:, None] * width + k[None, :], d_w,
                          mask=col_mask[:, None] & k_mask[None, :], sem="relaxed")


def linear_logprobs_backward(hidden, weight, bias, targets, lse, miss, grad_logp, *,
                             need_hidden, need_weight, need_bias,
                             block_n, block_v, block_h, num_warps, num_stages, upcast):
    """Returns (d_hidden, d_weight, d_bias), each None unless requested, in its input's dtype."""
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    grads = GradientBuffers.zeros(hidden, weight, need_hidden, need_weight, need_bias)
    unused = lse  # any float32 tensor stands in for a pointer the kernel never touches
    grid = (triton.cdiv(num_rows, block_n), triton.cdiv(vocab, block_v))
    _backward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, targets, lse, miss,
        grad_logp.float().contiguous(),
        unused if grads.d_hidden is None else grads.d_hidden,
        unused if grads.d_weight is None else grads.d_weight,
        unused if grads.d_bias is None else grads.d_bias,
        num_rows, vocab, width,
        HAS_BIAS=bias is not None, NEED_HIDDEN=need_hidden, NEED_WEIGHT=need_weight,
        NEED_BIAS=need_bias,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return grads.in_input_dtypes(hidden, weight, bias)
