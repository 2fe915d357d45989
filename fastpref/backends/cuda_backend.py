"""CUDA backend: the fused ops as hand-written CUDA C++ kernels (csrc/), bound as ``fastpref._C``.

Same contract and the same math as the Triton backend:

- forward (csrc/linear_logprobs_forward.cu): per vocabulary split, online-softmax partials
  (running max, sum over non-target columns, target logit), merged here in O(N * splits);
- backward (csrc/linear_logprobs_backward.cu): logits recomputed from the saved log-sum-exp,
  gradients accumulated with float32 atomics, no weight-gradient work for a frozen head;
- preference losses (csrc/preference_pair_loss.cu, csrc/kto_loss.cu): one block per pair or
  sequence.

The kernels take raw pointers: every tensor handed to them is made contiguous and of the dtype
they expect here. Each launch goes to the inputs' device on its current stream; nothing
synchronises the device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._buffers import new_output
from ..loss_spec import PAIRED_LOSS_TYPES
from . import (Backend, ForwardResult, GradientBuffers, PreferenceLossResult, fused_loss_result,
               merge_vocabulary_splits)

try:
    from .. import _C

    _IMPORT_ERROR: Optional[str] = None
except ImportError as exc:  # pragma: no cover - depends on the install
    _C = None
    _IMPORT_ERROR = (
        f"the CUDA extension fastpref._C is not built ({exc}); build it with nvcc on PATH "
        "(or CUDA_HOME set): FASTPREF_BUILD_CUDA=1 pip install --no-build-isolation -e . "
        "(see csrc/README.md)"
    )

# WMMA on bfloat16 and the tile shapes need Ampere or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


def _dtype_code(dtype: torch.dtype) -> int:
    return {
        torch.float32: _C.DTYPE_FLOAT32,
        torch.float16: _C.DTYPE_FLOAT16,
        torch.bfloat16: _C.DTYPE_BFLOAT16,
    }[dtype]


def _launch_on(tensor: torch.Tensor) -> dict:
    """Where the kernels run: the tensor's device and that device's current stream."""
    return {"device": tensor.device.index,
            "stream": torch.cuda.current_stream(tensor.device).cuda_stream}


def _pointer(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _index(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int64).contiguous()


def _float32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float32).contiguous()


def splits_wanted(hidden: torch.Tensor) -> int:
    """Vocabulary splits per row block, so that about two blocks per SM run when rows are few."""
    sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    row_blocks = -(-hidden.shape[0] // _C.ROW_BLOCK)
    return max(1, 2 * sms // row_blocks)


def forward(hidden, weight, bias, targets, want_hidden_grad: bool) -> ForwardResult:
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    targets = _index(targets)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    num_splits, vocab_per_split = _C.vocab_split(vocab=vocab, splits_wanted=splits_wanted(hidden))
    split_max, split_sum_excl, split_target = (
        new_output((num_splits, num_rows), torch.float32, hidden.device) for _ in range(3))
    _C.linear_logprobs_forward(
        hidden=hidden.data_ptr(), weight=weight.data_ptr(), bias=_pointer(bias),
        targets=targets.data_ptr(), row_max=split_max.data_ptr(),
        sum_excl=split_sum_excl.data_ptr(), target_logit=split_target.data_ptr(),
        num_rows=num_rows, vocab=vocab, width=width, num_splits=num_splits,
        vocab_per_split=vocab_per_split, dtype=_dtype_code(hidden.dtype), **_launch_on(hidden))

    return merge_vocabulary_splits(split_max, split_sum_excl, split_target)


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp,
             need_hidden: bool, need_weight: bool, need_bias: bool):
    need_bias = need_bias and bias is not None
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    targets = _index(targets)
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    grads = GradientBuffers.zeros(hidden, weight, need_hidden, need_weight, need_bias)
    lse, miss, grad = _float32(saved.lse), _float32(saved.miss), _float32(grad_logp)
    _C.linear_logprobs_backward(
        hidden=hidden.data_ptr(), weight=weight.data_ptr(), bias=_pointer(bias),
        targets=targets.data_ptr(), lse=lse.data_ptr(), miss=miss.data_ptr(),
        grad_logp=grad.data_ptr(), d_hidden=_pointer(grads.d_hidden),
        d_weight=_pointer(grads.d_weight), d_bias=_pointer(grads.d_bias), num_rows=num_rows, vocab=vocab, width=width,
        dtype=_dtype_code(hidden.dtype), **_launch_on(hidden))
    return grads.in_input_dtypes(hidden, weight, bias)


def preference_loss(token_logp, layout, reference, spec, kl) -> PreferenceLossResult:
    device = token_logp.device
    token_logp = _float32(token_logp)
    cu_seqlens, lengths = _index(layout.cu_seqlens), _index(layout.lengths)
    sequence_logps = new_output((layout.num_sequences,), torch.float32, device)
    token_grad = new_output((layout.num_tokens,), torch.float32, device)
    if spec.is_paired:
        weights, averages = spec.kernel_tables(device)
        chosen_index, rejected_index = _index(layout.chosen_index), _index(layout.rejected_index)
        chosen_tokens = lengths.index_select(0, chosen_index).sum().float()
        reference = None if reference is None else _float32(reference)
        parts = new_output((len(PAIRED_LOSS_TYPES), layout.num_pairs), torch.float32, device)
        _C.preference_pair_loss(
            token_logp=token_logp.data_ptr(), cu_seqlens=cu_seqlens.data_ptr(),
            lengths=lengths.data_ptr(), chosen_index=chosen_index.data_ptr(),
            rejected_index=rejected_index.data_ptr(), reference_logps=_pointer(reference),
            weights=weights.data_ptr(), averages=averages.data_ptr(),
            chosen_tokens=chosen_tokens.data_ptr(), sequence_logps=sequence_logps.data_ptr(),
            parts=parts.data_ptr(), token_grad=token_grad.data_ptr(),
            num_pairs=layout.num_pairs, beta=spec.beta, label_smoothing=spec.label_smoothing,
            simpo_gamma=spec.simpo_gamma, **_launch_on(token_logp))
        return fused_loss_result(spec, parts, sequence_logps, token_grad, weights)
    else:
        desirable = layout.desirable.to(torch.uint8).contiguous()
        reference, kl = _float32(reference), _float32(kl)
        parts = new_output((1, layout.num_sequences), torch.float32, device)
        _C.kto_loss(
            token_logp=token_logp.data_ptr(), cu_seqlens=cu_seqlens.data_ptr(),
            lengths=lengths.data_ptr(), desirable=desirable.data_ptr(),
            reference_logps=reference.data_ptr(), kl=kl.data_ptr(),
            sequence_logps=sequence_logps.data_ptr(), parts=parts.data_ptr(),
            token_grad=token_grad.data_ptr(), num_sequences=layout.num_sequences,
            beta=spec.beta, desirable_weight=spec.desirable_weight,
            undesirable_weight=spec.undesirable_weight, average=spec.averages("kto"),
            **_launch_on(token_logp))
    return fused_loss_result(spec, parts, sequence_logps, token_grad)


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got tensors on a {device.type} device"
    if not torch.cuda.is_available():
        return ("fastpref._C is built, but torch sees no CUDA device (no GPU or driver, or a "
                "CPU-only build of torch)")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"the CUDA kernels need compute capability {MIN_COMPUTE_CAPABILITY[0]}."
                f"{MIN_COMPUTE_CAPABILITY[1]} or newer (sm_80+); {device} has "
                f"{capability[0]}.{capability[1]}")
    return None


BACKEND = Backend(
    name="cuda",
    forward=forward,
    backward=backward,
    preference_loss=preference_loss,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    priority=5,
    native_devices=("cuda",),
)
