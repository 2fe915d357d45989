"""The hidden-gradient GEMM of the Triton backward (kernels/hidden_gradient.py), called directly.

Over many vocabulary slabs, d_hidden = sum_s dz_s W_s is held as hi (the inputs' dtype) + lo
(bfloat16), about 16 significant bits between slabs: the result must stay within one unit in the
last place of the exact sum plus 2^-11 of the largest running partial sum (the pair's own limit,
seen only where partial sums cancel), where a bfloat16 running sum is off by 2^-4 of it. Without
a GPU this runs under Triton's CPU interpreter, which truncates float32 -> half conversions where
a GPU rounds to nearest: hence one ulp rather than half of one, and a pair error that grows with
one sign over the slabs (2^-12.4 measured here; rounding to nearest keeps it nearer 2^-14).
"""
import pytest
import torch

from fastpref.backends import triton_backend
from fastpref.backends.gemm import low_part_dtype
from fastpref.kernels.hidden_gradient import accumulate_hidden_gradient
from tiers import first_fast

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLAB = 16


def _ulp(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` around each value of `exact` (float64)."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    tiny = torch.finfo(dtype).tiny
    return torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(tiny))) - mantissa_bits)


def _accumulate(dz, weight, dtype, low):
    num_rows, width = dz.shape[0], weight.shape[1]
    cfg = triton_backend.config_for(dz)
    hi = torch.zeros(num_rows, width, dtype=dtype, device=DEVICE)
    lo = torch.zeros(num_rows, width, dtype=low, device=DEVICE) if low is not None else None
    for start in range(0, weight.shape[0], SLAB):
        accumulate_hidden_gradient(dz[:, start:start + SLAB], weight, start, hi, lo,
                                   block_n=cfg.block_n, block_h=cfg.block_v, block_k=cfg.block_h,
                                   group_n=cfg.group_n, num_warps=cfg.num_warps,
                                   num_stages=cfg.num_stages, upcast=triton_backend.INTERPRETING)
    return hi


def _inputs(num_rows, width, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dz = torch.randn(num_rows, vocab, generator=gen).to(dtype)
    weight = torch.randn(vocab, width, generator=gen).to(dtype)
    partial_sums = torch.stack([dz[:, :stop].double() @ weight[:stop].double()
                                for stop in range(SLAB, vocab + SLAB, SLAB)])
    return dz.to(DEVICE), weight.to(DEVICE), partial_sums[-1], partial_sums.abs().amax(dim=0)


@pytest.mark.parametrize("dtype", first_fast([torch.bfloat16, torch.float16]))
def test_many_slabs_stay_within_one_ulp_of_the_sum(dtype):
    dz, weight, exact, largest_partial = _inputs(19, 40, 40 * SLAB + 5, dtype, seed=1)
    hi = _accumulate(dz, weight, dtype, low_part_dtype(dtype))
    assert hi.dtype == dtype
    excess = (hi.double().cpu() - exact).abs() - _ulp(exact, dtype)
    assert float((excess / largest_partial).max()) <= 2**-11


def test_without_the_low_part_the_error_grows_with_the_slabs():
    """The same sum kept in bfloat16 alone: what the low part is there to prevent."""
    dz, weight, exact, largest_partial = _inputs(19, 40, 40 * SLAB + 5, torch.bfloat16, seed=1)
    hi = _accumulate(dz, weight, torch.bfloat16, None)
    excess = (hi.double().cpu() - exact).abs() - _ulp(exact, torch.bfloat16)
    assert float((excess / largest_partial).max()) > 2**-6


def test_float32_accumulates_without_a_low_part():
    assert low_part_dtype(torch.float32) is None
    dz, weight, exact, _ = _inputs(9, 33, 7 * SLAB + 3, torch.float32, seed=2)
    hi = _accumulate(dz, weight, torch.float32, None)
    assert torch.allclose(hi.double().cpu(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_on_a_gpu_the_result_is_rounded_to_nearest(dtype):
    """Compiled for a GPU, the conversions round to nearest: half an ulp of the exact sum (plus the
    pair's own limit), where the interpreter's truncation needs a whole one."""
    dz, weight, exact, largest_partial = _inputs(19, 40, 40 * SLAB + 5, dtype, seed=3)
    hi = _accumulate(dz, weight, dtype, low_part_dtype(dtype))
    excess = (hi.double().cpu() - exact).abs() - 0.5 * _ulp(exact, dtype) * 1.001
    assert float((excess / largest_partial).max()) <= 2**-12
