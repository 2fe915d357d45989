"""Compiled Triton kernels on a CUDA device: realistic shapes, indices past 2^31, the transforms and
outputs, and no host synchronisation in the op, the loss and the trainer's micro-batch."""
import contextlib

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_head", [True, False], ids=["trainable", "frozen"])
def test_transforms_and_outputs_on_gpu(dtype, trainable_head):
    from test_head_outputs import TRANSFORMS, run_and_compare_outputs

    inputs = make_inputs(1000, 1024, 32003, dtype, with_bias=False, ignore_every=7)
    run_and_compare_outputs("triton", *inputs, transform=TRANSFORMS["all"], trainable_head=trainable_head)


@contextlib.contextmanager
def sync_is_an_error():
    """torch.cuda.set_sync_debug_mode("error") within the block: any host synchronisation raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_op_and_loss_never_synchronise(backend):
    from test_losses import make_packed_batch

    if backend not in fastpref.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available here")
    hidden, weight, targets, layout, reference = make_packed_batch(64, 256, 5003, torch.bfloat16, seed=2)
    leaves = [hidden.detach().requires_grad_(), weight.detach().requires_grad_()]
    loss_fn = fastpref.PreferenceLoss("sigmoid", backend=backend)
    with sync_is_an_error():
        got = fastpref.linear_logprobs(*leaves, targets, softcap=30.0, outputs=fastpref.OUTPUT_NAMES,
                                       backend=backend)
        torch.autograd.grad(got.log_probs.sum() + got.entropy.sum(), leaves)
        loss, _ = loss_fn(*leaves, targets, layout, reference)
        torch.autograd.grad(loss, leaves)


def test_training_micro_batch_never_synchronises(tmp_path, small_data):
    """The trainer's micro-batch on the GPU, past the host's packing: batch and cached reference to
    the device, the packed forward, the fused loss and the backward."""
    from fastpref.train.loop import Trainer
    from fastpref.train.packing import pack_pairs
    from test_trainer import config

    trainer = Trainer(config(tmp_path, small_data, device="cuda", attn_implementation="sdpa"))
    pairs = trainer._micro_batches(0)[0]
    packed = pack_pairs(pairs, prefix_sharing=False)
    reference = trainer._reference_for(pairs)
    with sync_is_an_error():
        loss, _, _ = trainer._device_loss(packed, reference, trainer.forward_model)
        loss.backward()
