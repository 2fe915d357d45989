"""Compiled Triton kernels on a CUDA device: realistic shapes, and indices past 2^31."""
import pytest
import torch

import fastpref
from reference import reference_logprobs, relative_error
from test_linear_logprobs import TOLERANCE, make_inputs, run_and_compare

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("shape", [(1000, 1024, 32003), (4099, 576, 49157), (3, 2048, 128256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_triton_on_gpu_matches_float64(dtype, trainable_head, shape):
    inputs = make_inputs(*shape, dtype, with_bias=False, ignore_every=7)
    run_and_compare("triton", *inputs, trainable_head=trainable_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_on_gpu(dtype):
    inputs = make_inputs(777, 896, 15013, dtype, with_bias=True, ignore_every=5)
    logp_torch, grads_torch = run_and_compare("torch", *inputs)
    logp_triton, grads_triton = run_and_compare("triton", *inputs)
    assert relative_error(logp_triton, logp_torch) <= TOLERANCE[dtype]
    for a, b in zip(grads_triton, grads_torch):
        assert relative_error(a, b) <= TOLERANCE[dtype]


@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_rows_past_32_bit_offsets(backend, trainable_head):
    """N * H > 2^31: the last rows' offsets overflow int32 unless the kernels index in int64 (a
    trainable head takes the Triton backward's logit-gradient kernel, a frozen one the slab forward)."""
    if backend not in fastpref.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")
    n, h, v = 131_076, 16_400, 1_003
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(torch.bfloat16)
    weight.requires_grad_(trainable_head)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    logp = fastpref.linear_logprobs(hidden, weight, targets, backend=backend)
    grad_out = torch.randn(n, device="cuda", generator=gen)
    (d_hidden,) = torch.autograd.grad((logp * grad_out).sum(), [hidden])

    tail = slice(n - 64, n)
    ref_hidden = hidden[tail].detach().double().cpu().requires_grad_()
    ref = reference_logprobs(ref_hidden, weight.detach(), targets[tail])
    (ref_d_hidden,) = torch.autograd.grad((ref * grad_out[tail].double().cpu()).sum(), [ref_hidden])
    assert relative_error(logp[tail], ref) <= TOLERANCE[torch.bfloat16]
    assert relative_error(d_hidden[tail], ref_d_hidden) <= TOLERANCE[torch.bfloat16]
