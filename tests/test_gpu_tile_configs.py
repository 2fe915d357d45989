"""The Triton kernels at the exact tiles a GPU launches, run by the CPU interpreter.

The other tests run the kernels at the interpreter's small tiles; the configuration an H100/H200
(sm_90, 132 SMs) or an A100 (sm_80, 108 SMs) launches -- 128-row tiles, K-steps of 64 or 32, the
64-row tiles of the outputs' and the entropy gradient's epilogues, float32's 32 x 64 and 16-row
tiles, the vocabulary split over twice the SM count, grouped rasterisation -- would otherwise first
execute on the GPU. Shapes span two to ten tiles in every dimension with ragged edges, and the
backward's scratch holds one vocabulary tile so that it runs in several slabs with a ragged last one.
Their H (two K-steps and 22) makes rows that TMA cannot read, so the sm_90 half-precision case runs
the fallback of the persistent kernels: the one-tile-per-program ones on 64-row tiles.

The persistent, TMA-fed kernels that half precision launches on sm_90 run there too, at their real
tiles, warps, stages and grouping, but on two programs instead of 132, so that each program loops
over several work items (that loop is what one program per SM adds).
"""
from dataclasses import replace

import pytest
import torch

import fastpref
from fastpref.backends import triton_backend
from fastpref.backends.scratch import DEFAULT_SCRATCH_BYTES
from fastpref.kernels import persistent_forward, persistent_logit_gradient, tensor_descriptors
from fastpref.kernels.tensor_descriptors import aligned_row_length, descriptor_compatible
from test_head_outputs import ALL_OUTPUTS, TRANSFORMS, run_and_compare_outputs
from test_linear_logprobs import make_inputs
from tiers import first_fast

pytestmark = pytest.mark.skipif(
    triton_backend.BACKEND.unavailable_reason(torch.device("cpu")) is not None,
    reason="needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")

# (dtype, compute capability, SM count) of the launches a GPU run makes
LAUNCHES = {
    "bf16-sm90": (torch.bfloat16, 90, 132),
    "fp16-sm80": (torch.float16, 80, 108),
    "fp32-sm90": (torch.float32, 90, 132),
}
# the first, the cheapest, in the fast tier
VARIANTS = {
    "frozen": dict(outputs=("log_probs",), transform={}, trainable_head=False),
    "log_probs": dict(outputs=("log_probs",), transform={}, trainable_head=True),
    "all-outputs-softcap": dict(outputs=ALL_OUTPUTS, transform=TRANSFORMS["all"], trainable_head=True),
}


@pytest.mark.parametrize("variant", first_fast(VARIANTS.values()), ids=VARIANTS.keys())
@pytest.mark.parametrize("launch", LAUNCHES.values(), ids=LAUNCHES.keys())
def test_kernels_at_the_gpu_tiles_match_float64(monkeypatch, launch, variant):
    dtype, capability, multiprocessors = launch
    config = triton_backend.kernel_config(dtype, capability, multiprocessors)
    assert config.group_n < 9
    monkeypatch.setattr(triton_backend, "config_for", lambda hidden: config)
    # rows: 9 full row tiles + a ragged one (more row blocks than one rasterisation group of
    # group_n = 8); width: two K-steps + a ragged one; vocabulary: two tiles + a ragged one
    num_rows = 9 * config.block_n + 37
    width = 2 * config.block_h + 22
    vocab = 2 * config.block_v + 77
    hidden, weight, bias, targets, grad_out = make_inputs(
        num_rows, width, vocab, dtype, with_bias=variant["trainable_head"], ignore_every=7)
    fastpref.set_scratch_bytes(num_rows * config.block_v * hidden.element_size())
    try:
        run_and_compare_outputs("triton", hidden, weight, bias, targets, grad_out,
                                transform=variant["transform"], outputs=variant["outputs"],
                                trainable_head=variant["trainable_head"])
    finally:
        fastpref.set_scratch_bytes(DEFAULT_SCRATCH_BYTES)


# scratch: 2 vocabulary tiles (slabs of 256 and a ragged 77 columns) or the whole vocabulary (one
# slab of 333 columns, its rows padded to 336 for the descriptor's 16-byte rule)
PERSISTENT_VARIANTS = {
    "log_probs-bias-two-slabs": dict(outputs=("log_probs",), transform={}, scratch_tiles=2),
    "all-outputs-softcap-bias-one-slab": dict(outputs=ALL_OUTPUTS, transform=TRANSFORMS["all"], scratch_tiles=None),
}


@pytest.mark.parametrize("variant", first_fast(PERSISTENT_VARIANTS.values()), ids=PERSISTENT_VARIANTS.keys())
@pytest.mark.parametrize("dtype", first_fast((torch.bfloat16, torch.float16)), ids=("bf16", "fp16"))
def test_persistent_kernels_at_the_sm90_tiles_match_float64(monkeypatch, dtype, variant):
    sm90 = triton_backend.kernel_config(dtype, 90, 132)
    assert sm90.persistent_programs == 132
    config = replace(sm90, persistent_programs=2)
    monkeypatch.setattr(triton_backend, "config_for", lambda hidden: config)
    launches, forward_launches = [], []
    original = persistent_logit_gradient.persistent_logit_gradient
    original_forward = persistent_forward.persistent_linear_logprobs_forward

    def recording(hidden, weight, bias, targets, lse, miss, grad, dz, *args, **kwargs):
        launches.append((kwargs["num_programs"], kwargs["block_n"], dz.shape[1], dz.stride(0)))
        return original(hidden, weight, bias, targets, lse, miss, grad, dz, *args, **kwargs)

    def recording_forward(*args, **kwargs):
        sums = original_forward(*args, **kwargs)
        forward_launches.append((kwargs["num_programs"], kwargs["block_n"], sums["row_max"].shape[0]))
        return sums

    monkeypatch.setattr(persistent_logit_gradient, "persistent_logit_gradient", recording)
    monkeypatch.setattr(persistent_forward, "persistent_linear_logprobs_forward", recording_forward)
    # three tiles in every dimension, each with a ragged last one (H a multiple of 8: TMA's rule)
    num_rows = 2 * config.block_n + 37
    width = 2 * config.block_h + 24
    vocab = 2 * config.block_v + 77
    hidden, weight, bias, targets, grad_out = make_inputs(num_rows, width, vocab, dtype, with_bias=True,
                                                          ignore_every=7)
    tiles = variant["scratch_tiles"]
    fastpref.set_scratch_bytes(num_rows * (tiles * config.block_v if tiles else vocab) * hidden.element_size())
    try:
        run_and_compare_outputs("triton", hidden, weight, bias, targets, grad_out,
                                transform=variant["transform"], outputs=variant["outputs"], trainable_head=True)
    finally:
        fastpref.set_scratch_bytes(DEFAULT_SCRATCH_BYTES)
    # each of the two programs walks several (row block, vocabulary split) items of the forward
    [(programs, block_n, splits)] = forward_launches
    assert programs == 2 and -(-num_rows // block_n) * splits >= 2 * programs
    assert launches and all(programs == 2 for programs, *_ in launches)
    # each of the two programs walks several (row tile, vocabulary tile) items of the first slab
    programs, block_n, columns, row_stride = launches[0]
    assert -(-num_rows // block_n) * -(-columns // config.block_v) >= 2 * programs
    assert row_stride == aligned_row_length(columns, hidden.element_size())


def test_only_tma_compatible_tensors_take_the_persistent_kernel(monkeypatch):
    aligned = torch.empty(5, 16, dtype=torch.bfloat16)
    assert descriptor_compatible(aligned)
    assert not descriptor_compatible(torch.empty(5, 12, dtype=torch.bfloat16))  # 24-byte rows
    assert not descriptor_compatible(aligned[:, 1:9])  # base address 2 bytes off
    assert not descriptor_compatible(aligned.t())
    assert aligned_row_length(333, 2) == 336 and aligned_row_length(336, 2) == 336
    assert triton_backend.kernel_config(torch.float16, 80, 108).persistent_programs == 0
    assert triton_backend.kernel_config(torch.float32, 90, 132).persistent_programs == 0
    sm90 = triton_backend.kernel_config(torch.bfloat16, 90, 132)
    assert sm90.for_layout(True) == sm90
    assert sm90.for_layout(False).persistent_programs == 0 and sm90.for_layout(False).block_n == 64
    # a Triton without device-side tensor descriptors keeps the pointer-fed kernels
    monkeypatch.setattr(tensor_descriptors, "AVAILABLE", False)
    assert triton_backend.kernel_config(torch.bfloat16, 90, 132).persistent_programs == 0
