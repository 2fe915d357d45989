"""One [BLOCK_N x BLOCK_V] tile of logits z = h W^T (+ b), accumulated in float32, and the logit
transform (fastpref.logit_transform) with its slope.

Two ways to feed the tile: pointer loads with masks (`logits_tile`, every architecture), or tensor
descriptors (`logits_tile_from_descriptors`: on sm_90 the loads become TMA copies into shared
memory, cp.async.bulk.tensor, and the out-of-bounds rows and columns of a ragged tile arrive as
zeros without masks). Both give the same float32 sums in the same K order."""
import os

import triton
import triton.language as tl

from .scalar_math import tanh

# Triton's CPU interpreter multiplies bfloat16 bit patterns in tl.dot instead of their values:
# when interpreting, operands are upcast to float32 before every dot.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr,
    rows, row_mask, cols, col_mask, width,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """rows and cols are int64 index vectors (no 32-bit overflow for N*H or V*H >= 2^31)."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        k_mask = k < width
        h = tl.load(hidden_ptr + rows[:, None] * width + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_t = tl.load(weight_ptr + cols[None, :] * width + k[:, None],
                      mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w_t = w_t.to(tl.float32)
        z = tl.dot(h, w_t, z, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def logits_tile_from_descriptors(
    hidden_desc, weight_desc, bias_ptr,
    row_start, col_start, cols, col_mask, width,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The tile of rows [row_start, row_start + BLOCK_N) and weight rows [col_start, col_start +
    BLOCK_V) through descriptors of block shapes [BLOCK_N, BLOCK_H] and [BLOCK_V, BLOCK_H];
    cols / col_mask (int64 indices of the weight's rows) pick the bias."""
    z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, width, BLOCK_H):
        h = hidden_desc.load([row_start, k0])
        w = weight_desc.load([col_start, k0])
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        z = tl.dot(h, w.T, z, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def transform_logits(x, pre, post, HAS_SOFTCAP: tl.constexpr):
    """z = post tanh(pre x) under a soft cap, pre x without."""
    if HAS_SOFTCAP:
        return post * tanh(pre * x)
    return pre * x


@triton.jit
def soft_cap_slope(z, pre, post):
    """dz/dx at logits z under a soft cap: pre post (1 - tanh^2), tanh = z / post. From z rather than
    from x (4e / (1 + e)^2, as the torch and CUDA backends take it) because x would stay live beside
    z and the 128-row backward tiles would spill (the compile gate); where the cap is flat,
    |x pre| > 4, this keeps fewer digits of a slope that is below 1e-3 there."""
    tanh_value = z / post
    return pre * post * (1.0 - tanh_value * tanh_value)
