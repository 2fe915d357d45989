"""Backend registry for the fused linear log-prob op.

A backend computes, on *compacted* inputs (every target valid, nothing to ignore), the forward
``(logp, lse, miss, per-token outputs, u)`` and the backward ``(d_hidden, d_weight, d_bias)`` of

    z_n = s(W h_n + b),   lse_n = logsumexp_v z_{n,v},   logp_n = z_{n,t_n} - lse_n

with s the logit transform (fastpref.logit_transform), without ever holding the [N x V] logits. The public op (:func:`fastpref.linear_logprobs`) does the
validation, the compaction of ignored positions and the autograd wiring; backends only do math.

Backends register themselves with :func:`register`; ``"auto"`` picks the best one that can run
on the inputs' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from ..logit_transform import LogitTransform
from .scratch import DEFAULT_SCRATCH_BYTES

# The per-token outputs a backend computes beside the log-probs when asked (TRL's names).
EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class HeadOptions:
    """The per-call options every backend reads.

    transform: the logit transform (logit scale, soft cap, temperature) between W h + b and z.
    outputs: which of EXTRA_OUTPUTS to compute in the same pass.
    scratch_bytes: the budget of the scratch buffers (see backends.scratch).
    """

    transform: LogitTransform = LogitTransform()
    outputs: FrozenSet[str] = frozenset()
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES

    @property
    def entropy(self) -> bool:
        return "entropy" in self.outputs


@dataclass
class ForwardResult:
    """What a backend's forward returns, [M] float32 (float64 for float64 inputs) per row.

    logp: log-probabilities of the targets under the transformed logits z.
    lse:  log-sum-exp of each row's z (saved for the backward).
    miss: 1 - p(target) = sum_{v != t} p_v, summed directly rather than subtracted from 1,
        so that confident rows (p_t -> 1) keep full relative precision in logp = log1p(-miss)
        and in the target's gradient g * miss.
    entropy, log_sum_sq_probs, mean_logits, is_top1 (bool): the outputs asked for, else None
        (see backends.online_softmax for their sums).
    hidden_grad_direction: [M, H] or None. When the backend folds the hidden gradient into the
        forward pass (a frozen head) it returns u_n = J_t W_{t_n} - sum_v p_{n,v} J_v W_v, with
        J_v = dz_v/dx_v the transform's slope, so that d_hidden = g * u.
    row_max: the largest z of each row (the reference of the sums; the vocabulary-parallel head
        merges the processes' slices relative to it).
    """

    logp: torch.Tensor
    lse: torch.Tensor
    miss: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    hidden_grad_direction: Optional[torch.Tensor] = None
    row_max: Optional[torch.Tensor] = None


@dataclass
class Backend:
    """One implementation of the LM-head op (the preference losses on top are plain torch, one
    table for every backend: fastpref.loss_types).

    forward(hidden, weight, bias, targets, options, fold_hidden_gradient) -> ForwardResult
        fold_hidden_gradient: the head is frozen and only the log-probs' hidden gradient will be
        wanted: fold it into the forward (hidden_grad_direction), so that the backward is a scale.
    backward(hidden, weight, bias, targets, forward_result, grad_logp, grad_entropy, options,
             need_hidden, need_weight, need_bias) -> (d_hidden, d_weight, d_bias)
        grad_entropy: [M] or None (no entropy, or none of its gradient wanted). Gradients come
        back in the dtype of their input; those not needed are None.
    forward_backward_by_groups(hidden, weight, bias, targets, groups, token_gradient, options,
             need_hidden, need_weight, need_bias, store_bytes) -> (logp, d_hidden, d_weight, d_bias)
        The log-probs and their gradients in one pass per group of rows, for a loss whose
        gradient of a group is known once that group's log-probs are (fastpref.head_loss; see
        torch_backend.forward_backward_by_groups); token_gradient None: the log-probs alone, as
        the pass with gradients computes them. None where the backend has none.
    unavailable_reason(device) -> None if the backend can run on `device`, else why not.
    dtypes: the floating dtypes it accepts.
    priority: higher wins under backend="auto".
    native_devices: device types "auto" may pick it for (None: any). A backend can run
        elsewhere without being chosen there, as Triton's interpreter does on the CPU.
    """

    name: str
    forward: Callable[..., ForwardResult]
    backward: Callable[..., Tuple[Optional[torch.Tensor], ...]]
    unavailable_reason: Callable[[torch.device], Optional[str]]
    dtypes: Tuple[torch.dtype, ...]
    priority: int
    native_devices: Optional[Tuple[str, ...]] = None
    forward_backward_by_groups: Optional[Callable[..., Tuple[Optional[torch.Tensor], ...]]] = None


_REGISTRY: Dict[str, Backend] = {}


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


def best_backend(device: torch.device, accept: Callable[[Backend], bool] = lambda backend: True) -> Optional[Backend]:
    """What "auto" picks on `device`: the best backend that can run there and is native to it,
    among those `accept` takes; None where there is none."""
    for choice in available_backends(device):
        backend = _REGISTRY[choice]
        if (backend.native_devices is None or device.type in backend.native_devices) and accept(backend):
            return backend
    return None


def resolve(name: str, device: torch.device) -> Backend:
    """The backend called `name` (or the best one for "auto"), checked to run on `device`."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        backend = best_backend(device)
        if backend is None:
            raise RuntimeError(f"no registered backend can run on device {device}")
        return backend
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
