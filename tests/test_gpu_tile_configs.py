"""The Triton kernels at the exact tiles a GPU launches, run by the CPU interpreter.

The other tests run the kernels at the interpreter's small tiles; the configuration an H100/H200
(sm_90, 132 SMs) or an A100 (sm_80, 108 SMs) launches -- 128-row tiles, K-steps of 64 or 32, the
64-row tiles of the outputs' and the entropy gradient's epilogues, float32's 32 x 64 and 16-row
tiles, the vocabulary split over twice the SM count, grouped rasterisation -- would otherwise first
execute on the GPU. Shapes span two to ten tiles in every dimension with ragged edges, and the
backward's scratch holds one vocabulary tile so that it runs in several slabs with a ragged last one.
"""
import pytest
import torch

import fastpref
from fastpref.backends import triton_backend
from fastpref.backends.scratch import DEFAULT_SCRATCH_BYTES
from test_head_outputs import ALL_OUTPUTS, TRANSFORMS, run_and_compare_outputs
from test_linear_logprobs import make_inputs

pytestmark = pytest.mark.skipif(
    triton_backend.BACKEND.unavailable_reason(torch.device("cpu")) is not None,
    reason="needs the Triton interpreter (TRITON_INTERPRET=1) on the CPU")

# (dtype, compute capability, SM count) of the launches a GPU run makes
LAUNCHES = {
    "bf16-sm90": (torch.bfloat16, 90, 132),
    "fp16-sm80": (torch.float16, 80, 108),
    "fp32-sm90": (torch.float32, 90, 132),
}
VARIANTS = {
    "log_probs": dict(outputs=("log_probs",), transform={}, trainable_head=True),
    "all-outputs-softcap": dict(outputs=ALL_OUTPUTS, transform=TRANSFORMS["all"], trainable_head=True),
    "frozen": dict(outputs=("log_probs",), transform={}, trainable_head=False),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
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
