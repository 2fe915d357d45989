"""Matrix products accumulated in float32, and the dtype of the GPU backends' compensated sums."""
from __future__ import annotations

from typing import Optional

import torch


def matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in float32.

    On CUDA a half-precision pair takes cuBLAS's GEMM with a float32 output (torch >= 2.8's
    ``out_dtype``); elsewhere, or on older torch, the operands are upcast first.
    """
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return torch.mm(a.float(), b.float())


def matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out = a @ b, accumulated in float32 and rounded once to out's dtype. On CUDA cuBLAS writes
    straight into out, also a float32 out of half-precision operands (torch's out_dtype), with no
    float32 copy of the product in between; elsewhere, or on a torch without out_dtype, the
    product is formed in float32 and copied."""
    if a.is_cuda and a.dtype == b.dtype:
        if a.dtype == out.dtype:
            return torch.mm(a, b, out=out)
        if out.dtype == torch.float32:
            try:
                return torch.mm(a, b, out_dtype=out.dtype, out=out)
            except (TypeError, RuntimeError):
                pass
    return out.copy_(matmul_float32(a, b))


def add_matmul_float32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b for a float32 (or float64) out, accumulated in at least float32. On CUDA a
    half-precision pair takes cuBLAS's GEMM adding into its float32 output (beta = 1, torch's
    out_dtype), with no float32 product in between; elsewhere the product is formed, then added."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16) and out.dtype == torch.float32:
        try:
            return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            pass
    if a.dtype == b.dtype == out.dtype:
        return out.addmm_(a, b)
    return out.add_(matmul_float32(a, b) if out.dtype == torch.float32 else a.to(out.dtype) @ b.to(out.dtype))


def low_part_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype of the remainder lo that the GPU backends keep beside a d_hidden of `dtype` summed
    over vocabulary slabs (d_hidden = hi + lo, see kernels/hidden_gradient.py); None when d_hidden
    itself accumulates in at least float32."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else None
