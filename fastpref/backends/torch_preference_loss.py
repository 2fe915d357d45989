"""Pure-PyTorch preference loss: the readable reference of the fused pair-loss kernels.

Per-sequence sums by index_add and each loss type written as in its paper (see loss_spec), as plain
differentiable torch ops: the loss differentiates them with autograd; for the fused kernels'
contract (a gradient per token) autograd takes it here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..loss_spec import PAIRED_LOSS_TYPES, REFERENCE_FREE, LossSpec
from ..numerics import log1m_exp
from . import PreferenceLossResult


def _smoothed_logistic(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1.0 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


def _pair_term(name, spec: LossSpec, pc, pr, rc, rr, chosen_sum, num_pairs, chosen_tokens):
    """Pair p's contribution to loss type `name` (already divided by the type's normaliser)."""
    beta, eps = spec.beta, spec.label_smoothing
    dc, dr = pc - rc, pr - rr
    d = beta * (dc - dr)
    nll = -chosen_sum / chosen_tokens
    if name == "sigmoid":
        return _smoothed_logistic(d, eps) / num_pairs
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps) / num_pairs
    if name == "hinge":
        return torch.relu(1 - d) / num_pairs
    if name == "ipo":
        return (dc - dr - 1 / (2 * beta)) ** 2 / num_pairs
    if name == "apo_zero":
        return ((1 - torch.sigmoid(beta * dc)) + torch.sigmoid(beta * dr)) / num_pairs
    if name == "apo_down":
        return (torch.sigmoid(beta * dc) + (1 - torch.sigmoid(d))) / num_pairs
    if name == "simpo":
        return _smoothed_logistic(beta * (pc - pr) - spec.simpo_gamma, eps) / num_pairs
    if name == "orpo":
        log_odds = (pc - pr) - (log1m_exp(pc) - log1m_exp(pr))
        return -beta * F.logsigmoid(log_odds) / num_pairs + nll
    if name == "sft":
        return nll
    raise AssertionError(name)


def _paired_parts(seq: torch.Tensor, layout, reference, spec: LossSpec) -> torch.Tensor:
    chosen, rejected = layout.chosen_index, layout.rejected_index
    lengths = layout.lengths.to(seq.dtype)
    num_pairs = chosen.numel()
    chosen_tokens = lengths[chosen].sum()
    parts = []
    for name in PAIRED_LOSS_TYPES:
        if spec.weight_of(name) == 0.0:
            parts.append(torch.zeros(num_pairs, dtype=seq.dtype, device=seq.device))
            continue
        scale = 1.0 / lengths if spec.averages(name) else torch.ones_like(lengths)
        pc, pr = seq[chosen] * scale[chosen], seq[rejected] * scale[rejected]
        if name in REFERENCE_FREE:
            rc = rr = torch.zeros_like(pc)
        else:
            rc, rr = reference[chosen] * scale[chosen], reference[rejected] * scale[rejected]
        parts.append(_pair_term(name, spec, pc, pr, rc, rr, seq[chosen], num_pairs, chosen_tokens))
    return torch.stack(parts)


def _kto_parts(seq: torch.Tensor, layout, reference, spec: LossSpec, kl) -> torch.Tensor:
    lengths = layout.lengths.to(seq.dtype)
    scale = 1.0 / lengths if spec.averages("kto") else torch.ones_like(lengths)
    logratio = (seq - reference) * scale
    sign = torch.where(layout.desirable, 1.0, -1.0).to(seq.dtype)
    weight = torch.where(layout.desirable, spec.desirable_weight, spec.undesirable_weight).to(seq.dtype)
    z = spec.beta * (logratio - kl) * sign
    return (weight * (1 - torch.sigmoid(z)) / seq.numel())[None]


def loss_terms(token_logp, layout, reference, spec: LossSpec, kl):
    """(loss [], parts [T, P], sequence_logps [S]) as plain differentiable torch ops of token_logp:
    autograd differentiates them and torch.compile traces them (the loss runs this directly)."""
    sums = torch.zeros(layout.num_sequences, dtype=token_logp.dtype, device=token_logp.device)
    sums = sums.index_add(0, layout.sequence_ids, token_logp)
    if spec.is_paired:
        parts = _paired_parts(sums, layout, reference, spec)
        weights = [spec.weight_of(name) for name in PAIRED_LOSS_TYPES]
    else:
        parts = _kto_parts(sums, layout, reference, spec, kl)
        weights = [spec.loss_weights[0]]
    loss = sum(w * part.sum() for w, part in zip(weights, parts) if w != 0.0)
    return loss, parts, sums


def preference_loss(token_logp, layout, reference, spec: LossSpec, kl) -> PreferenceLossResult:
    """The fused kernels' contract: the loss and its gradient per token, from loss_terms by autograd."""
    token_logp = token_logp.detach().requires_grad_()
    with torch.enable_grad():
        loss, parts, sums = loss_terms(token_logp, layout, reference, spec, kl)
        (token_grad,) = torch.autograd.grad(loss, token_logp)
    return PreferenceLossResult(loss=loss.detach(), parts=parts.detach(), sequence_logps=sums.detach(),
                                token_grad=token_grad)
