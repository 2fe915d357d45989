"""The per-row statistics every backend streams over the vocabulary, and how parts of it merge.

A backend walks the vocabulary in parts (a Triton program's split of the columns, a CUDA row's
running state over slabs, a torch block's running state) and keeps, per row and relative to the
part's running maximum m of the (transformed) logits z:

    sum_excl    sum_{v != t} exp(z_v - m)        (the target out of it: 1 - p_t without cancellation)
    target      z_t, in the part that holds the target (0 in the others)
    and, for the per-token outputs asked for,
    sum_all     sum_v exp(z_v - m)               (entropy, when parts merge)
    shifted     sum_v exp(z_v - m) (z_v - m)     (entropy)
    sum_sq      sum_v exp(2 (z_v - m))           (log sum p^2)
    logit_sum   sum_v z_v                        (mean logit)
    max_before  max_{v < t} z_v                  (is_top1: argmax takes the first maximum)

Merging P parts with maxima m_i into M = max_i m_i, with w_i = exp(m_i - M):

    S_excl = sum_i w_i sum_excl_i,   S = S_excl + exp(z_t - M),   lse = M + log S,   miss = S_excl / S
    entropy = log S - A / S,   A = sum_i w_i (shifted_i + (m_i - M) sum_all_i)
    log_sum_sq_probs = log(sum_i w_i^2 sum_sq_i) - 2 log S
    mean_logits = sum_i logit_sum_i / V
    is_top1 = z_t >= M and z_t > max_i max_before_i

Keeping sums relative to the running maximum keeps the entropy's two terms small when the
distribution is peaked (no cancellation of two numbers near lse).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ForwardResult


def target_logprob(target_logit: torch.Tensor, lse: torch.Tensor, miss: torch.Tensor) -> torch.Tensor:
    """log p_t without cancellation at either end.

    A confident row (p_t near 1) gets log1p(-miss), exact to rounding however close p_t is to 1;
    elsewhere z_t - lse is the precise form (miss rounds to 1 there).
    """
    return torch.where(miss < 0.5, torch.log1p(-miss), target_logit - lse)


def rescale_weights(part_max: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """exp(part_max - row_max), exactly 1 where they are equal (also both -inf: no exp(nan))."""
    return torch.where(part_max == row_max, torch.ones_like(part_max), torch.exp(part_max - row_max))


def shift_term(part_max: torch.Tensor, row_max: torch.Tensor, part_sum_all: torch.Tensor) -> torch.Tensor:
    """(m_i - M) sum_all_i, 0 for a part with nothing in it (m_i = -inf, sum 0)."""
    return torch.where(part_sum_all > 0, (part_max - row_max) * part_sum_all, torch.zeros_like(part_sum_all))


def merge_vocabulary_parts(row_max: torch.Tensor, sum_excl: torch.Tensor, target: torch.Tensor, *,
                           vocab: int, sum_all: Optional[torch.Tensor] = None,
                           shifted: Optional[torch.Tensor] = None, sum_sq: Optional[torch.Tensor] = None,
                           logit_sum: Optional[torch.Tensor] = None,
                           max_before: Optional[torch.Tensor] = None) -> ForwardResult:
    """The forward's result from the statistics of P parts, each [P, M] (see the module docstring).

    Optional statistics are given for the outputs asked for; `sum_all` may be left out when
    P = 1 (the shift m_i - M is then 0)."""
    top = row_max.amax(dim=0)
    weights = rescale_weights(row_max, top)
    total_excl = (sum_excl * weights).sum(dim=0)
    target_logit = target.sum(dim=0)
    row_sum = total_excl + torch.exp(target_logit - top)
    log_sum = row_sum.log()
    lse = top + log_sum
    miss = total_excl / row_sum
    result = ForwardResult(logp=target_logprob(target_logit, lse, miss), lse=lse, miss=miss, row_max=top)
    if shifted is not None:
        if row_max.shape[0] > 1:
            shifted = shifted + shift_term(row_max, top, sum_all)
        result.entropy = log_sum - (shifted * weights).sum(dim=0) / row_sum
    if sum_sq is not None:
        result.log_sum_sq_probs = (sum_sq * weights * weights).sum(dim=0).log() - 2 * log_sum
    if logit_sum is not None:
        result.mean_logits = logit_sum.sum(dim=0) / vocab
    if max_before is not None:
        result.is_top1 = (target_logit >= top) & (target_logit > max_before.amax(dim=0))
    return result
