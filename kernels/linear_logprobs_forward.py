"""Forward of the fused linear log-prob op: log-sum-exp and target logit, streamed over V.

Grid: (row blocks, vocabulary splits). Each program owns BLOCK_N rows and one contiguous slice
of the vocabulary, and walks it BLOCK_V columns at a time keeping an online softmax in float32:

    m' = max(m, max_v z_v),   s' = s exp(m - m') + sum_{v != t} exp(z_v - m'),   z_t picked up once.

The target is kept out of the sum so that miss = 1 - p_t comes out without cancellation.
Splitting V keeps the GPU full when N is small; the per-split (m, s, z_t) are merged by torch in
O(N * splits):  S = sum_i s_i exp(m_i - M),  lse = M + log(S + exp(z_t - M)),
miss = S / (S + exp(z_t - M)).
No logits leave the chip.
"""
import torch
import triton
import triton.language as tl

from ..backends import merge_vocabulary_splits
from .logits_tile import logits_tile


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sum_excl_ptr, target_logit_ptr,
    num_rows, vocab, width, vocab_per_split,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)

    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_excl = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        others = tl.where(is_target, 0.0, tl.exp(z - new_max[:, None]))
        sum_excl = sum_excl * tl.exp(running_max - new_max) + tl.sum(others, axis=1)
        running_max = new_max

    out = split.to(tl.int64) * num_rows + rows
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_excl_ptr + out, sum_excl, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)


def linear_logprobs_forward(hidden, weight, bias, targets, *, block_n, block_v, block_h,
                            num_splits, num_warps, num_stages, upcast, new_output):
    """The ForwardResult (logp, lse, miss; each [M] float32) of compacted, contiguous inputs."""
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    vocab_blocks = triton.cdiv(vocab, block_v)
    num_splits = max(1, min(num_splits, vocab_blocks))
    vocab_per_split = triton.cdiv(vocab_blocks, num_splits) * block_v
    num_splits = triton.cdiv(vocab, vocab_per_split)

    partial = [new_output((num_splits, num_rows), torch.float32, hidden.device) for _ in range(3)]
    grid = (triton.cdiv(num_rows, block_n), num_splits)
    _forward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, targets,
        *partial,
        num_rows, vocab, width, vocab_per_split,
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return merge_vocabulary_splits(*partial)
