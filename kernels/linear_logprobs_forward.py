"""Forward of the fused linear log-prob op: the online-softmax sums of each row, streamed over V.

Grid: (row blocks, vocabulary splits). Each program owns BLOCK_N rows and one contiguous slice
of the vocabulary, and walks it BLOCK_V columns at a time. Per tile it forms the logits
x = h W^T + b (tensor cores, float32 accumulators), transforms them to z (logit scale, soft cap,
temperature: kernels/logits_tile.py) and folds them into float32 sums relative to the running
maximum m (alpha = exp(m - m') when it grows):

    m' = max(m, max_v z_v),   s' = alpha s + sum_{v != t} exp(z_v - m'),   z_t picked up once,

and, for the per-token outputs asked for (constexpr flags, so a plain call carries none of it),

    sum_all' = alpha sum_all + sum_v exp(z_v - m')
    shifted' = alpha (shifted + (m - m') sum_all) + sum_v exp(z_v - m') (z_v - m')   (entropy)
    sum_sq'  = alpha^2 sum_sq + sum_v exp(2 (z_v - m'))                              (log sum p^2)
    logit_sum' = logit_sum + sum_v z_v                                                (mean logit)
    max_before' = max(max_before, max_{v < t} z_v)                                    (is_top1)

The target is kept out of s so that miss = 1 - p_t comes out without cancellation. Splitting V
keeps the GPU full when N is small; the per-split sums are merged by the caller in O(N * splits)
(fastpref.backends.online_softmax). No logits leave the chip.
"""
import torch
import triton
import triton.language as tl

from .logits_tile import logits_tile, transform_logits

# The per-split sums this kernel writes, in its argument order: always the first three, the
# others when their output is asked for.
SPLIT_SUMS = ("row_max", "sum_excl", "target", "sum_all", "shifted", "sum_sq", "logit_sum", "max_before")


@triton.jit
def initial_split_sums(BLOCK_N: tl.constexpr):
    """(running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before) before
    any column."""
    return (tl.full((BLOCK_N,), float("-inf"), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.full((BLOCK_N,), float("-inf"), tl.float32))


@triton.jit
def fold_logits_tile(z, cols, col_mask, targets,
                     running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before,
                     HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_LOGIT_SUM: tl.constexpr,
                     HAS_MAX_BEFORE: tl.constexpr):
    """The split's sums after the transformed logits z of columns cols (the module's recurrences);
    the columns outside col_mask count as logits of -inf. Shared by the one-program-per-split
    kernel and the persistent one (kernels/persistent_forward.py)."""
    z = tl.where(col_mask[None, :], z, float("-inf"))
    is_target = cols[None, :] == targets[:, None]
    target_logit += tl.sum(tl.where(is_target, z, 0.0), axis=1)
    if HAS_LOGIT_SUM:
        logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    if HAS_MAX_BEFORE:
        max_before = tl.maximum(max_before, tl.max(tl.where(cols[None, :] < targets[:, None], z, float("-inf")),
                                                   axis=1))
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    # exactly 1 when the maximum stays, also at -inf (a tile of masked columns): no exp(nan)
    alpha = tl.where(running_max == new_max, 1.0, tl.exp(running_max - new_max))
    shifted_z = z - new_max[:, None]
    exp_z = tl.exp(shifted_z)
    sum_excl = sum_excl * alpha + tl.sum(tl.where(is_target, 0.0, exp_z), axis=1)
    if HAS_ENTROPY:
        shift = (tl.where(sum_all > 0, running_max, new_max) - new_max) * sum_all  # 0 before any column
        # a column of logit -inf (masked, or outside the split) adds exp(-inf) (-inf) = 0, not nan
        shifted = alpha * (shifted + shift) + tl.sum(tl.where(exp_z > 0, exp_z * shifted_z, 0.0), axis=1)
        sum_all = sum_all * alpha + tl.sum(exp_z, axis=1)
    if HAS_SUM_SQ:
        sum_sq = sum_sq * alpha * alpha + tl.sum(exp_z * exp_z, axis=1)
    return new_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before


@triton.jit
def store_split_sums(out, row_mask, max_ptr, sum_excl_ptr, target_logit_ptr, sum_all_ptr, shifted_ptr, sum_sq_ptr,
                     logit_sum_ptr, max_before_ptr,
                     running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before,
                     HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr, HAS_LOGIT_SUM: tl.constexpr,
                     HAS_MAX_BEFORE: tl.constexpr):
    """The sums asked for, at offsets `out` ([split, row] of the [splits, M] outputs)."""
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_excl_ptr + out, sum_excl, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(sum_all_ptr + out, sum_all, mask=row_mask)
        tl.store(shifted_ptr + out, shifted, mask=row_mask)
    if HAS_SUM_SQ:
        tl.store(sum_sq_ptr + out, sum_sq, mask=row_mask)
    if HAS_LOGIT_SUM:
        tl.store(logit_sum_ptr + out, logit_sum, mask=row_mask)
    if HAS_MAX_BEFORE:
        tl.store(max_before_ptr + out, max_before, mask=row_mask)


@triton.jit
def _forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
    max_ptr, sum_excl_ptr, target_logit_ptr, sum_all_ptr, shifted_ptr, sum_sq_ptr, logit_sum_ptr,
    max_before_ptr,
    num_rows, vocab, width, vocab_per_split, pre, post,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_SUM_SQ: tl.constexpr,
    HAS_LOGIT_SUM: tl.constexpr, HAS_MAX_BEFORE: tl.constexpr,
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
    running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before = \
        initial_split_sums(BLOCK_N)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_mask = cols < v_end
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_mask, cols, col_mask, width,
                        HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION)
        z = transform_logits(z, pre, post, HAS_SOFTCAP)
        running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before = fold_logits_tile(
            z, cols, col_mask, targets,
            running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before,
            HAS_ENTROPY, HAS_SUM_SQ, HAS_LOGIT_SUM, HAS_MAX_BEFORE)

    store_split_sums(split.to(tl.int64) * num_rows + rows, row_mask, max_ptr, sum_excl_ptr, target_logit_ptr,
                     sum_all_ptr, shifted_ptr, sum_sq_ptr, logit_sum_ptr, max_before_ptr,
                     running_max, sum_excl, target_logit, sum_all, shifted, sum_sq, logit_sum, max_before,
                     HAS_ENTROPY, HAS_SUM_SQ, HAS_LOGIT_SUM, HAS_MAX_BEFORE)


def split_vocabulary(vocab, block_v, num_splits):
    """(splits, columns per split): V cut into at most num_splits slices of whole tiles."""
    vocab_blocks = triton.cdiv(vocab, block_v)
    num_splits = max(1, min(num_splits, vocab_blocks))
    vocab_per_split = triton.cdiv(vocab_blocks, num_splits) * block_v
    return triton.cdiv(vocab, vocab_per_split), vocab_per_split


def new_split_sums(num_splits, num_rows, device, new_output, *, entropy, sum_sq, logit_sum, max_before):
    """{name: [splits, M] float32} for the names of SPLIT_SUMS the flags ask for."""
    wanted = {"row_max": True, "sum_excl": True, "target": True, "sum_all": entropy, "shifted": entropy,
              "sum_sq": sum_sq, "logit_sum": logit_sum, "max_before": max_before}
    return {name: new_output((num_splits, num_rows), torch.float32, device) for name in SPLIT_SUMS if wanted[name]}


def linear_logprobs_forward(hidden, weight, bias, targets, *, pre, post, softcap, entropy, sum_sq, logit_sum,
                            max_before, block_n, block_v, block_h, num_splits, num_warps, num_stages, upcast,
                            new_output):
    """{name: [splits, M] float32} of compacted, contiguous inputs, for the names of SPLIT_SUMS the
    flags ask for (entropy: sum_all and shifted)."""
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    num_splits, vocab_per_split = split_vocabulary(vocab, block_v, num_splits)
    sums = new_split_sums(num_splits, num_rows, hidden.device, new_output, entropy=entropy, sum_sq=sum_sq,
                          logit_sum=logit_sum, max_before=max_before)
    grid = (triton.cdiv(num_rows, block_n), num_splits)
    _forward_kernel[grid](
        hidden, weight, hidden if bias is None else bias, targets,
        *(sums.get(name, sums["row_max"]) for name in SPLIT_SUMS),
        num_rows, vocab, width, vocab_per_split, pre, post,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap, HAS_ENTROPY=entropy, HAS_SUM_SQ=sum_sq,
        HAS_LOGIT_SUM=logit_sum, HAS_MAX_BEFORE=max_before,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        UPCAST=upcast, DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    return sums
