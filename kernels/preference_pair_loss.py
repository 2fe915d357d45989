"""Fused per-pair preference loss: reduction, loss and gradient in one kernel over all pairs.

Program p owns pair p. It sums the per-token log-probs of its chosen and rejected sequences
(tokens outside responses are already 0), evaluates every active loss type of the weighted sum
(formulas in fastpref.loss_spec) together with its derivative with respect to the two sequence
log-probs, and writes that derivative back over the pair's tokens as the per-token gradient
scale, so the backward of the whole loss is one multiply by the upstream gradient.

Per-type weights and reductions (sum or mean log-probs) come in as small arrays indexed like
loss_spec.PAIRED_LOSS_TYPES; a type of weight 0 contributes exactly nothing.
"""
import torch
import triton
import triton.language as tl

from .scalar_math import log1m_exp, log_sigmoid, expm1, sequence_fill, sequence_sum, sigmoid

# Row indices of the loss types (loss_spec.PAIRED_LOSS_TYPES). A @triton.jit function may only
# read globals that are tl.constexpr: the GPU compiler rejects plain ints (the CPU interpreter
# does not), which `fastpref kernels` catches offline.
SIGMOID, IPO, SIMPO, HINGE, ROBUST, ORPO, APO_ZERO, APO_DOWN, SFT = (tl.constexpr(i) for i in range(9))


@triton.jit
def _reduced(weights_ptr, averages_ptr, kind, sum_c, sum_r, ref_c, ref_r, len_c, len_r):
    """The type's weight, its (policy, reference) log-probs and the sum -> mean scales."""
    weight = tl.load(weights_ptr + kind)
    average = tl.load(averages_ptr + kind) != 0
    scale_c = tl.where(average, 1.0 / len_c, 1.0)
    scale_r = tl.where(average, 1.0 / len_r, 1.0)
    return weight, sum_c * scale_c, sum_r * scale_r, ref_c * scale_c, ref_r * scale_r, scale_c, scale_r


@triton.jit
def _pair_loss_kernel(
    token_logp_ptr, cu_seqlens_ptr, lengths_ptr, chosen_ptr, rejected_ptr, reference_ptr,
    weights_ptr, averages_ptr, chosen_tokens_ptr,
    sequence_logp_ptr, parts_ptr, token_grad_ptr,
    num_pairs, beta, label_smoothing, simpo_gamma,
    HAS_REFERENCE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0)
    chosen = tl.load(chosen_ptr + pair)
    rejected = tl.load(rejected_ptr + pair)
    c_start = tl.load(cu_seqlens_ptr + chosen)
    c_end = tl.load(cu_seqlens_ptr + chosen + 1)
    r_start = tl.load(cu_seqlens_ptr + rejected)
    r_end = tl.load(cu_seqlens_ptr + rejected + 1)
    sum_c = sequence_sum(token_logp_ptr, c_start, c_end, BLOCK_T)
    sum_r = sequence_sum(token_logp_ptr, r_start, r_end, BLOCK_T)
    tl.store(sequence_logp_ptr + chosen, sum_c)
    tl.store(sequence_logp_ptr + rejected, sum_r)

    len_c = tl.load(lengths_ptr + chosen).to(tl.float32)
    len_r = tl.load(lengths_ptr + rejected).to(tl.float32)
    ref_c = 0.0
    ref_r = 0.0
    if HAS_REFERENCE:
        ref_c = tl.load(reference_ptr + chosen)
        ref_r = tl.load(reference_ptr + rejected)
    inv_pairs = 1.0 / num_pairs
    eps = label_smoothing
    nll = -sum_c / tl.load(chosen_tokens_ptr)
    d_nll = -1.0 / tl.load(chosen_tokens_ptr)  # d nll / d sum_c
    grad_c = 0.0
    grad_r = 0.0

    # sigmoid (DPO), with conservative label smoothing
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, SIGMOID, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    d = beta * ((pc - rc) - (pr - rr))
    value = (-(1.0 - eps) * log_sigmoid(d) - eps * log_sigmoid(-d)) * inv_pairs
    slope = (-(1.0 - eps) * sigmoid(-d) + eps * sigmoid(d)) * beta * inv_pairs
    tl.store(parts_ptr + SIGMOID * num_pairs + pair, tl.where(w != 0.0, value, 0.0))
    grad_c += tl.where(w != 0.0, w * slope * sc, 0.0)
    grad_r -= tl.where(w != 0.0, w * slope * sr, 0.0)

    # ipo
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, IPO, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    gap = (pc - rc) - (pr - rr) - 0.5 / beta
    tl.store(parts_ptr + IPO * num_pairs + pair, tl.where(w != 0.0, gap * gap * inv_pairs, 0.0))
    grad_c += tl.where(w != 0.0, w * 2.0 * gap * inv_pairs * sc, 0.0)
    grad_r -= tl.where(w != 0.0, w * 2.0 * gap * inv_pairs * sr, 0.0)

    # simpo (reference-free, length-averaged, margin gamma)
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, SIMPO, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    x = beta * (pc - pr) - simpo_gamma
    value = (-(1.0 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x)) * inv_pairs
    slope = (-(1.0 - eps) * sigmoid(-x) + eps * sigmoid(x)) * beta * inv_pairs
    tl.store(parts_ptr + SIMPO * num_pairs + pair, tl.where(w != 0.0, value, 0.0))
    grad_c += tl.where(w != 0.0, w * slope * sc, 0.0)
    grad_r -= tl.where(w != 0.0, w * slope * sr, 0.0)

    # hinge
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, HINGE, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    d = beta * ((pc - rc) - (pr - rr))
    value = tl.maximum(1.0 - d, 0.0) * inv_pairs
    slope = tl.where(d < 1.0, -beta * inv_pairs, 0.0)
    tl.store(parts_ptr + HINGE * num_pairs + pair, tl.where(w != 0.0, value, 0.0))
    grad_c += tl.where(w != 0.0, w * slope * sc, 0.0)
    grad_r -= tl.where(w != 0.0, w * slope * sr, 0.0)

    # robust (cDPO): unbiased under a fraction eps of flipped labels
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, ROBUST, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    d = beta * ((pc - rc) - (pr - rr))
    value = (-(1.0 - eps) * log_sigmoid(d) + eps * log_sigmoid(-d)) / (1.0 - 2.0 * eps) * inv_pairs
    slope = (-(1.0 - eps) * sigmoid(-d) - eps * sigmoid(d)) / (1.0 - 2.0 * eps) * beta * inv_pairs
    tl.store(parts_ptr + ROBUST * num_pairs + pair, tl.where(w != 0.0, value, 0.0))
    grad_c += tl.where(w != 0.0, w * slope * sc, 0.0)
    grad_r -= tl.where(w != 0.0, w * slope * sr, 0.0)

    # orpo: nll - beta log s(log odds ratio), on mean log-probs
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, ORPO, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    pc_safe = tl.minimum(pc, -1e-30)
    pr_safe = tl.minimum(pr, -1e-30)
    log_odds = (pc_safe - pr_safe) - (log1m_exp(pc_safe) - log1m_exp(pr_safe))
    value = -beta * log_sigmoid(log_odds) * inv_pairs + nll
    slope = -beta * sigmoid(-log_odds) * inv_pairs  # d value / d log_odds
    tl.store(parts_ptr + ORPO * num_pairs + pair, tl.where(w != 0.0, value, 0.0))
    grad_c += tl.where(w != 0.0, w * (slope * (-1.0 / expm1(pc_safe)) * sc + d_nll), 0.0)
    grad_r += tl.where(w != 0.0, w * slope * (1.0 / expm1(pr_safe)) * sr, 0.0)

    # apo_zero
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, APO_ZERO, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    s_c = sigmoid(beta * (pc - rc))
    s_r = sigmoid(beta * (pr - rr))
    tl.store(parts_ptr + APO_ZERO * num_pairs + pair, tl.where(w != 0.0, (1.0 - s_c + s_r) * inv_pairs, 0.0))
    grad_c += tl.where(w != 0.0, -w * beta * s_c * (1.0 - s_c) * inv_pairs * sc, 0.0)
    grad_r += tl.where(w != 0.0, w * beta * s_r * (1.0 - s_r) * inv_pairs * sr, 0.0)

    # apo_down
    w, pc, pr, rc, rr, sc, sr = _reduced(weights_ptr, averages_ptr, APO_DOWN, sum_c, sum_r, ref_c, ref_r, len_c, len_r)
    s_c = sigmoid(beta * (pc - rc))
    s_d = sigmoid(beta * ((pc - rc) - (pr - rr)))
    tl.store(parts_ptr + APO_DOWN * num_pairs + pair, tl.where(w != 0.0, (s_c + 1.0 - s_d) * inv_pairs, 0.0))
    grad_c += tl.where(w != 0.0, w * beta * (s_c * (1.0 - s_c) - s_d * (1.0 - s_d)) * inv_pairs * sc, 0.0)
    grad_r += tl.where(w != 0.0, w * beta * s_d * (1.0 - s_d) * inv_pairs * sr, 0.0)

    # sft: token-mean nll of the chosen responses
    w = tl.load(weights_ptr + SFT)
    tl.store(parts_ptr + SFT * num_pairs + pair, tl.where(w != 0.0, nll, 0.0))
    grad_c += tl.where(w != 0.0, w * d_nll, 0.0)

    sequence_fill(token_grad_ptr, c_start, c_end, grad_c, BLOCK_T)
    sequence_fill(token_grad_ptr, r_start, r_end, grad_r, BLOCK_T)


def preference_pair_loss(token_logp, layout, reference_logps, weights, averages, *, beta,
                         label_smoothing, simpo_gamma, new_output, block_t=1024):
    """Returns (parts [9, P], sequence_logps [S], token_grad [N]), all float32.

    weights [9] float32 and averages [9] int32 are indexed like loss_spec.PAIRED_LOSS_TYPES.
    """
    device = token_logp.device
    num_pairs = layout.num_pairs
    lengths = layout.lengths
    chosen_tokens = lengths.index_select(0, layout.chosen_index).sum().float()
    sequence_logps = new_output((layout.num_sequences,), torch.float32, device)
    parts = new_output((len(weights), num_pairs), torch.float32, device)
    token_grad = new_output((layout.num_tokens,), torch.float32, device)
    _pair_loss_kernel[(num_pairs,)](
        token_logp, layout.cu_seqlens, lengths, layout.chosen_index, layout.rejected_index,
        token_logp if reference_logps is None else reference_logps,
        weights, averages, chosen_tokens,
        sequence_logps, parts, token_grad,
        num_pairs, beta, label_smoothing, simpo_gamma,
        HAS_REFERENCE=reference_logps is not None, BLOCK_T=block_t,
    )
    return parts, sequence_logps, token_grad
