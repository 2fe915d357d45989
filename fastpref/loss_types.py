"""The preference losses: one table, each loss type one small torch function with its formula.

A loss type reads per-sequence values only (O(pairs) work: the LM head's kernels compute the
per-token log-probs, and autograd differentiates what is written here). Per pair p, a paired type
reads a :class:`Pairs`: the policy's log-probs pi_c, pi_r of the chosen and rejected responses
(sums over the response tokens, LD-DPO-weighted with ``ld_alpha``), the reference's ref_c, ref_r,
the response lengths n_c, n_r (tokens), and the hyper-parameters; with

    Dc = pi_c - ref_c,  Dr = pi_r - ref_r                    (the log-ratios)
    Sc = f'(Dc),  Sr = f'(Dr),  d = Sc - Sr                  (the scores, f_divergence_type:
         reverse_kl: S = D; forward_kl: 1 - exp(-D); js_divergence: log 2 + log s(D);
         alpha_divergence: (exp((a - 1) D) - 1) / (a - 1), a = f_alpha_divergence_coef)

and s the logistic sigmoid, it returns the loss of each pair; the type's loss is their mean over
the pairs (times WPO's weights w_c w_r with ``use_weighting``, w = exp(mean over the response of
log p_t - log sum_v p_v^2), without gradient). Several types add up with their ``loss_weights``.
Every formula is TRL 1.16's ``DPOTrainer`` (SimPO and ORPO: TRL's ``CPOTrainer``; KTO: its
``KTOTrainer``), checked against it by the tests. Adding a loss type is one function and one
:class:`LossType` row here, and its test against TRL (docs/losses.md shows one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .numerics import log1m_exp


@dataclass(frozen=True)
class Hyper:
    """The hyper-parameters the loss types read (fastpref.loss_spec.LossSpec is one, validated)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0


F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def divergence_scores(logratios: torch.Tensor, hyper: Hyper) -> torch.Tensor:
    """f'(exp(D)) of the log-ratios D for TRL's f_divergence_type (see the module docstring)."""
    kind = hyper.f_divergence_type
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    alpha = hyper.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:  # the limit a -> 1 is reverse_kl
        return logratios
    # TRL clamps the exponent so that exp stays finite in the log-probs' dtype
    clamp = {torch.float16: 11.0, torch.bfloat16: 80.0}.get(logratios.dtype, 80.0)
    return torch.expm1(torch.clamp((alpha - 1.0) * logratios, max=clamp)) / (alpha - 1.0)


@dataclass
class Pairs:
    """What a paired loss type reads, one entry per pair ([P] tensors; see the module docstring)."""

    chosen: torch.Tensor  # pi_c
    rejected: torch.Tensor  # pi_r
    ref_chosen: Optional[torch.Tensor]  # ref_c (None for the reference-free types)
    ref_rejected: Optional[torch.Tensor]
    chosen_lengths: torch.Tensor  # response tokens
    rejected_lengths: torch.Tensor
    chosen_nll: torch.Tensor  # [] mean over every chosen response token of -log p
    hyper: Hyper

    @property
    def beta(self) -> float:
        return self.hyper.beta

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected

    @property
    def scores(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return (divergence_scores(self.chosen_logratios, self.hyper),
                divergence_scores(self.rejected_logratios, self.hyper))

    @property
    def delta_score(self) -> torch.Tensor:
        chosen, rejected = self.scores
        return chosen - rejected

    @property
    def mean_score_delta(self) -> torch.Tensor:
        """Sc / n_c - Sr / n_r: the scores per response token."""
        chosen, rejected = self.scores
        return chosen / self.chosen_lengths.clamp(min=1) - rejected / self.rejected_lengths.clamp(min=1)


def _smoothed_logistic(x: torch.Tensor, smoothing: float) -> torch.Tensor:
    return -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)


def sigmoid(p: Pairs) -> torch.Tensor:
    """DPO: -log s(beta d)."""
    return -F.logsigmoid(p.beta * p.delta_score)


def hinge(p: Pairs) -> torch.Tensor:
    """SLiC: relu(1 - beta d)."""
    return torch.relu(1 - p.beta * p.delta_score)


def ipo(p: Pairs) -> torch.Tensor:
    """IPO, on the scores per response token (as TRL, which the IPO authors confirmed):
    (Sc/n_c - Sr/n_r - 1/(2 beta))^2."""
    return (p.mean_score_delta - 1 / (2 * p.beta)) ** 2


def exo_pair(p: Pairs) -> torch.Tensor:
    """EXO (pairwise): the KL divergence of q = (s(beta d), s(-beta d)) from (1 - e, e), e =
    label_smoothing: s(beta d) (log s(beta d) - log(1 - e)) + s(-beta d) (log s(-beta d) - log e)."""
    x = p.beta * p.delta_score
    e = torch.tensor(p.hyper.label_smoothing, dtype=x.dtype, device=x.device)  # e = 0 gives inf, as in TRL
    return torch.sigmoid(x) * (F.logsigmoid(x) - torch.log1p(-e)) + torch.sigmoid(-x) * (F.logsigmoid(-x) - torch.log(e))


def nca_pair(p: Pairs) -> torch.Tensor:
    """NCA (pairwise): -log s(beta Dc) - log s(-beta Dc)/2 - log s(-beta Dr)/2."""
    chosen, rejected = p.beta * p.chosen_logratios, p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def robust(p: Pairs) -> torch.Tensor:
    """rDPO: [-(1 - e) log s(beta d) + e log s(-beta d)] / (1 - 2e)."""
    x, e = p.beta * p.delta_score, p.hyper.label_smoothing
    return (-(1 - e) * F.logsigmoid(x) + e * F.logsigmoid(-x)) / (1 - 2 * e)


def bco_pair(p: Pairs) -> torch.Tensor:
    """BCO (pairwise, as TRL 1.16: no running reward mean): -log s(beta Dc) - log s(-beta Dr)."""
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def sppo_hard(p: Pairs) -> torch.Tensor:
    """SPPO with hard labels: (Dc - 1/(2 beta))^2 + (Dr + 1/(2 beta))^2."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def aot(p: Pairs) -> torch.Tensor:
    """AOT (paired): with x the sorted (pi_c - pi_r) over the batch's pairs minus the sorted
    (ref_c - ref_r), -(1 - e) log s(beta x) - e log s(-beta x). Sorting couples the pairs."""
    policy, _ = torch.sort(p.chosen - p.rejected, dim=0)
    reference, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _smoothed_logistic(p.beta * (policy - reference), p.hyper.label_smoothing)


def aot_unpaired(p: Pairs) -> torch.Tensor:
    """AOT (unpaired): x the sorted Dc minus the sorted Dr, -(1 - e) log s(beta x) - e log s(-beta x)."""
    chosen, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(p.beta * (chosen - rejected), p.hyper.label_smoothing)


def apo_zero(p: Pairs) -> torch.Tensor:
    """APO-zero: (1 - s(beta Dc)) + s(beta Dr)."""
    return (1 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(p.beta * p.rejected_logratios)


def apo_down(p: Pairs) -> torch.Tensor:
    """APO-down: s(beta Dc) + (1 - s(beta (Dc - Dr)))."""
    return torch.sigmoid(p.beta * p.chosen_logratios) + (
        1 - torch.sigmoid(p.beta * (p.chosen_logratios - p.rejected_logratios)))


def discopop(p: Pairs) -> torch.Tensor:
    """DiscoPOP: with x = beta d and m = s(x / tau): -log s(x) (1 - m) + exp(-x) m."""
    x = p.beta * p.delta_score
    modulation = torch.sigmoid(x / p.hyper.discopop_tau)
    return -F.logsigmoid(x) * (1 - modulation) + torch.exp(-x) * modulation


def sft(p: Pairs) -> torch.Tensor:
    """The chosen responses' NLL, a mean over all their tokens (the same for every pair)."""
    return p.chosen_nll.expand(p.chosen.shape[0])


def sigmoid_norm(p: Pairs) -> torch.Tensor:
    """DPO on the scores per response token: -log s(beta (Sc/n_c - Sr/n_r))."""
    return -F.logsigmoid(p.beta * p.mean_score_delta)


def simpo(p: Pairs) -> torch.Tensor:
    """SimPO (no reference), on mean log-probs: x = beta (pi_c/n_c - pi_r/n_r) - gamma,
    -(1 - e) log s(x) - e log s(-x)."""
    x = p.beta * (p.chosen / p.chosen_lengths - p.rejected / p.rejected_lengths) - p.hyper.simpo_gamma
    return _smoothed_logistic(x, p.hyper.label_smoothing)


def orpo_log_odds(p: Pairs) -> torch.Tensor:
    """ORPO's log odds ratio log(odds_c / odds_r), odds = q / (1 - q), q = exp(mean log-prob)."""
    chosen, rejected = p.chosen / p.chosen_lengths, p.rejected / p.rejected_lengths
    return (chosen - rejected) - (log1m_exp(chosen) - log1m_exp(rejected))


def orpo(p: Pairs) -> torch.Tensor:
    """ORPO (no reference): nll - beta log s(log odds ratio); beta plays ORPO's lambda."""
    return p.chosen_nll - p.beta * F.logsigmoid(orpo_log_odds(p))


@dataclass(frozen=True)
class LossType:
    """One row of the table: a loss type under TRL's name, its function and what it reads."""

    name: str
    loss: Callable[[Pairs], torch.Tensor]
    reads: Tuple[str, ...]  # the hyper-parameters (Hyper's fields) the function reads
    reference_free: bool = False
    # its formula works per response token (divides by the lengths); average_logps=False gives the
    # paper's sums instead
    per_token: bool = False
    # its reduction is part of its definition: average_logps does not change it
    fixed_reduction: bool = False
    # couples the pairs (a pair's gradient depends on the others'): no group-by-group gradients
    couples_pairs: bool = False
    # reads the chosen responses' NLL (its metrics then report nll_loss)
    reads_nll: bool = False
    trainer: str = "DPOTrainer"  # TRL's trainer that defines it


_SCORES = ("beta", "f_divergence_type", "f_alpha_divergence_coef")
PAIRED = {row.name: row for row in (
    LossType("sigmoid", sigmoid, _SCORES),
    LossType("hinge", hinge, _SCORES),
    LossType("ipo", ipo, _SCORES, per_token=True),
    LossType("exo_pair", exo_pair, _SCORES + ("label_smoothing",)),
    LossType("nca_pair", nca_pair, ("beta",)),
    LossType("robust", robust, _SCORES + ("label_smoothing",)),
    LossType("bco_pair", bco_pair, ("beta",)),
    LossType("sppo_hard", sppo_hard, ("beta",)),
    LossType("aot", aot, ("beta", "label_smoothing"), couples_pairs=True),
    LossType("aot_unpaired", aot_unpaired, ("beta", "label_smoothing"), couples_pairs=True),
    LossType("apo_zero", apo_zero, ("beta",)),
    LossType("apo_down", apo_down, ("beta",)),
    LossType("discopop", discopop, _SCORES + ("discopop_tau",)),
    LossType("sft", sft, (), reference_free=True, fixed_reduction=True, reads_nll=True),
    LossType("sigmoid_norm", sigmoid_norm, _SCORES, per_token=True),
    LossType("simpo", simpo, ("beta", "simpo_gamma", "label_smoothing"), reference_free=True, per_token=True,
             trainer="CPOTrainer"),
    LossType("orpo", orpo, ("beta",), reference_free=True, per_token=True, fixed_reduction=True, reads_nll=True,
             trainer="CPOTrainer"),
)}
# TRL's DPOConfig.loss_type values, all of them rows above
TRL_DPO_LOSS_TYPES = tuple(name for name, row in PAIRED.items() if row.trainer == "DPOTrainer")


def kto(logratios: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
        desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """KTO (TRL's KTOTrainer), per sequence: lambda_D (1 - s(beta (D - z0))) for a desirable one,
    lambda_U (1 - s(beta (z0 - D))) for an undesirable one, D its log-ratio, z0 the KL reference
    point (detached)."""
    sign = torch.where(desirable, 1.0, -1.0).to(logratios.dtype)
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logratios.dtype)
    return weight * (1 - torch.sigmoid(beta * (logratios - kl) * sign))


UNPAIRED = ("kto",)
ALL = tuple(PAIRED) + UNPAIRED


def _with_reduction(row: LossType, pairs: Pairs, average_logps: Optional[bool]) -> Pairs:
    """`pairs` as `row` reads them under average_logps (None: its own formula; True: per
    response token; False: sums)."""
    if average_logps is None or row.fixed_reduction:
        return pairs
    # Pairs spelt out rather than dataclasses.replace, which torch.compile cannot trace
    if row.per_token and average_logps is False:
        ones = torch.ones_like(pairs.chosen_lengths)
        return Pairs(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, ones, ones,
                     pairs.chosen_nll, pairs.hyper)
    if not row.per_token and average_logps is True:
        def per_token(values, lengths):
            return None if values is None else values / lengths

        return Pairs(per_token(pairs.chosen, pairs.chosen_lengths), per_token(pairs.rejected, pairs.rejected_lengths),
                     per_token(pairs.ref_chosen, pairs.chosen_lengths),
                     per_token(pairs.ref_rejected, pairs.rejected_lengths), pairs.chosen_lengths,
                     pairs.rejected_lengths, pairs.chosen_nll, pairs.hyper)
    return pairs


def ld_token_weights(layout, ld_alpha: float) -> torch.Tensor:
    """[N] LD-DPO's weight of each token: 1 for the first min(n_c, n_r) response tokens of either
    response of a pair (their shared length), ld_alpha past them, 0 outside the responses."""
    if layout.shares_sequences:
        raise ValueError("ld_alpha weighs each response by its pair's shared length, which is not one number for "
                         "a response in several pairs (a prompt group's): train grouped responses without ld_alpha")
    lengths = layout.lengths
    shared = torch.minimum(lengths[layout.chosen_index], lengths[layout.rejected_index])
    shared_of_sequence = torch.zeros_like(lengths).index_copy(0, layout.chosen_index, shared).index_copy(
        0, layout.rejected_index, shared)
    mask = layout.response_mask.long()
    # 1-based position of each response token in its response
    first = torch.cumsum(lengths, 0) - lengths
    position = torch.cumsum(mask, 0) - first[layout.sequence_ids]
    inside = position <= shared_of_sequence[layout.sequence_ids]
    weights = torch.where(inside, 1.0, ld_alpha)
    return weights * mask


def sequence_sums(values: torch.Tensor, layout) -> torch.Tensor:
    """[S] sums of per-token values over each sequence (0 outside the responses)."""
    sums = torch.zeros(layout.num_sequences, dtype=values.dtype, device=values.device)
    return sums.index_add(0, layout.sequence_ids, values)


@dataclass
class LossTerms:
    """A loss and its parts: loss []; parts {type: [P] per pair, or [S] per sequence for KTO},
    each summing to that type's (unweighted) loss; sequence_logps [S] as the loss read them."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor]
    sequence_logps: torch.Tensor


def sequence_logps_read(token_logp: torch.Tensor, layout, ld_alpha: Optional[float]) -> torch.Tensor:
    """[S] each sequence's log-prob as the loss types read it: the sum over its response tokens,
    LD-DPO-weighted with ld_alpha (the reference's is computed by this same function)."""
    if ld_alpha is None:
        return sequence_sums(token_logp, layout)
    return sequence_sums(token_logp * ld_token_weights(layout, ld_alpha).to(token_logp.dtype), layout)


def loss_terms(token_logp: torch.Tensor, layout, reference_logps: Optional[torch.Tensor], spec,
               kl: Optional[torch.Tensor] = None, *, sequence_log_weights: Optional[torch.Tensor] = None
               ) -> LossTerms:
    """The loss of `spec` (a fastpref.loss_spec.LossSpec) on the per-token log-probs [N] (0 outside
    the responses), in plain differentiable torch ops. reference_logps: [S] (LD-weighted like the
    policy's with ld_alpha); kl: [] KTO's reference point; sequence_log_weights: [S] WPO's log w
    (use_weighting). Reads nothing on the host."""
    raw_sums = sequence_sums(token_logp, layout)
    sums = raw_sums if spec.ld_alpha is None else sequence_logps_read(token_logp, layout, spec.ld_alpha)
    lengths = layout.lengths.to(token_logp.dtype)
    if not spec.is_paired:
        scale = 1.0 / lengths if spec.average_logps else 1.0
        per_sequence = kto((sums - reference_logps) * scale, layout.desirable, kl, spec.beta,
                           spec.desirable_weight, spec.undesirable_weight) / sums.shape[0]
        return LossTerms(spec.loss_weights[0] * per_sequence.sum(), {"kto": per_sequence}, sums)
    chosen, rejected = layout.chosen_index, layout.rejected_index
    chosen_tokens = lengths[chosen].sum()
    pairs = Pairs(sums[chosen], sums[rejected],
                  None if reference_logps is None else reference_logps[chosen],
                  None if reference_logps is None else reference_logps[rejected],
                  lengths[chosen], lengths[rejected], -raw_sums[chosen].sum() / chosen_tokens, spec)
    pair_weights = None
    if sequence_log_weights is not None:
        log_weights = sequence_log_weights.detach()
        pair_weights = torch.exp(log_weights[chosen]) * torch.exp(log_weights[rejected])
    parts, loss = {}, torch.zeros((), dtype=token_logp.dtype, device=token_logp.device)
    for name, weight in zip(spec.loss_types, spec.loss_weights):
        row = PAIRED[name]
        per_pair = row.loss(_with_reduction(row, pairs, spec.average_logps))
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        parts[name] = per_pair / per_pair.shape[0]
        loss = loss + weight * parts[name].sum()
    return LossTerms(loss, parts, sums)


def token_gradient(token_logp: torch.Tensor, layout, reference_logps, spec, kl=None) -> torch.Tensor:
    """[N] dloss/dlogp_n of loss_terms, by autograd (what a pass that computes its gradients in the
    forward hands back)."""
    token_logp = token_logp.detach().requires_grad_()
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(loss_terms(token_logp, layout, reference_logps, spec, kl).loss, token_logp)
    return gradient


def reads_of(names) -> Dict[str, Tuple[str, ...]]:
    """hyper-parameter -> the types among `names` that read it."""
    readers: Dict[str, Tuple[str, ...]] = {}
    for name in names:
        for hyper in PAIRED[name].reads if name in PAIRED else ("beta",):
            readers[hyper] = readers.get(hyper, ()) + (name,)
    return readers
