"""Numerically careful scalar functions for the kernels, from exp and log alone.

Triton's core language has no log1p or expm1 (libdevice differs across versions and the CPU
interpreter), so they are built with Kahan's tricks, exact to a few ulps.
"""
import triton
import triton.language as tl


@triton.jit
def log1p(x):
    u = 1.0 + x
    safe = tl.where(u == 1.0, 2.0, u)
    return tl.where(u == 1.0, x, tl.log(safe) * x / (safe - 1.0))


@triton.jit
def expm1(x):
    u = tl.exp(x)
    safe = tl.where((u == 1.0) | (u == 0.0), 2.0, u)
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (safe - 1.0) * x / tl.log(safe)))


@triton.jit
def tanh(x):
    """tanh from expm1: accurate near 0 (no 1 - 1 cancellation) and exactly +-1 far out."""
    e = expm1(2.0 * tl.minimum(tl.abs(x), 20.0))
    t = e / (e + 2.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def log_sigmoid(x):
    return tl.minimum(x, 0.0) - log1p(tl.exp(-tl.abs(x)))


@triton.jit
def log1m_exp(x):
    """log(1 - exp(x)) for x < 0."""
    return tl.where(x > -0.6931471805599453, tl.log(-expm1(x)), log1p(-tl.exp(x)))


@triton.jit
def sequence_sum(values_ptr, start, end, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(start, end, BLOCK):
        offsets = t0 + tl.arange(0, BLOCK)
        acc += tl.load(values_ptr + offsets, mask=offsets < end, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def sequence_fill(values_ptr, start, end, value, BLOCK: tl.constexpr):
    for t0 in range(start, end, BLOCK):
        offsets = t0 + tl.arange(0, BLOCK)
        tl.store(values_ptr + offsets, tl.zeros((BLOCK,), tl.float32) + value, mask=offsets < end)
