"""The fused heads of other projects that give per-token log-probs, as benchmark methods.

Each function returns either the method, a function of (hidden [M, H], weight [V, H], targets
[M]) -> per-token log-probs [M] in float32 (0 where the target is ignored), differentiable with
respect to hidden and weight, or the reason it cannot run here, "n/a (...)", for the method's row.

  torch-native   PyTorch's own chunked head (torch >= 2.13): F.linear_cross_entropy(...,
                 reduction="none", options=torch.nn.LinearCrossEntropyOptions()); CPU and GPU.
  liger-cute     Liger-Kernel's Hopper CuTe DSL head with per-token outputs
                 (LigerFusedLinearScaledCrossEntropyFunction; sm_90, bf16, the CuTe DSL).
  quack          QuACK's per-token path, linear_cross_entropy_func(reduction="none"): cuBLAS
                 logits [M, V] and QuACK's CuTe cross-entropy kernels (sm_90 and newer).
  quack-chunked  QuACK's chunked head (chunked_linear_cross_entropy), its fastest: it computes the
                 gradient in the forward for one summed loss, so it gives no per-token log-probs;
                 quack_chunked_sum returns the summed log-prob of the scored tokens instead.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .reference import IGNORE_INDEX

TORCH_NATIVE, LIGER_CUTE, QUACK, QUACK_CHUNKED = "torch-native", "liger-cute", "quack", "quack-chunked"
# QuACK's chunk, as in its own default; its TMA GEMMs need rows and columns in multiples of 8.
QUACK_CHUNK_SIZE = 4096
QUACK_ALIGNMENT = 8

LogprobFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """The CUDA compute capability of `device`, None off CUDA."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


def _import(module: str) -> Union[object, ImportError]:
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # a missing package, or one of its own dependencies
        return exc


def torch_native(device: torch.device, dtype: torch.dtype) -> Union[LogprobFunction, str]:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"n/a (needs torch >= 2.13 for F.linear_cross_entropy, this is torch {torch.__version__})"

    def logprobs(hidden, weight, targets):
        nll = F.linear_cross_entropy(hidden, weight, targets, reduction="none", ignore_index=IGNORE_INDEX,
                                     options=torch.nn.LinearCrossEntropyOptions())
        return -nll.float()

    return logprobs


def liger_cute(device: torch.device, dtype: torch.dtype) -> Union[LogprobFunction, str]:
    """Liger's public entry point runs its torch fallback off sm_90; this method is the CuTe head
    only, so anything else is a row that says why."""
    if device.type != "cuda":
        return "n/a (Liger's CuTe head needs an sm_90 GPU; elsewhere Liger runs a torch fallback)"
    ops = _import("liger_kernel.ops")
    if isinstance(ops, ImportError):
        return f"n/a (liger-kernel not installed: {ops})"
    if not hasattr(ops, "LigerFusedLinearScaledCrossEntropyFunction"):
        return "n/a (needs liger-kernel >= 0.8.5 for LigerFusedLinearScaledCrossEntropyFunction)"
    major, minor = capability(device)
    if (major, minor) != (9, 0):
        return f"n/a (Liger's CuTe head needs sm_90, this GPU is sm_{major}{minor})"
    if dtype != torch.bfloat16:
        return f"n/a (Liger's CuTe head takes bfloat16 only, not {dtype})"
    kernel = _import("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
    if isinstance(kernel, ImportError):
        return f"n/a (Liger's CuTe head needs the CuTe DSL, nvidia-cutlass-dsl: {kernel})"

    def logprobs(hidden, weight, targets):
        nll = ops.LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, targets, 1.0, IGNORE_INDEX)
        return -nll.float()

    return logprobs


def _quack_unavailable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return "n/a (QuACK's kernels need a CUDA GPU, sm_90 or newer)"
    major, minor = capability(device)
    if major < 9:
        return f"n/a (QuACK's kernels need sm_90 or newer, this GPU is sm_{major}{minor})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"n/a (QuACK's head takes bfloat16 or float16, not {dtype})"
    return None


def _quack_module() -> Union[object, str]:
    module = _import("quack.linear_cross_entropy")
    if isinstance(module, ImportError):
        return f"n/a (needs quack-kernels and the CuTe DSL, nvidia-cutlass-dsl: {module})"
    return module


def quack(device: torch.device, dtype: torch.dtype) -> Union[LogprobFunction, str]:
    module = _quack_unavailable(device, dtype) or _quack_module()
    if isinstance(module, str):
        return module

    def logprobs(hidden, weight, targets):
        nll = module.linear_cross_entropy_func(hidden, weight, None, targets, ignore_index=IGNORE_INDEX,
                                               reduction="none")
        return -nll.float()

    return logprobs


def quack_chunked_sum(device: torch.device, dtype: torch.dtype, vocab: int) -> Union[LogprobFunction, str]:
    """(hidden [M, H], weight, targets [M]) -> the summed log-prob of the scored tokens, a scalar:
    its backward is that of every scored token's log-prob with an upstream gradient of 1. The
    scored rows go in, padded to QuACK's alignment."""
    reason = _quack_unavailable(device, dtype)
    if reason is None and vocab % QUACK_ALIGNMENT:
        reason = f"n/a (QuACK's chunked head needs a vocabulary that is a multiple of {QUACK_ALIGNMENT})"
    module = reason or _quack_module()
    if isinstance(module, str):
        return module

    def summed_logprob(hidden, weight, targets):
        rows, row_targets = scored_rows_padded(hidden, targets, QUACK_ALIGNMENT)
        return -module.chunked_linear_cross_entropy(rows, weight, row_targets, chunk_size=QUACK_CHUNK_SIZE,
                                                    ignore_index=IGNORE_INDEX, reduction="sum").float()

    return summed_logprob


PER_TOKEN = {TORCH_NATIVE: torch_native, LIGER_CUTE: liger_cute, QUACK: quack}


def on_scored_rows(logprobs: LogprobFunction) -> LogprobFunction:
    """`logprobs` on the rows whose target is scored, as a caller drops prompt and padding before
    a fused head: (hidden [..., H], weight, targets [...]) -> log-probs [...], 0 where ignored."""
    def scored_logprobs(hidden, weight, targets):
        scored = targets != IGNORE_INDEX
        values = logprobs(hidden[scored], weight, targets[scored])
        return values.new_zeros(targets.shape).masked_scatter(scored, values)

    return scored_logprobs


def scored_rows_padded(hidden: torch.Tensor, targets: torch.Tensor,
                       multiple: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The scored rows of hidden [M, H] and targets [M], padded with ignored zero rows to a
    multiple of `multiple` rows (they add nothing to the loss or the gradients)."""
    scored = targets != IGNORE_INDEX
    rows, kept_targets = hidden[scored], targets[scored]
    pad = -rows.shape[0] % multiple
    return (torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]),
            torch.cat([kept_targets, kept_targets.new_full((pad,), IGNORE_INDEX)]))
