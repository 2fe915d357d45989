"""The forward's fused GEMM + online-softmax kernel in persistent, TMA-fed form (sm_90).

The same math as kernels/linear_logprobs_forward.py, from the same recurrences
(`fold_logits_tile`) over the same vocabulary splits, so the per-split sums and their merge are
those of the one-program-per-(row block, split) kernel: per row block and split, the logits
x = h W^T + b of each BLOCK_V-column tile are formed (float32 accumulators), transformed to z and
folded into the split's running maximum, sum of exp without the target, target logit and the
per-token outputs' sums asked for. What differs is how the work reaches the SMs:

- persistent: NUM_PROGRAMS programs (one per SM) walk the (row block, split) work items, program
  p taking items p, p + NUM_PROGRAMS, ...; the items are numbered in grouped rasterisation order
  (GROUP_N row blocks of one split before the next split), so the programs running together read
  the same weight slice from L2.
- TMA: h and W tiles come through tensor descriptors made on the device (bulk tensor copies into
  shared memory on sm_90, overlapped with earlier K-steps' wgmma by the software pipeline; ragged
  edges arrive as zeros, and the columns past the split or past V are masked to -inf as before).

Not warp-specialised, for the reason kernels/persistent_logit_gradient.py gives (Triton 3.9 does
not partition sm_90 loops): the online-softmax epilogue still runs between tensor-core steps.
"""
import torch
import triton
import triton.language as tl

from .grouped_tiles import grouped_tile
from .linear_logprobs_forward import (SPLIT_SUMS, fold_logits_tile, initial_split_sums, new_split_sums,
                                      split_vocabulary, store_split_sums)
from .logits_tile import logits_tile_from_descriptors, transform_logits
from .tensor_descriptors import launch_with_descriptor_workspace


@triton.jit
def _persistent_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sum_excl_ptr, target_logit_ptr, sum_all_ptr, shifted_ptr, sum_sq_ptr, logit_sum_ptr,
    max_before_ptr,
    num_rows, vocab, width, vocab_per_split, num_splits, pre, post,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr,
    HAS_LOGIT_SUM: tl.constexpr, HAS_MAX_BEFORE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    hidden_desc = tl.make_tensor_descriptor(hidden_ptr, shape=[num_rows, width], strides=[width, 1],
                                            block_shape=[BLOCK_N, BLOCK_H])
    weight_desc = tl.make_tensor_descriptor(weight_ptr, shape=[vocab, width], strides=[width, 1],
                                            block_shape=[BLOCK_V, BLOCK_H])
    num_items = tl.cdiv(num_rows, BLOCK_N) * num_splits
    for item in tl.range(tl.program_id(0), num_items, NUM_PROGRAMS):
        row_block, split = grouped_tile(item, num_rows, num_splits, BLOCK_N, 1, GROUP_N)
        rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < num_rows
        targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
        v_begin = split * vocab_per_split
        v_end = tl.minimum(v_begin + vocab_per_split, vocab)
        running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before = \
            initial_split_sums(BLOCK_N)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            col_mask = cols < v_end
            z = logits_tile_from_descriptors(hidden_desc, weight_desc, bias_ptr, row_block * BLOCK_N, v0, cols,
                                             col_mask, width, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST,
                                             DOT_PRECISION)
            z = transform_logits(z, pre, post, HAS_SOFTCAP)
            running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before = \
                fold_logits_tile(z, cols, col_mask, targets,
                                 running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum,
                                 max_before, HAS_ENTROPY, HAS_SUM_SQ, HAS_LOGIT_SUM, HAS_MAX_BEFORE)
        store_split_sums(split.to(tl.int64) * num_rows + rows, row_mask, max_ptr, sum_excl_ptr, target_logit_ptr,
                         sum_all_ptr, shifted_ptr, sum_sq_ptr, logit_sum_ptr, max_before_ptr,
                         running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before,
                         HAS_ENTROPY, HAS_SUM_SQ, HAS_LOGIT_SUM, HAS_MAX_BEFORE)


def persistent_linear_logprobs_forward(hidden, weight, bias, targets, *, pre, post, softcap, entropy, sum_sq,
                                       logit_sum, max_before, block_n, block_v, block_h, num_splits, group_n,
                                       num_programs, num_warps, num_stages, upcast, new_output):
    """linear_logprobs_forward.linear_logprobs_forward's contract, on at most `num_programs`
    persistent programs. hidden and weight must be descriptor_compatible
    (kernels/tensor_descriptors.py)."""
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    num_splits, vocab_per_split = split_vocabulary(vocab, block_v, num_splits)
    sums = new_split_sums(num_splits, num_rows, hidden.device, new_output, entropy=entropy, sum_sq=sum_sq,
                          logit_sum=logit_sum, max_before=max_before)
    items = triton.cdiv(num_rows, block_n) * num_splits

    def launch():
        _persistent_forward_kernel[(min(num_programs, items),)](
            hidden, weight, hidden if bias is None else bias, targets,
            *(sums.get(name, sums["row_max"]) for name in SPLIT_SUMS),
            num_rows, vocab, width, vocab_per_split, num_splits, pre, post,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap, HAS_ENTROPY=entropy, HAS_SUM_SQ=sum_sq,
            HAS_LOGIT_SUM=logit_sum, HAS_MAX_BEFORE=max_before,
            BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP_N=group_n, NUM_PROGRAMS=num_programs,
            UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )

    launch_with_descriptor_workspace(hidden.device, launch)
    return sums
