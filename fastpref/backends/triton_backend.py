"""Triton backend: fused kernels on CUDA (or on the CPU under ``TRITON_INTERPRET=1``, for tests).

Forward: :mod:`fastpref.kernels.linear_logprobs_forward` (2NHV FLOPs; on sm_90 in half precision
its persistent, TMA-fed form, :mod:`fastpref.kernels.persistent_forward`).
Backward, per vocabulary slab: :mod:`fastpref.kernels.linear_logprobs_backward` (the fused
recompute + logit-gradient kernel, 2NHV; on sm_90 in half precision its persistent, TMA-fed form,
:mod:`fastpref.kernels.persistent_logit_gradient`), :mod:`fastpref.kernels.hidden_gradient` (the hidden
gradient's GEMM, 2NHV, accumulated across slabs as a half-precision pair instead of a float32
[N, H] buffer) and, when the head is trainable, the weight gradient as a cuBLAS GEMM (2NHV,
written once); no atomics.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from .._buffers import new_output
from . import Backend, ForwardResult, HeadOptions, torch_backend
from .gemm import low_part_dtype, matmul_into
from .online_softmax import merge_vocabulary_parts
from .scratch import slab_columns

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _IMPORT_ERROR = f"triton is not importable ({exc})"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int
    programs_wanted: int  # the forward splits V until about this many programs run
    group_n: int = 8  # row blocks rasterised together in the backward (L2 reuse of the weight tile)
    # rows per tile when the forward's epilogue also carries the per-token outputs' sums, and when
    # the backward's carries the entropy's gradient term: more live values per row than a full tile
    # leaves registers for (the compile gate finds the spills)
    outputs_block_n: int = 0
    entropy_block_n: int = 0
    outputs_num_warps: int = 0  # warps of the forward with the outputs' sums (0: num_warps)
    # programs of the persistent, TMA-fed kernels (one per SM); 0: the one-tile-per-program kernels
    persistent_programs: int = 0
    # rows per tile of the one-tile-per-program kernels for inputs TMA cannot read, on a table that
    # otherwise takes the persistent ones: unaligned rows leave fewer registers (the compile gate)
    unaligned_block_n: int = 0

    def for_outputs(self, outputs) -> "KernelConfig":
        if not outputs or not self.outputs_block_n:
            return self
        return replace(self, block_n=self.outputs_block_n, num_warps=self.outputs_num_warps or self.num_warps)

    def for_entropy_gradient(self, wanted: bool) -> "KernelConfig":
        return replace(self, block_n=self.entropy_block_n) if wanted and self.entropy_block_n else self

    def for_layout(self, tma_readable: bool) -> "KernelConfig":
        """This table for inputs whose rows TMA can (or cannot) read (kernels/tensor_descriptors.py):
        without, the one-tile-per-program kernels, on unaligned_block_n rows at most."""
        if tma_readable or not self.persistent_programs:
            return self
        return replace(self, persistent_programs=0, block_n=min(self.block_n, self.unaligned_block_n or self.block_n))


# Tiles for Triton's CPU interpreter: tiny, since it runs every program in Python.
INTERPRETER_CONFIG = KernelConfig(16, 64, 32, num_warps=1, num_stages=1, programs_wanted=2, group_n=2)


def kernel_config(dtype: torch.dtype, capability: Optional[int], multiprocessors: int = 0) -> KernelConfig:
    """Tile sizes for `dtype` on a GPU of compute capability `capability` (90 for sm_90) with
    `multiprocessors` SMs; capability None is the CPU interpreter.

    Every configuration this returns is compiled offline for sm_80 and sm_90 by
    ``fastpref kernels`` (and its test), so a tile change that spills or misses wgmma fails there.
    Half precision takes 128 x 128 tiles (64 FLOP per byte of operands; 64 x 128 gives 43, too
    little to feed the tensor cores from L2); K-steps of 64 on sm_90 (128 x 256 spills) and 32 on
    sm_80 (mma.sync keeps its accumulators in registers). Where a tile would spill (the forward with
    the per-token outputs' sums, the backward with the entropy's gradient term and the soft cap,
    float32 with both), it takes fewer rows: 64 rows in half precision, 16 rows of 4 warps in
    float32 (the registers and spills of every binary: docs/op.md, from `fastpref kernels`).
    Half precision on sm_90 runs the persistent, TMA-fed forward and logit-gradient kernels on one
    program per SM (the same tiles, the same vocabulary splits); sm_80 has no TMA, and float32 keeps
    the one-tile-per-program kernels. Half-precision rows that TMA cannot read (H x 2 bytes not a
    multiple of 16) take the one-tile-per-program kernels on sm_90 too, on 64-row tiles (at 128
    rows their unaligned loads spill).
    """
    if capability is None:
        return INTERPRETER_CONFIG
    programs = 2 * multiprocessors
    if dtype == torch.float32:
        return KernelConfig(32, 64, 32, num_warps=8, num_stages=2, programs_wanted=programs,
                            outputs_block_n=16, outputs_num_warps=4)
    if capability < 90:
        return KernelConfig(128, 128, 32, num_warps=8, num_stages=3, programs_wanted=programs,
                            outputs_block_n=64, entropy_block_n=64)
    from ..kernels import tensor_descriptors

    return KernelConfig(128, 128, 64, num_warps=8, num_stages=3, programs_wanted=programs,
                        outputs_block_n=64, entropy_block_n=64,
                        persistent_programs=multiprocessors if tensor_descriptors.AVAILABLE else 0,
                        unaligned_block_n=64)


def config_for(hidden: torch.Tensor) -> KernelConfig:
    """The kernel_config of the inputs' device and dtype."""
    if hidden.device.type != "cuda":
        return kernel_config(hidden.dtype, None)
    major, minor = torch.cuda.get_device_capability(hidden.device)
    return kernel_config(hidden.dtype, 10 * major + minor,
                         torch.cuda.get_device_properties(hidden.device).multi_processor_count)


def forward(hidden, weight, bias, targets, options: HeadOptions, fold_hidden_gradient: bool,
            config: Optional[KernelConfig] = None) -> ForwardResult:
    """The fused GEMM + online-softmax kernel; a frozen head whose hidden gradient is folded in
    takes the torch backend's slab pass that also accumulates u = J_t W_t - sum_v p_v J_v W_v
    (matmuls through cuBLAS), after which the backward is a scale: 4NHV in all instead of 6NHV."""
    from ..kernels.linear_logprobs_forward import linear_logprobs_forward
    from ..kernels.persistent_forward import persistent_linear_logprobs_forward
    from ..kernels.tensor_descriptors import descriptor_compatible

    if fold_hidden_gradient:
        return torch_backend.forward(hidden, weight, bias, targets, options, fold_hidden_gradient=True)
    transform, outputs = options.transform, options.outputs
    cfg = (config or config_for(hidden)).for_outputs(outputs).for_layout(descriptor_compatible(hidden, weight))
    row_blocks = -(-hidden.shape[0] // cfg.block_n)
    launcher = linear_logprobs_forward
    if cfg.persistent_programs > 0:
        launcher = functools.partial(persistent_linear_logprobs_forward, group_n=cfg.group_n,
                                     num_programs=cfg.persistent_programs)
    sums = launcher(
        hidden, weight, bias, targets, pre=transform.pre, post=transform.post,
        softcap=transform.softcap is not None, entropy="entropy" in outputs,
        sum_sq="log_sum_sq_probs" in outputs, logit_sum="mean_logits" in outputs, max_before="is_top1" in outputs,
        block_n=cfg.block_n, block_v=cfg.block_v, block_h=cfg.block_h,
        num_splits=max(1, cfg.programs_wanted // row_blocks),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        upcast=INTERPRETING, new_output=new_output,
    )
    return merge_vocabulary_parts(sums.pop("row_max"), sums.pop("sum_excl"), sums.pop("target"),
                                  vocab=weight.shape[0], **sums)


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp, grad_entropy,
             options: HeadOptions, need_hidden: bool, need_weight: bool, need_bias: bool,
             config: Optional[KernelConfig] = None):
    """Per vocabulary slab: the fused logit-gradient kernel into a scratch, then d_weight as a
    cuBLAS GEMM (written once per slab) and d_hidden += dz W_s as a Triton GEMM whose epilogue
    keeps the running sum as d_hidden (the inputs' dtype) plus a bfloat16 remainder; no atomics.
    A forward that took the slab pass (a frozen head) left u: its backward, d_hidden = g u, is
    that pass's."""
    from ..kernels.hidden_gradient import accumulate_hidden_gradient
    from ..kernels.linear_logprobs_backward import logit_gradient
    from ..kernels.persistent_logit_gradient import persistent_logit_gradient
    from ..kernels.tensor_descriptors import aligned_row_length, descriptor_compatible

    if saved.hidden_grad_direction is not None:
        return torch_backend.backward(hidden, weight, bias, targets, saved, grad_logp, grad_entropy, options,
                                      need_hidden, need_weight, need_bias)
    cfg = ((config or config_for(hidden)).for_entropy_gradient(grad_entropy is not None)
           .for_layout(descriptor_compatible(hidden, weight)))
    transform = options.transform
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    columns = slab_columns(num_rows, vocab, hidden.element_size(), options.scratch_bytes, cfg.block_v)
    if cfg.persistent_programs > 0:
        # the kernel stores dz through a descriptor: 16-byte aligned rows
        scratch = new_output((num_rows, aligned_row_length(columns, hidden.element_size())), hidden.dtype,
                             hidden.device)
        fill_slab = functools.partial(persistent_logit_gradient, num_programs=cfg.persistent_programs)
    else:
        scratch = new_output((num_rows, columns), hidden.dtype, hidden.device)
        fill_slab = logit_gradient
    grad = grad_logp.float().contiguous()
    entropy = None if grad_entropy is None else saved.entropy.float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.float().contiguous()
    d_hidden = d_hidden_low = None
    if need_hidden:
        d_hidden = torch.zeros((num_rows, width), dtype=hidden.dtype, device=hidden.device)
        low_dtype = low_part_dtype(hidden.dtype)
        if low_dtype is not None:
            d_hidden_low = torch.zeros((num_rows, width), dtype=low_dtype, device=hidden.device)
    d_weight = new_output(weight.shape, weight.dtype, weight.device) if need_weight else None
    d_bias = new_output((vocab,), torch.float32, weight.device) if need_bias else None
    bias_grad_partial = (new_output((-(-num_rows // cfg.block_n), columns), torch.float32, hidden.device)
                         if need_bias else None)
    for start in range(0, vocab, columns):
        stop = min(vocab, start + columns)
        dz = scratch[:, :stop - start]
        partial = None if bias_grad_partial is None else bias_grad_partial[:, :stop - start]
        fill_slab(hidden, weight, bias, targets, saved.lse, saved.miss, grad, dz, start, partial,
                  entropy, grad_entropy, pre=transform.pre, post=transform.post,
                  softcap=transform.softcap is not None,
                  block_n=cfg.block_n, block_v=cfg.block_v, block_h=cfg.block_h, group_n=cfg.group_n,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages, upcast=INTERPRETING)
        if need_weight:
            matmul_into(d_weight[start:stop], dz.t(), hidden)
        if need_bias:
            d_bias[start:stop] = partial.sum(dim=0)
        if need_hidden:
            accumulate_hidden_gradient(dz, weight, start, d_hidden, d_hidden_low,
                                       block_n=cfg.block_n, block_h=cfg.block_v, block_k=cfg.block_h,
                                       group_n=cfg.group_n, num_warps=cfg.num_warps,
                                       num_stages=cfg.num_stages, upcast=INTERPRETING)
    return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRETING:
        return None
    return "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import, for CPU tests)"


BACKEND = Backend(
    name="triton",
    forward=forward,
    backward=backward,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=10,
    native_devices=("cuda",),
)
