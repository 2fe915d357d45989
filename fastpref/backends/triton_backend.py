"""Triton backend: fused kernels on CUDA (or on the CPU under ``TRITON_INTERPRET=1``, for tests).

Forward: :mod:`fastpref.kernels.linear_logprobs_forward` (2NHV FLOPs).
Backward: :mod:`fastpref.kernels.linear_logprobs_backward` (recompute + hidden gradient, 4NHV;
plus 2NHV for the weight gradient when the head is trainable).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .._buffers import new_output
from . import Backend, ForwardResult, PreferenceLossResult, fused_loss_result

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


# Tiles for Triton's CPU interpreter: tiny, since it runs every program in Python.
INTERPRETER_CONFIG = KernelConfig(16, 64, 32, num_warps=1, num_stages=1, programs_wanted=2)


def kernel_config(dtype: torch.dtype, capability: Optional[int], multiprocessors: int = 0) -> KernelConfig:
    """Tile sizes for `dtype` on a GPU of compute capability `capability` (90 for sm_90) with
    `multiprocessors` SMs; capability None is the CPU interpreter.

    Every configuration this returns is compiled offline for sm_80 and sm_90 by
    ``fastpref kernels`` (and its test), so a tile change that spills or misses wgmma fails there.
    The backward's 64 x 128 x 64 half-precision tile holds too many accumulators for mma.sync's
    register layout on sm_80 (it spills): A100s take K-steps of 32.
    """
    if capability is None:
        return INTERPRETER_CONFIG
    programs = 2 * multiprocessors
    if dtype == torch.float32:
        return KernelConfig(32, 64, 32, num_warps=8, num_stages=2, programs_wanted=programs)
    if capability < 90:
        return KernelConfig(64, 128, 32, num_warps=8, num_stages=3, programs_wanted=programs)
    return KernelConfig(64, 128, 64, num_warps=8, num_stages=3, programs_wanted=programs)


def config_for(hidden: torch.Tensor) -> KernelConfig:
    """The kernel_config of the inputs' device and dtype."""
    if hidden.device.type != "cuda":
        return kernel_config(hidden.dtype, None)
    major, minor = torch.cuda.get_device_capability(hidden.device)
    return kernel_config(hidden.dtype, 10 * major + minor,
                         torch.cuda.get_device_properties(hidden.device).multi_processor_count)


def forward(hidden, weight, bias, targets, want_hidden_grad: bool,
            config: Optional[KernelConfig] = None) -> ForwardResult:
    from ..kernels.linear_logprobs_forward import linear_logprobs_forward

    cfg = config or config_for(hidden)
    row_blocks = -(-hidden.shape[0] // cfg.block_n)
    return linear_logprobs_forward(
        hidden, weight, bias, targets,
        block_n=cfg.block_n, block_v=cfg.block_v, block_h=cfg.block_h,
        num_splits=max(1, cfg.programs_wanted // row_blocks),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        upcast=INTERPRETING, new_output=new_output,
    )


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp,
             need_hidden: bool, need_weight: bool, need_bias: bool,
             config: Optional[KernelConfig] = None):
    from ..kernels.linear_logprobs_backward import linear_logprobs_backward

    cfg = config or config_for(hidden)
    return linear_logprobs_backward(
        hidden, weight, bias, targets, saved.lse, saved.miss, grad_logp,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
        block_n=cfg.block_n, block_v=cfg.block_v, block_h=cfg.block_h,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, upcast=INTERPRETING,
    )


def preference_loss(token_logp, layout, reference, spec, kl) -> PreferenceLossResult:
    device = token_logp.device
    if spec.is_paired:
        from ..kernels.preference_pair_loss import preference_pair_loss

        weights, averages = spec.kernel_tables(device)
        parts, sequence_logps, token_grad = preference_pair_loss(
            token_logp, layout, reference, weights, averages, beta=spec.beta,
            label_smoothing=spec.label_smoothing, simpo_gamma=spec.simpo_gamma,
            new_output=new_output)
        return fused_loss_result(spec, parts, sequence_logps, token_grad, weights)
    else:
        from ..kernels.kto_loss import kto_loss

        parts, sequence_logps, token_grad = kto_loss(
            token_logp, layout, reference, kl, beta=spec.beta,
            desirable_weight=spec.desirable_weight, undesirable_weight=spec.undesirable_weight,
            average=spec.averages("kto"), new_output=new_output)
    return fused_loss_result(spec, parts, sequence_logps, token_grad)


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
    preference_loss=preference_loss,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=10,
    native_devices=("cuda",),
)
