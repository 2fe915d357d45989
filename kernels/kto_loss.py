"""Fused KTO loss: reduction, loss and gradient in one kernel over all (unpaired) sequences.

Program s owns sequence s: with D = (pi - ref) (summed, or averaged over the response tokens),
sign = +1 for a desirable sequence and -1 otherwise, z = beta (D - z0) sign,

    loss_s = w_s (1 - s(z)) / S,     d loss_s / d D = -w_s beta sign s(z) (1 - s(z)) / S,

written back over the sequence's tokens as the per-token gradient scale. z0 (the KL reference
point) is a detached scalar.
"""
import torch
import triton
import triton.language as tl

from .scalar_math import sequence_fill, sequence_sum, sigmoid


@triton.jit
def _kto_loss_kernel(
    token_logp_ptr, cu_seqlens_ptr, lengths_ptr, desirable_ptr, reference_ptr, kl_ptr,
    sequence_logp_ptr, parts_ptr, token_grad_ptr,
    num_sequences, beta, desirable_weight, undesirable_weight,
    AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq)
    end = tl.load(cu_seqlens_ptr + seq + 1)
    total = sequence_sum(token_logp_ptr, start, end, BLOCK_T)
    tl.store(sequence_logp_ptr + seq, total)
    scale = 1.0
    if AVERAGE:
        scale = 1.0 / tl.load(lengths_ptr + seq).to(tl.float32)
    desirable = tl.load(desirable_ptr + seq) != 0
    sign = tl.where(desirable, 1.0, -1.0)
    weight = tl.where(desirable, desirable_weight, undesirable_weight)
    z = beta * ((total - tl.load(reference_ptr + seq)) * scale - tl.load(kl_ptr)) * sign
    s = sigmoid(z)
    tl.store(parts_ptr + seq, weight * (1.0 - s) / num_sequences)
    grad = -weight * beta * sign * s * (1.0 - s) / num_sequences * scale
    sequence_fill(token_grad_ptr, start, end, grad, BLOCK_T)


def kto_loss(token_logp, layout, reference_logps, kl, *, beta, desirable_weight,
             undesirable_weight, average, new_output, block_t=1024):
    """Returns (parts [1, S], sequence_logps [S], token_grad [N]), all float32."""
    device = token_logp.device
    num_sequences = layout.num_sequences
    sequence_logps = new_output((num_sequences,), torch.float32, device)
    parts = new_output((1, num_sequences), torch.float32, device)
    token_grad = new_output((layout.num_tokens,), torch.float32, device)
    _kto_loss_kernel[(num_sequences,)](
        token_logp, layout.cu_seqlens, layout.lengths, layout.desirable.to(torch.int8),
        reference_logps, kl, sequence_logps, parts, token_grad,
        num_sequences, beta, desirable_weight, undesirable_weight,
        AVERAGE=average, BLOCK_T=block_t,
    )
    return parts, sequence_logps, token_grad
