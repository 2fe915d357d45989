"""Backend registry for the fused linear log-prob op.

A backend computes, on *compacted* inputs (every target valid, nothing to ignore), the forward
``(logp, lse, u)`` and the backward ``(d_hidden, d_weight, d_bias)`` of

    z_n = W h_n + b,   lse_n = logsumexp_v z_{n,v},   logp_n = z_{n,t_n} - lse_n

without ever holding the [N x V] logits. The public op (:func:`fastpref.linear_logprobs`) does the
validation, the compaction of ignored positions and the autograd wiring; backends only do math.

Backends register themselves with :func:`register`; ``"auto"`` picks the best one that can run
on the inputs' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class ForwardResult:
    """What a backend's forward returns, all float32.

    logp: [M] log-probabilities of the targets.
    lse:  [M] log-sum-exp of each row's logits (saved for the backward).
    miss: [M] 1 - p(target) = sum_{v != t} p_v, summed directly rather than subtracted from 1,
        so that confident rows (p_t -> 1) keep full relative precision in logp = log1p(-miss)
        and in the target's gradient g * miss.
    hidden_grad_direction: [M, H] or None. When the backend folds the hidden gradient into the
        forward pass it returns u_n = W_{t_n} - sum_v p_{n,v} W_v, so that d_hidden = g * u.
    """

    logp: torch.Tensor
    lse: torch.Tensor
    miss: torch.Tensor
    hidden_grad_direction: Optional[torch.Tensor] = None


@dataclass
class PreferenceLossResult:
    """What a backend's fused preference loss returns (float32, detached).

    loss: [] the weighted total.
    parts: [T, P] each loss type's contribution per pair (per sequence for KTO), already divided
        by its normaliser, so parts[k].sum() is loss type k's value; rows follow
        loss_spec.PAIRED_LOSS_TYPES (a single row for KTO), zero for unused types.
    sequence_logps: [S] summed response log-probs of every sequence.
    token_grad: [N] dloss/dlogp_n for every packed token (the sequence's coefficient; positions
        outside responses are ignored downstream).
    """

    loss: torch.Tensor
    parts: torch.Tensor
    sequence_logps: torch.Tensor
    token_grad: torch.Tensor


@dataclass
class Backend:
    """One implementation of the op.

    forward(hidden, weight, bias, targets, want_hidden_grad) -> ForwardResult
    backward(hidden, weight, bias, targets, forward_result, grad_logp,
             need_hidden, need_weight, need_bias) -> (d_hidden, d_weight, d_bias)
        Gradients come back in the dtype of their input; those not needed are None.
    preference_loss(token_logp, layout, reference_logps, spec, kl) -> PreferenceLossResult
        The per-sequence reduction, the pair (or KTO) loss and its gradient, in one pass over all
        pairs. reference_logps: [S] summed reference log-probs or None; kl: [] KTO reference point.
    unavailable_reason(device) -> None if the backend can run on `device`, else why not.
    dtypes: the floating dtypes it accepts.
    priority: higher wins under backend="auto".
    native_devices: device types "auto" may pick it for (None: any). A backend can run
        elsewhere without being chosen there, as Triton's interpreter does on the CPU.
    """

    name: str
    forward: Callable[..., ForwardResult]
    backward: Callable[..., Tuple[Optional[torch.Tensor], ...]]
    preference_loss: Callable[..., PreferenceLossResult]
    unavailable_reason: Callable[[torch.device], Optional[str]]
    dtypes: Tuple[torch.dtype, ...]
    priority: int
    native_devices: Optional[Tuple[str, ...]] = None


_REGISTRY: Dict[str, Backend] = {}

# The most memory the backward's logit-gradient scratch may take: it sets the vocabulary slab
# width, Vs = scratch / (N * element bytes). At N = 16,384 bf16 rows that is 2,048 columns, and with
# the hidden gradient's bfloat16 remainder (128 MiB at H = 4,096) the backward's extra memory is
# 192 MiB, under 1% of the 19.6 GiB that materialized logits take there (fastpref plan).
DEFAULT_SCRATCH_BYTES = 64 << 20
_scratch_bytes = DEFAULT_SCRATCH_BYTES


def set_scratch_bytes(value: int) -> None:
    """Set the memory budget (bytes) of the backward's [N, Vs] scratch; smaller slabs run more
    but smaller matmuls. The budget is a floor of one tile of columns, whatever the value."""
    global _scratch_bytes
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"scratch_bytes must be a positive int, got {value!r}")
    _scratch_bytes = value


def scratch_bytes() -> int:
    """The current budget of set_scratch_bytes (DEFAULT_SCRATCH_BYTES unless changed)."""
    return _scratch_bytes


def slab_columns(num_rows: int, vocab: int, element_bytes: int, budget: int, multiple: int = 1) -> int:
    """The widest vocabulary slab whose [num_rows, columns] scratch of element_bytes fits the
    budget: a multiple of `multiple` columns (a kernel's tile), at least one, at most V."""
    columns = budget // max(1, num_rows * element_bytes) // multiple * multiple
    return int(max(multiple, min(columns, vocab)))


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


def low_part_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype of the remainder lo that the GPU backends keep beside a d_hidden of `dtype` summed
    over vocabulary slabs (d_hidden = hi + lo, see kernels/hidden_gradient.py); None when d_hidden
    itself accumulates in at least float32."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else None


def frozen_head(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """No gradient wanted for the head: a backend may then fold the hidden gradient into its forward."""
    return not weight.requires_grad and (bias is None or not bias.requires_grad)


def target_logprob(target_logit: torch.Tensor, lse: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
    """log p_t without cancellation at either end.

    A confident row (p_t near 1) gets log1p(-miss), exact to rounding however close p_t is to 1;
    elsewhere z_t - lse is the precise form (miss rounds to 1 there).
    """
    return torch.where(miss < 0.5, torch.log1p(-miss), target_logit - lse)


def merge_vocabulary_splits(split_max: torch.Tensor, split_sum_excl: torch.Tensor,
                            split_target: torch.Tensor) -> ForwardResult:
    """Merge per-split online-softmax states [splits, M] into the forward's result.

    Split i holds its running max m_i, its sum over non-target columns s_i (relative to m_i) and
    the target logit if the target falls in it (0 otherwise). With M = max_i m_i:
    S = sum_i s_i exp(m_i - M),  lse = M + log(S + exp(z_t - M)),  miss = S / (S + exp(z_t - M)).
    """
    row_max = split_max.amax(dim=0)
    sum_excl = (split_sum_excl * torch.exp(split_max - row_max)).sum(dim=0)
    target_logit = split_target.sum(dim=0)
    row_sum = sum_excl + torch.exp(target_logit - row_max)
    lse = row_max + row_sum.log()
    miss = sum_excl / row_sum
    return ForwardResult(logp=target_logprob(target_logit, lse, miss), lse=lse, miss=miss)


@dataclass
class GradientBuffers:
    """Zeroed float32 buffers the backward kernels add into; None where a gradient is not wanted."""

    d_hidden: Optional[torch.Tensor]
    d_weight: Optional[torch.Tensor]
    d_bias: Optional[torch.Tensor]

    @classmethod
    def zeros(cls, hidden, weight, need_hidden: bool, need_weight: bool, need_bias: bool) -> "GradientBuffers":
        def buffer(shape, wanted):
            return torch.zeros(shape, dtype=torch.float32, device=hidden.device) if wanted else None

        return cls(buffer(hidden.shape, need_hidden), buffer(weight.shape, need_weight),
                   buffer(weight.shape[:1], need_bias))

    def in_input_dtypes(self, hidden, weight, bias) -> Tuple[Optional[torch.Tensor], ...]:
        return tuple(None if grad is None else grad.to(like.dtype)
                     for grad, like in ((self.d_hidden, hidden), (self.d_weight, weight), (self.d_bias, bias)))


def fused_loss_result(spec, parts, sequence_logps, token_grad, weights=None) -> PreferenceLossResult:
    """The total of a fused kernel's per-type parts: paired kernels weight each type themselves
    (`weights` [T]); the KTO kernel's single type is scaled here, gradient included."""
    if weights is not None:
        return PreferenceLossResult((weights[:, None] * parts).sum(), parts, sequence_logps, token_grad)
    weight = spec.loss_weights[0]
    return PreferenceLossResult(weight * parts.sum(), parts, sequence_logps, token_grad * weight)


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def registered_backends() -> List[str]:
    """Names of every registered backend, whether or not it can run here."""
    return sorted(_REGISTRY)


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Names of the backends that can run on `device`, best first."""
    device = torch.device(device)
    usable = [b for b in _REGISTRY.values() if b.unavailable_reason(device) is None]
    return [b.name for b in sorted(usable, key=lambda b: -b.priority)]


def resolve(name: str, device: torch.device) -> Backend:
    """The backend called `name` (or the best one for "auto"), checked to run on `device`."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        for choice in available_backends(device):
            native = _REGISTRY[choice].native_devices
            if native is None or device.type in native:
                return _REGISTRY[choice]
        raise RuntimeError(f"no registered backend can run on device {device}")
    if name not in _REGISTRY:
        raise ValueError(
            f"backend must be 'auto' or one of {registered_backends()}, got {name!r}"
        )
    backend = _REGISTRY[name]
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on device {device}: {reason}")
    return backend


def _register_builtin() -> None:
    from . import cuda_backend, torch_backend, triton_backend

    register(torch_backend.BACKEND)
    register(triton_backend.BACKEND)
    register(cuda_backend.BACKEND)


_register_builtin()
