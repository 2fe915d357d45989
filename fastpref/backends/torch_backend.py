"""Pure-PyTorch backend: blocked over rows *and* vocabulary, runs anywhere.

It is the readable reference of the blocked algorithm, the CPU path, and the fallback on a GPU
where a kernel cannot run (the GPU backends also run their frozen-head pass here). No tensor
larger than a few [row_block x vocab_block] blocks of logits ever exists, whatever N and V: 2 MiB
of float32 per block on a CPU; on a GPU everything a block allocates fits the scratch budget, in
blocks as large as that allows, so every matmul is one large cuBLAS GEMM. (The exception is
forward_backward_by_groups, the CPU's loss with its gradients in the forward, which keeps a group
of rows' logits: see fastpref.head_loss.)

Forward, for each block of rows, streaming over vocabulary blocks W_b with an online softmax
(running max m, rescaled by alpha = exp(m_old - m_new) when m grows; backends.online_softmax
lists the sums and how they merge):

    z      = s(h W_b^T + b_b)                      (one block of logits, s the logit transform)
    s_excl = alpha s_excl + sum_{v != t} exp(z_v - m)
    z_t    = the target's logit, picked up in the block that holds it
    and the sums of the per-token outputs asked for; when the hidden gradient is folded in (a
    frozen head: the one-pass formulation), with J_v = dz_v/dx_v the transform's slope,
    acc    = alpha acc   + sum_{v != t} exp(z_v - m) J_v W_v

    s = s_excl + exp(z_t - m),  lse = m + log s,  miss = s_excl / s = 1 - p_t,
    logp = log1p(-miss) or z_t - lse (see online_softmax.target_logprob),
    u   = miss J_t W_t - acc / s  =  J_t W_t - sum_v p_v J_v W_v.

Keeping the target out of the sums avoids the cancellation of 1 - p_t and of W_t - p_t W_t when
the model is confident (p_t -> 1). u is saved in the inputs' dtype (a bf16 [N, H], not float32:
it is rounded once, as the gradient will be), and the hidden gradient of the backward is a scale,
d_hidden_n = g_n u_n: a frozen head costs 4NHV FLOPs in all.

Backward otherwise: one more pass recomputing z from the saved lse, with g = dL/dlogp and
g_H = dL/dentropy,

    dz = -p (g + g_H (log p + H)) off the target,  g miss - g_H p_t (log p_t + H) on it,
    dx = J dz,   dW_b += dx^T h,   db_b += sum_n dx,   dh += dx W_b (when not folded),

accumulated in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._buffers import new_output
from . import Backend, ForwardResult, HeadOptions
from .gemm import matmul_float32
from .online_softmax import merge_vocabulary_parts, rescale_weights, shift_term
from .scratch import slab_columns

# On a CPU a block of logits holds at most this many elements: 2 MiB of float32, written by a
# matmul and read back by the softmax while still in the caches (such matmuls run faster than
# 16 MiB ones: benchmarks/results/cpu-logprobs-gemm-floor.md); rows per block are capped so that
# long inputs still stream over the vocabulary.
BLOCK_ELEMENTS = 1 << 19
MAX_ROW_BLOCK = 2048


def block_bytes_per_logit(options: HeadOptions) -> int:
    """Bytes a GPU block allocates per logit: the float32 logits and their half-precision copy,
    plus, with per-token outputs, the exponentials beside the logits and one float32 temporary."""
    return 4 + 2 + (8 if options.outputs else 0)


def _block_sizes(num_rows: int, vocab: int, device: torch.device, options: HeadOptions,
                 accumulator_width: int = 0) -> Tuple[int, int]:
    """(rows, columns) of a logits block; accumulator_width: H when each row also carries float32
    [rows, H] accumulators (the forward's u). On a GPU everything a block allocates fits the
    scratch budget (see gpu_block_sizes); on a CPU, cache-sized blocks."""
    if device.type == "cuda":
        return gpu_block_sizes(num_rows, vocab, options.scratch_bytes, accumulator_width,
                               block_bytes_per_logit(options))
    row_block = max(1, min(num_rows, MAX_ROW_BLOCK))
    vocab_block = max(1, min(vocab, BLOCK_ELEMENTS // row_block))
    return row_block, vocab_block


def gpu_block_sizes(num_rows: int, vocab: int, budget: int, accumulator_width: int = 0,
                    bytes_per_logit: int = 6) -> Tuple[int, int]:
    """_block_sizes on a GPU, the largest blocks whose allocations fit `budget` bytes. With
    accumulators, half of it goes to them (room for four float32 [rows, H]: u, its matmul's
    product, and W_t gathered and upcast) and half to a vocabulary slab of logits; without, all
    rows and a slab as wide as the budget allows, so that each matmul is one large cuBLAS GEMM."""
    if not accumulator_width:
        return max(1, num_rows), slab_columns(num_rows, vocab, bytes_per_logit, budget)
    rows = max(1, min(num_rows, budget // 2 // (4 * 4 * accumulator_width)))
    return rows, slab_columns(rows, vocab, bytes_per_logit, budget // 2)


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


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, accumulated in at least float32 (in place, without a temporary, when the
    operands already have out's dtype)."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += _matmul(a, b, out.dtype)


def _write_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b, accumulated in at least float32."""
    if a.dtype == b.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(_matmul(a, b, out.dtype))


def _head_outputs(h, w, b, out_dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One block of the head's outputs x = h w^T + b (the logits before the transform), into
    `out` when given."""
    if out is None:
        x = _matmul(h, w.t(), out_dtype)
    else:
        x = out
        _write_product(x, h, w.t())
    if b is not None:
        x += b.to(out_dtype)
    return x


def _logits_buffer(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """On a CPU, the one buffer every block of logits of a pass is written into (a fresh block per
    matmul goes through malloc each time, and what it frees stays resident); on a GPU None (the
    caching allocator recycles blocks, and each matmul writes its own output without a copy)."""
    return torch.empty(rows * columns, dtype=dtype, device=device) if device.type == "cpu" else None


def _block_view(buffer: Optional[torch.Tensor], rows: int, columns: int) -> Optional[torch.Tensor]:
    return None if buffer is None else buffer[:rows * columns].view(rows, columns)


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


def _target_entries(block: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    return block.gather(1, column).squeeze(1)


class _RowStatistics:
    """The online-softmax sums of one block of rows, updated one vocabulary block at a time."""

    def __init__(self, rows: int, options: HeadOptions, dtype, device):
        def zeros():
            return torch.zeros(rows, dtype=dtype, device=device)

        def minus_infinity():
            return torch.full((rows,), float("-inf"), dtype=dtype, device=device)

        outputs = options.outputs
        self.row_max, self.sum_excl, self.target = minus_infinity(), zeros(), zeros()
        self.shifted = zeros() if "entropy" in outputs else None
        self.sum_sq = zeros() if "log_sum_sq_probs" in outputs else None
        self.logit_sum = zeros() if "mean_logits" in outputs else None
        self.max_before = minus_infinity() if "is_top1" in outputs else None

    def update(self, z: torch.Tensor, targets: torch.Tensor, v0: int, v1: int) -> Tuple[torch.Tensor, ...]:
        """Fold in the block z of columns [v0, v1) (consumed: it becomes exp(z - m) with the target
        entries zeroed). Returns (that block, alpha) for accumulators rescaled alongside."""
        hit, column = _target_columns(targets, v0, v1)
        self.target = torch.where(hit, _target_entries(z, column), self.target)
        if self.logit_sum is not None:
            self.logit_sum += z.sum(dim=1)
        if self.max_before is not None:
            before = torch.arange(v0, v1, device=z.device)[None, :] < targets[:, None]
            self.max_before = torch.maximum(self.max_before, z.masked_fill(~before, float("-inf")).amax(dim=1))
        new_max = torch.maximum(self.row_max, z.amax(dim=1))
        alpha = rescale_weights(self.row_max, new_max)
        shifted_z = z.sub_(new_max[:, None])
        if self.shifted is not None:
            # every column so far: the target's term joins once its block has passed
            sum_all = self.sum_excl + torch.where(targets < v0, torch.exp(self.target - self.row_max), 0.0)
            exp_z = shifted_z.exp()
            # a column of logit -inf adds exp(-inf) x (the lowest float) = 0, not exp(-inf) (-inf) = nan
            lowest = torch.finfo(shifted_z.dtype).min
            self.shifted = alpha * (self.shifted + shift_term(self.row_max, new_max, sum_all)) \
                + torch.linalg.vecdot(exp_z, shifted_z.clamp_(min=lowest))
        else:
            exp_z = shifted_z.exp_()
        if self.sum_sq is not None:
            self.sum_sq = alpha * alpha * self.sum_sq + torch.linalg.vecdot(exp_z, exp_z)
        _set_target_entries(exp_z, hit, column, 0.0)
        self.sum_excl = alpha * self.sum_excl + exp_z.sum(dim=1)
        self.row_max = new_max
        return exp_z, alpha

    def result(self, vocab: int) -> ForwardResult:
        def part(value):
            return None if value is None else value[None]

        return merge_vocabulary_parts(part(self.row_max), part(self.sum_excl), part(self.target), vocab=vocab,
                                      shifted=part(self.shifted), sum_sq=part(self.sum_sq),
                                      logit_sum=part(self.logit_sum), max_before=part(self.max_before))


_OUTPUT_FIELDS = ("logp", "lse", "miss", "row_max", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def forward(hidden, weight, bias, targets, options: HeadOptions, fold_hidden_gradient: bool) -> ForwardResult:
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    cdt, adt = _compute_dtype(hidden), _accumulate_dtype(hidden)
    transform = options.transform
    softcapped = transform.softcap is not None
    row_block, vocab_block = _block_sizes(num_rows, vocab, hidden.device, options,
                                          width if fold_hidden_gradient else 0)

    result = ForwardResult(*(new_output((num_rows,), adt, hidden.device) for _ in range(3)),
                           row_max=new_output((num_rows,), adt, hidden.device))
    for name in options.outputs:
        dtype = torch.bool if name == "is_top1" else adt
        setattr(result, name, new_output((num_rows,), dtype, hidden.device))
    # kept in the inputs' dtype: u is the hidden gradient's direction, rounded once like the gradient
    if fold_hidden_gradient:
        result.hidden_grad_direction = new_output((num_rows, width), hidden.dtype, hidden.device)

    logits_buffer = _logits_buffer(row_block, vocab_block, adt, hidden.device)
    for r0 in range(0, num_rows, row_block):
        r1 = min(r0 + row_block, num_rows)
        h = hidden[r0:r1].to(cdt)
        t = targets[r0:r1]
        statistics = _RowStatistics(r1 - r0, options, adt, hidden.device)
        if fold_hidden_gradient:
            # accumulated in the result itself where it has the accumulator's dtype
            direction_rows = result.hidden_grad_direction[r0:r1]
            acc = direction_rows.zero_() if direction_rows.dtype == adt else \
                torch.zeros(r1 - r0, width, dtype=adt, device=hidden.device)
            target_slope = torch.zeros(r1 - r0, dtype=adt, device=hidden.device)

        for v0 in range(0, vocab, vocab_block):
            v1 = min(v0 + vocab_block, vocab)
            w = weight[v0:v1].to(cdt)
            x = _head_outputs(h, w, None if bias is None else bias[v0:v1], adt,
                              _block_view(logits_buffer, r1 - r0, v1 - v0))
            slope = transform.slope(x) if fold_hidden_gradient and softcapped else None
            if slope is not None:
                hit, column = _target_columns(t, v0, v1)
                target_slope = torch.where(hit, _target_entries(slope, column), target_slope)
            exp_z, alpha = statistics.update(transform.apply_(x), t, v0, v1)
            if fold_hidden_gradient:
                if slope is not None:
                    exp_z = exp_z.mul_(slope)
                _add_product(acc.mul_(alpha[:, None]), exp_z.to(cdt), w)

        rows = statistics.result(vocab)
        for name in _OUTPUT_FIELDS:
            value = getattr(rows, name)
            if value is not None:
                getattr(result, name)[r0:r1] = value
        if fold_hidden_gradient:
            row_sum = statistics.sum_excl + torch.exp(statistics.target - statistics.row_max)
            # J_t miss W_t (the J_v of the other columns are in acc already), W_t gathered a
            # block's worth of rows at a time
            target_scale = rows.miss * target_slope if softcapped else rows.miss
            direction = acc.div_(row_sum[:, None]).neg_()
            gather_rows = r1 - r0 if hidden.device.type != "cpu" else max(1, BLOCK_ELEMENTS // (4 * width))
            for c0 in range(0, r1 - r0, gather_rows):
                c1 = min(c0 + gather_rows, r1 - r0)
                direction[c0:c1].addcmul_(target_scale[c0:c1, None], weight.index_select(0, t[c0:c1]).to(adt))
            if not softcapped and transform.pre != 1.0:
                direction.mul_(transform.pre)
            if direction.data_ptr() != direction_rows.data_ptr():
                direction_rows.copy_(direction)

    return result


def backward(hidden, weight, bias, targets, saved: ForwardResult, grad_logp, grad_entropy,
             options: HeadOptions, need_hidden: bool, need_weight: bool, need_bias: bool):
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    cdt, adt = _compute_dtype(hidden), _accumulate_dtype(hidden)
    g = grad_logp.to(adt)
    g_entropy = None if grad_entropy is None else grad_entropy.to(adt)
    folded = saved.hidden_grad_direction is not None

    d_hidden = None
    if need_hidden:
        d_hidden = new_output((num_rows, width), hidden.dtype, hidden.device)
    if need_hidden and folded:
        # row blocks: the float32 product g u never exists for all rows at once
        row_block = _block_sizes(num_rows, vocab, hidden.device, options, width)[0]
        for r0 in range(0, num_rows, row_block):
            r1 = min(r0 + row_block, num_rows)
            torch.mul(saved.hidden_grad_direction[r0:r1], g[r0:r1, None], out=d_hidden[r0:r1])
    recompute_hidden = need_hidden and not folded
    if not (need_weight or need_bias or recompute_hidden):
        return d_hidden, None, None

    d_weight = torch.zeros(vocab, width, dtype=adt, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=adt, device=hidden.device) if need_bias else None
    row_block, vocab_block = _block_sizes(num_rows, vocab, hidden.device, options,
                                          width if recompute_hidden else 0)
    logits_buffer = _logits_buffer(row_block, vocab_block, adt, hidden.device)
    for r0 in range(0, num_rows, row_block):
        r1 = min(r0 + row_block, num_rows)
        h = hidden[r0:r1].to(cdt)
        rows = _RowGradients(targets[r0:r1], saved.lse[r0:r1].to(adt), saved.miss[r0:r1].to(adt), g[r0:r1],
                             None if g_entropy is None else g_entropy[r0:r1],
                             None if g_entropy is None else saved.entropy[r0:r1].to(adt))
        d_hidden_rows = None
        if recompute_hidden:  # summed in d_hidden itself where it has the accumulator's dtype
            d_hidden_rows = d_hidden[r0:r1].zero_() if d_hidden.dtype == adt else \
                torch.zeros(r1 - r0, width, dtype=adt, device=hidden.device)
        for v0 in range(0, vocab, vocab_block):
            v1 = min(v0 + vocab_block, vocab)
            w = weight[v0:v1].to(cdt)
            x = _head_outputs(h, w, None if bias is None else bias[v0:v1], adt,
                              _block_view(logits_buffer, r1 - r0, v1 - v0))
            rows.add_block(x, options.transform, h, w, v0, v1, d_weight, d_bias, d_hidden_rows)
        if recompute_hidden and d_hidden_rows.data_ptr() != d_hidden[r0:r1].data_ptr():
            d_hidden[r0:r1] = d_hidden_rows

    return (
        d_hidden,
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


def forward_backward_by_groups(hidden, weight, bias, targets, groups, token_gradient, options: HeadOptions,
                               need_hidden: bool, need_weight: bool, need_bias: bool, store_bytes: int):
    """Log-probs and gradients at once, for a loss whose gradient g_n = dL/dlogp_n of a group of
    rows is known as soon as that group's log-probs are (the rows of whole pairs: see
    fastpref.head_loss). For each group, with its rows h and targets:

        pass 1, per vocabulary block:  x = h W_b^T + b_b, folded into the online softmax as
                                       forward() does and kept in a store while it has room:
                                       as exp(z - m) (m the running max, kept per block) when the
                                       transform's slope is one number, as x under a soft cap;
        g = token_gradient(rows, logp)  (the loss's gradient for the group's rows);
        pass 2, per vocabulary block:  dz from the kept block (p = exp(z - m) exp(m - lse), or the
                                       backward's dz from x; x recomputed past the store), then
                                       dW_b += dz^T h, db_b += sum_n dz, dh += dz W_b.

    A group whose blocks all fit the store costs 6 R H V FLOPs instead of the 8 R H V of a forward
    and a backward that recomputes the logits; the store holds store_bytes at most (at least one
    block). Per-token outputs (entropy...) are not computed here.

    token_gradient None: pass 1 alone, the log-probs of a pass with gradients bit for bit (what
    a reference pass that mirrors the policy's runs).

    groups: [R_k] row indices into hidden, disjoint. Returns (logp [N] float32 (float64 for
    float64 inputs), 0 off the groups; d_hidden [N, H] (zero off the groups), d_weight, d_bias:
    each None unless asked for, in its input's dtype).
    """
    num_rows, width = hidden.shape
    vocab = weight.shape[0]
    cdt, adt = _compute_dtype(hidden), _accumulate_dtype(hidden)
    transform = options.transform
    largest = max((rows.numel() for rows in groups), default=1)
    vocab_block = max(1, min(vocab, BLOCK_ELEMENTS // max(1, largest)))
    element_bytes = torch.empty((), dtype=adt).element_size()
    stored_blocks = max(1, store_bytes // (largest * vocab_block * element_bytes))
    store = torch.empty(min(stored_blocks * vocab_block, vocab) * largest, dtype=adt, device=hidden.device)

    logp = torch.zeros(num_rows, dtype=adt, device=hidden.device)
    d_hidden = torch.zeros(num_rows, width, dtype=adt, device=hidden.device) if need_hidden else None
    # the first group writes every row of d_weight
    d_weight = torch.empty(vocab, width, dtype=adt, device=hidden.device) if need_weight else None
    d_bias = torch.zeros(vocab, dtype=adt, device=hidden.device) if need_bias else None
    # with a slope that is one number, a block is kept as exp(z - m) (pass 2 then scales it);
    # under a soft cap the slope needs x, kept as it is
    constant_slope = transform.softcap is None
    for index, rows in enumerate(groups):
        h = hidden.index_select(0, rows).to(cdt)
        t = targets.index_select(0, rows)
        count = rows.numel()

        def kept(v0, v1):
            """This group's slice of the store for columns [v0, v1), None past its end."""
            return store[v0 * count:v1 * count].view(count, v1 - v0) if v1 * count <= store.numel() else None

        def head_outputs(v0, v1, out=None):
            w = weight[v0:v1].to(cdt)
            return _head_outputs(h, w, None if bias is None else bias[v0:v1], adt, out), w

        statistics = _RowStatistics(count, options, adt, hidden.device)
        kept_row_max = []
        for v0 in range(0, vocab, vocab_block):
            v1 = min(v0 + vocab_block, vocab)
            block = kept(v0, v1)
            x, _ = head_outputs(v0, v1, block if constant_slope else None)
            if block is not None and not constant_slope:
                block.copy_(x)
            exp_z, _ = statistics.update(transform.apply_(x), t, v0, v1)
            if block is not None and constant_slope:
                if exp_z.data_ptr() != block.data_ptr():
                    block.copy_(exp_z)
                kept_row_max.append(statistics.row_max)
        result = statistics.result(vocab)
        logp[rows] = result.logp
        if token_gradient is None:
            continue
        gradients = _RowGradients(t, result.lse, result.miss, token_gradient(rows, result.logp).to(adt),
                                  overwrite_weight=index == 0)

        d_hidden_rows = torch.zeros(count, width, dtype=adt, device=hidden.device) if need_hidden else None
        for block_index, v0 in enumerate(range(0, vocab, vocab_block)):
            v1 = min(v0 + vocab_block, vocab)
            block = kept(v0, v1)
            if block is None:
                x, w = head_outputs(v0, v1)
                gradients.add_block(x, transform, h, w, v0, v1, d_weight, d_bias, d_hidden_rows)
            elif constant_slope:
                gradients.add_exponentials(block, kept_row_max[block_index], transform.pre, h, weight[v0:v1].to(cdt),
                                           v0, v1, d_weight, d_bias, d_hidden_rows)
            else:
                gradients.add_block(block, transform, h, weight[v0:v1].to(cdt), v0, v1, d_weight, d_bias,
                                    d_hidden_rows)
        if need_hidden:
            d_hidden.index_copy_(0, rows, d_hidden_rows)

    return (
        logp,
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


class _RowGradients:
    """The backward of one block of rows, one vocabulary block at a time: g = dL/dlogp and
    g_H = dL/dentropy of each row, with what the forward saved (lse, miss, entropy).
    overwrite_weight: the first blocks of rows write d_weight rather than add to it."""

    def __init__(self, targets, lse, miss, g, g_entropy=None, entropy=None, overwrite_weight=False):
        self.targets, self.lse, self.miss, self.g = targets, lse, miss, g
        self.g_entropy, self.entropy = g_entropy, entropy
        self.overwrite_weight = overwrite_weight

    def add_block(self, x, transform, h, w, v0, v1, d_weight, d_bias, d_hidden) -> None:
        """Fold the block x of head outputs (columns [v0, v1), consumed) into the gradients:
        dW_b += dx^T h, db_b += sum_n dx, dh += dx W_b (each when not None)."""
        slope = transform.slope(x)
        dz = _logit_gradient(transform.apply_(x), self.targets, v0, v1, self.lse, self.miss, self.g,
                             self.g_entropy, self.entropy)
        if isinstance(slope, torch.Tensor) or slope != 1.0:
            dz.mul_(slope)
        self._add_products(dz, h, w, v0, v1, d_weight, d_bias, d_hidden)

    def add_exponentials(self, exp_z, row_max, slope: float, h, w, v0, v1, d_weight, d_bias, d_hidden) -> None:
        """add_block from a block kept as exp(z - row_max) with its target entries zeroed (what
        _RowStatistics.update leaves), under a transform of constant slope: p = exp(z - row_max)
        exp(row_max - lse) takes one scale per row, no exponential of the block. Without the
        entropy's gradient."""
        hit, column = _target_columns(self.targets, v0, v1)
        dz = exp_z.mul_((-slope * self.g * torch.exp(row_max - self.lse))[:, None])
        _set_target_entries(dz, hit, column, slope * self.g * self.miss)
        self._add_products(dz, h, w, v0, v1, d_weight, d_bias, d_hidden)

    def _add_products(self, dz, h, w, v0, v1, d_weight, d_bias, d_hidden) -> None:
        dz_c = dz.to(h.dtype)
        if d_weight is not None:
            (_write_product if self.overwrite_weight else _add_product)(d_weight[v0:v1], dz_c.t(), h)
        if d_bias is not None:
            d_bias[v0:v1] += dz.sum(dim=0)
        if d_hidden is not None:
            _add_product(d_hidden, dz_c, w)


def _logit_gradient(z, targets, v0, v1, lse, miss, g, g_entropy, entropy) -> torch.Tensor:
    """dL/dz of one block, built over z in place:
    -p (g + g_H (log p + H)) off the target, g miss - g_H p_t (log p_t + H) on it."""
    hit, column = _target_columns(targets, v0, v1)
    log_p = z.sub_(lse[:, None])
    if g_entropy is None:
        dz = log_p.exp_().mul_(-g[:, None])
        _set_target_entries(dz, hit, column, g * miss)
        return dz
    # log p of a logit of -inf taken as the lowest float: its term p (log p + H) is then 0, not nan
    lowest = torch.finfo(log_p.dtype).min
    log_p_target = _target_entries(log_p, column).clamp(min=lowest)
    coefficient = log_p.clamp(min=lowest).add_(entropy[:, None]).mul_(g_entropy[:, None]).add_(g[:, None])
    dz = log_p.exp_().mul_(coefficient).neg_()
    at_target = g * miss - g_entropy * torch.exp(log_p_target) * (log_p_target + entropy)
    _set_target_entries(dz, hit, column, at_target)
    return dz


def _unavailable_reason(device: torch.device) -> Optional[str]:
    return None


BACKEND = Backend(
    name="torch",
    forward=forward,
    backward=backward,
    unavailable_reason=_unavailable_reason,
    dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
    priority=0,
    forward_backward_by_groups=forward_backward_by_groups,
)
