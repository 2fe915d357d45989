"""Pure-PyTorch backend: blocked over rows *and* vocabulary, runs anywhere.

It is the readable reference of the blocked algorithm, the CPU path, and the fallback on a GPU
where a kernel cannot run. No tensor larger than one [row_block x vocab_block] block of logits
ever exists, whatever N and V: 16 MiB of fp32 on a CPU; on a GPU everything a block allocates
fits the scratch budget (fastpref.set_scratch_bytes), in blocks as large as that allows, so every
matmul is one large cuBLAS GEMM.

Forward, for each block of rows, streaming over vocabulary blocks W_b with an online softmax
(running max m, running sum s, rescaled by alpha = exp(m_old - m_new) when m grows):

    z      = h W_b^T + b_b                         (one block of logits)
    s_excl = alpha s_excl + sum_{v != t} exp(z_v - m)
    z_t    = the target's logit, picked up in the block that holds it
    and, when the hidden gradient will be needed (the one-pass formulation):
    acc    = alpha acc   + sum_{v != t} exp(z_v - m) W_v

    s = s_excl + exp(z_t - m),  lse = m + log s,  miss = s_excl / s = 1 - p_t,
    logp = log1p(-miss) or z_t - lse (see backends.target_logprob),
    u   = miss W_t - acc / s  =  W_t - sum_v p_v W_v.

Keeping the target out of the sums avoids the cancellation of 1 - p_t and of W_t - p_t W_t when
the model is confident (p_t -> 1). u is saved in the inputs' dtype (a bf16 [N, H], not float32:
it is rounded once, as the gradient will be), and the hidden gradient of the backward is a scale,
d_hidden_n = g_n u_n: a frozen head costs 4NHV FLOPs in all.

Backward for a trainable head: one more pass recomputing z from the saved lse,

    dz = -g exp(z - lse) off the target, g miss on it,   dW_b += dz^T h,   db_b += sum_n dz,

accumulated in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._buffers import new_output
from . import Backend, ForwardResult, matmul_float32, scratch_bytes, slab_columns, target_logprob
from .torch_preference_loss import preference_loss

# On a CPU a block of logits holds at most this many elements (cache-sized matmuls run at the
# CPU's GEMM speed); rows per block are capped so that long inputs still stream over the vocabulary.
BLOCK_ELEMENTS = 1 << 22
MAX_ROW_BLOCK = 2048


def _block_sizes(num_rows: int, vocab: int, device: torch.device, accumulator_width: int = 0) -> Tuple[int, int]:
    """(rows, columns) of a logits block; accumulator_width: H when each row also carries float32
    [rows, H] accumulators (the forward's u). On a GPU everything a block allocates fits the
    scratch budget (fastpref.set_scratch_bytes): with accumulators, half of it goes to them (room for
    four float32 [rows, H]: u, its matmul's product, and W_t gathered and upcast) and half to a vocabulary
    slab of logits (float32, and its half-precision copy for the matmul); without, all rows
    and a slab as wide as the budget allows, so that each matmul is one large cuBLAS GEMM. On a
    CPU, cache-sized blocks."""
    if device.type == "cuda":
        return gpu_block_sizes(num_rows, vocab, accumulator_width)
    row_block = max(1, min(num_rows, MAX_ROW_BLOCK))
    vocab_block = max(1, min(vocab, BLOCK_ELEMENTS // row_block))
    return row_block, vocab_block


def gpu_block_sizes(num_rows: int, vocab: int, accumulator_width: int = 0,
                    budget: Optional[int] = None) -> Tuple[int, int]:
    """_block_sizes on a GPU: the largest blocks whose allocations fit `budget` bytes
    (scratch_bytes() unless given)."""
    budget = scratch_bytes() if budget is None else budget
    if not accumulator_width:
        return max(1, num_rows), slab_columns(num_rows, vocab, 4, budget)
    rows = max(1, min(num_rows, budget // 2 // (4 * 4 * accumulator_width)))
    return rows, slab_columns(rows, vocab, 4 + 2, budget // 2)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Half-precision matmuls are slow and inexact on CPU: compute there in float32."""
    if tensor.dtype == torch.float64:
        return torch.float64
    if tensor.device.type == "cpu":
        return torch.float32
    return tensor.dtype


def _accumulate_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b in out_dtype, accumulated at least in float32 (never rounded to half precision first)."""
    return a @ b if out_dtype == torch.float64 else matmul_float32(a, b)


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], out_dtype) -> torch.Tensor:
    z = _matmul(h, w.t(), out_dtype)
    if b is not None:
        z += b.to(out_dtype)
    return z


def _target_columns(targets: torch.Tensor, v0: int, v1: int):
    """Which rows have their target in the block [v0, v1), and each row's target column in the
    block ([rows, 1], clamped into it where the target lies elsewhere): masks rather than indices,
    so that no host synchronisation stalls a GPU between blocks."""
    local = targets - v0
    return (local >= 0) & (local < v1 - v0), local.clamp(0, v1 - v0 - 1)[:, None]


def _set_target_entries(block: torch.Tensor, hit: torch.Tensor, column: torch.Tensor, values) -> None:
    """block[n, column[n]] = values[n] on the rows where hit, in place."""
    kept = block.gather(1, column).squeeze(1)
    block.scatter_(1, column, torch.where(hit, values, kept)[:, None])


def forward(hidden, weight, bias, targets, want_hidden_grad: bool) -> ForwardResult:
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    cdt, adt = _compute_dtype(hidden), _accumulate_dtype(hidden)
    row_block, vocab_block = _block_sizes(num_rows, vocab, hidden.device, width if want_hidden_grad else 0)

    logp = new_output((num_rows,), adt, hidden.device)
    lse = new_output((num_rows,), adt, hidden.device)
    miss = new_output((num_rows,), adt, hidden.device)
    # kept in the inputs' dtype: u is the hidden gradient's direction, rounded once like the gradient
    direction = new_output((num_rows, width), hidden.dtype, hidden.device) if want_hidden_grad else None

    for r0 in range(0, num_rows, row_block):
        r1 = min(r0 + row_block, num_rows)
        h = hidden[r0:r1].to(cdt)
        t = targets[r0:r1]
        rows = r1 - r0
        running_max = torch.full((rows,), float("-inf"), dtype=adt, device=hidden.device)
        sum_excl = torch.zeros(rows, dtype=adt, device=hidden.device)
        target_logit = torch.zeros(rows, dtype=adt, device=hidden.device)
        if want_hidden_grad:
            acc = torch.zeros(rows, width, dtype=adt, device=hidden.device)

        for v0 in range(0, vocab, vocab_block):
            v1 = min(v0 + vocab_block, vocab)
            w = weight[v0:v1].to(cdt)
            z = _logits(h, w, None if bias is None else bias[v0:v1], adt)
            hit, column = _target_columns(t, v0, v1)
            target_logit = torch.where(hit, z.gather(1, column).squeeze(1), target_logit)

            new_max = torch.maximum(running_max, z.amax(dim=1))
            alpha = torch.exp(running_max - new_max)
            running_max = new_max
            exp_z = z.sub_(new_max[:, None]).exp_()
            _set_target_entries(exp_z, hit, column, 0.0)
            sum_excl.mul_(alpha).add_(exp_z.sum(dim=1))
            if want_hidden_grad:
                acc.mul_(alpha[:, None]).add_(_matmul(exp_z.to(cdt), w, adt))

        row_sum = sum_excl + torch.exp(target_logit - running_max)
        row_lse = running_max + row_sum.log()
        row_miss = sum_excl / row_sum
        lse[r0:r1] = row_lse
        miss[r0:r1] = row_miss
        logp[r0:r1] = target_logprob(target_logit, row_lse, row_miss)
        if want_hidden_grad:
            w_t = weight[t].to(adt)
            direction[r0:r1] = acc.div_(row_sum[:, None]).neg_().addcmul_(row_miss[:, None], w_t)

    return ForwardResult(logp=logp, lse=lse, miss=miss, hidden_grad_direction=direction)


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp,
             need_hidden: bool, need_weight: bool, need_bias: bool):
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    cdt, adt = _compute_dtype(hidden), _accumulate_dtype(hidden)
    g = grad_logp.to(adt)

    d_hidden = None
    if need_hidden:
        # row blocks: the float32 product g u never exists for all rows at once
        d_hidden = new_output((num_rows, width), hidden.dtype, hidden.device)
        row_block = _block_sizes(num_rows, vocab, hidden.device, width)[0]
        for r0 in range(0, num_rows, row_block):
            r1 = min(r0 + row_block, num_rows)
            d_hidden[r0:r1] = g[r0:r1, None] * saved.hidden_grad_direction[r0:r1]
    if not (need_weight or need_bias):
        return d_hidden, None, None

    d_weight = torch.zeros(vocab, width, dtype=adt, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=adt, device=hidden.device) if need_bias else None
    row_block, vocab_block = _block_sizes(num_rows, vocab, hidden.device)
    for r0 in range(0, num_rows, row_block):
        r1 = min(r0 + row_block, num_rows)
        h = hidden[r0:r1].to(cdt)
        t = targets[r0:r1]
        g_rows = g[r0:r1]
        lse_rows = saved.lse[r0:r1].to(adt)
        miss_rows = saved.miss[r0:r1].to(adt)
        for v0 in range(0, vocab, vocab_block):
            v1 = min(v0 + vocab_block, vocab)
            w = weight[v0:v1].to(cdt)
            z = _logits(h, w, None if bias is None else bias[v0:v1], adt)
            # dz = g * (onehot - p), built in place over the logits block
            dz = z.sub_(lse_rows[:, None]).exp_().mul_(-g_rows[:, None])
            hit, column = _target_columns(t, v0, v1)
            _set_target_entries(dz, hit, column, g_rows * miss_rows)
            if need_weight:
                d_weight[v0:v1] += _matmul(dz.to(cdt).t(), h, adt)
            if need_bias:
                d_bias[v0:v1] += dz.sum(dim=0)

    return (
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


def _unavailable_reason(device: torch.device) -> Optional[str]:
    return None


BACKEND = Backend(
    name="torch",
    forward=forward,
    backward=backward,
    preference_loss=preference_loss,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    priority=0,
)
