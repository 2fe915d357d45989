"""Preference losses straight from hidden states: no [tokens x vocab] tensor anywhere.

    loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, weight, targets, layout, reference)

1. per-token log-probs of the response tokens by the fused linear op (prompt tokens are
   dropped before any matmul);
2. per-sequence sums and the loss of every active type, plain torch (one table of formulas:
   :mod:`fastpref.loss_types`), O(pairs) work;
3. autograd's backward through it hands the op's backward one gradient scalar per token.

On the CPU a trainable head takes one op for all three instead (:mod:`fastpref.head_loss`): the
gradients are computed in the forward, pair group by pair group, without recomputing the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import deferred_errors, head_loss, loss_types
from .layout import PackedLayout
from .linear_logprobs import LinearLogprobsOutput, check_linear_inputs, linear_logprobs
from .logit_transform import LogitTransform
from .loss_spec import LossSpec
from .loss_types import PAIRED, Pairs, orpo_log_odds


@dataclass
class ReferenceHead:
    """The reference model's final hidden states [N, H] (same packed tokens) and LM head."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


Reference = Union[None, torch.Tensor, ReferenceHead]


def sequence_logps(token_logp: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[S] summed log-probs of each sequence's response tokens (token_logp is 0 elsewhere)."""
    return loss_types.sequence_sums(token_logp, layout)


# the op's per-token outputs behind TRL's token metrics (PreferenceLoss(token_metrics=True))
_TOKEN_METRIC_OUTPUTS = ("entropy", "mean_logits", "is_top1")


def _token_metrics(outputs: LinearLogprobsOutput, layout: PackedLayout) -> Dict[str, torch.Tensor]:
    """TRL's token metrics (see :class:`PreferenceLoss`) from the op's per-token outputs: per-sequence
    sums, then means over the tokens of the chosen and of the rejected sequences."""
    lengths = layout.lengths.to(outputs.mean_logits.dtype)
    if layout.is_paired:
        chosen = torch.zeros_like(lengths).index_fill_(0, layout.chosen_index, 1.0)
        rejected = torch.zeros_like(lengths).index_fill_(0, layout.rejected_index, 1.0)
    else:
        chosen = layout.desirable.to(lengths.dtype)
        rejected = 1.0 - chosen

    def mean_over(values, sequences):
        """Mean of a per-token output over the tokens of the sequences weighted 1 in `sequences`."""
        sums = sequence_logps(values.detach().to(lengths.dtype), layout)
        return (sums * sequences).sum() / (lengths * sequences).sum().clamp(min=1)

    metrics = {"entropy": outputs.entropy.detach().sum().to(lengths.dtype) / lengths.sum(),
               "logits/chosen": mean_over(outputs.mean_logits, chosen),
               "logits/rejected": mean_over(outputs.mean_logits, rejected)}
    if layout.is_paired:
        metrics["mean_token_accuracy"] = mean_over(outputs.is_top1, chosen)
    return metrics


class PreferenceLoss(torch.nn.Module):
    """A preference-optimisation loss over a packed batch, fused with the LM head.

    Args:
        loss_type: one of fastpref.loss_spec.LOSS_TYPES, or a sequence of them for a weighted sum
            (e.g. ("sigmoid", "sft") with loss_weights (1.0, alpha) is RPO).
        beta: the inverse temperature (ORPO's lambda for "orpo"). Must be > 0.
        loss_weights: one weight per loss type (default: all 1).
        label_smoothing: e in [0, 0.5) for the types that read it (exo_pair, robust, aot,
            aot_unpaired, simpo; TRL's "sigmoid" takes none).
        simpo_gamma: SimPO's target margin gamma.
        discopop_tau: DiscoPOP's temperature tau.
        f_divergence_type, f_alpha_divergence_coef: TRL's f-divergence of the log-ratios' scores
            (reverse_kl: plain DPO; forward_kl, js_divergence, alpha_divergence with its alpha).
        use_weighting: WPO's weights (each pair's loss times w_c w_r, w the exponential of the
            response's mean log p_t - log sum_v p_v^2, from the op's log_sum_sq_probs).
        ld_alpha: LD-DPO: the response tokens past the pair's shared length count ld_alpha times
            in the log-probs (None: plain sums).
        average_logps: None for each type's own reduction (TRL's formulas: per response token for
            ipo, sigmoid_norm, simpo and orpo, sums for the rest), or True/False to read the
            log-probs per response token / summed for every type that allows it (orpo, sft and
            their own are fixed).
        A value set away from its default that none of the loss types reads is refused.
        desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
        ignore_index: the target id marking positions outside the responses.
        logit_scale, softcap, temperature: the LM head's logit transform (see
            fastpref.linear_logprobs; :func:`fastpref.causal_lm.logit_transform` reads it off a
            Hugging Face config). The reference head of a ReferenceHead shares it.
        backend: "auto", "triton", "cuda" or "torch" (see fastpref.available_backends): the
            backend of the LM-head op (the loss on top is plain torch, fastpref.loss_types).
        scratch_bytes: the op's scratch budget (None: fastpref.set_scratch_bytes's default).
        check: raise bad values (targets out of range, and NaN or inf log-probs or reference
            log-probs) at once, with a synchronisation. By default bad targets are flagged on the
            device and raised later (fastpref.raise_pending_errors), and NaN and inf go through to
            the loss and the gradients as in PyTorch (a float16 GradScaler skips their step),
            counted in metrics["non_finite_logps"] and raised only by
            ``raise_pending_errors(non_finite=True)``.
        token_metrics: also return TRL's metrics of the policy's next-token distributions,
            computed by the op in the same pass as the log-probs (see below).
        gradients_in_forward: compute the gradients of hidden, weight and bias in the forward, a
            group of whole pairs at a time, from the logits the forward has just computed
            (fastpref.head_loss: 6NHV FLOPs instead of 8NHV, group_rows x V float32 logits held).
            None (default): on a CPU, wherever that runs (a trainable head on the torch backend,
            without token_metrics); True: also on a GPU (the "cuda" backend's cuBLAS GEMMs and
            epilogues, or "torch"), trading memory for time (about 1.5 GiB at V = 131,072 and
            the default group_rows, plus a float32 weight gradient), else a ValueError says why;
            False: never (the log-prob op, then the loss; the backward recomputes the logits).
        group_rows: response rows per group of gradients_in_forward (None: 256 on a CPU, 2,048
            on a GPU; a pair larger than that is a group of its own).

    Call with (hidden [N, H], weight [V, H], targets [N], layout, reference=None, *, bias=None,
    kto_kl=None) -> (loss, metrics). `reference` is the reference model's summed response
    log-prob per sequence ([S] tensor, the cheap precomputed path) or a :class:`ReferenceHead`
    to compute them with the same fused op under no_grad; reference-free losses (simpo, orpo,
    sft) take none. `metrics` holds detached 0-d tensors under TRL's keys, and
    ``non_finite_logps``, the share of sequences whose policy or reference log-prob is NaN or inf.
    Except with its
    gradients in the forward (which reads the layout's sizes), the call reads no tensor value on
    the host: it can run inside ``torch.compile(fullgraph=True)`` and between a
    forward and a backward without stalling a GPU.

    With ``token_metrics=True`` the metrics also hold TRL's (``DPOTrainer``, ``KTOTrainer``), from
    the per-token outputs of the same pass over the vocabulary (:class:`LinearLogprobsOutput`),
    where p_n = softmax(z_n) is token n's next-token distribution and C, R the response tokens of
    the chosen (desirable) and rejected (undesirable) sequences:

        entropy             = mean over C and R of  -sum_v p_{n,v} log p_{n,v}
        logits/chosen       = mean over C of  (1/V) sum_v z_{n,v}     (logits/rejected: over R)
        mean_token_accuracy = mean over C of  1[t_n = argmax_v z_{n,v}]   (paired losses only)
    """

    def __init__(self, loss_type: Union[str, Sequence[str]] = "sigmoid", *, beta: float = 0.1,
                 loss_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 1.0, use_weighting: bool = False,
                 ld_alpha: Optional[float] = None, average_logps: Optional[bool] = None,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 ignore_index: int = -100, logit_scale: float = 1.0, softcap: Optional[float] = None,
                 temperature: float = 1.0, backend: str = "auto", scratch_bytes: Optional[int] = None,
                 check: bool = False, token_metrics: bool = False, gradients_in_forward: Optional[bool] = None,
                 group_rows: Optional[int] = None):
        super().__init__()
        self.spec = LossSpec.build(
            loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma, discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=use_weighting, ld_alpha=ld_alpha,
            average_logps=average_logps, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if not isinstance(check, bool):
            raise TypeError(f"check must be True or False, got {check!r}")
        if not isinstance(token_metrics, bool):
            raise TypeError(f"token_metrics must be True or False, got {token_metrics!r}")
        if gradients_in_forward is not None and not isinstance(gradients_in_forward, bool):
            raise TypeError(f"gradients_in_forward must be None, True or False, got {gradients_in_forward!r}")
        if group_rows is not None and (not isinstance(group_rows, int) or isinstance(group_rows, bool)
                                       or group_rows < 1):
            raise ValueError(f"group_rows must be None or a positive int, got {group_rows!r}")
        self.token_metrics = token_metrics
        self.gradients_in_forward = gradients_in_forward
        self.group_rows = group_rows
        self.ignore_index = ignore_index
        self.transform = LogitTransform.build(logit_scale, softcap, temperature)
        self.backend = backend
        self.scratch_bytes = scratch_bytes
        self.check = check

    def extra_repr(self) -> str:
        return f"spec={self.spec}, transform={self.transform}, backend={self.backend!r}"

    def _logprobs(self, hidden, weight, targets, bias, num_kept, outputs=None):
        transform = self.transform
        return linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=self.ignore_index,
                               logit_scale=transform.logit_scale, softcap=transform.softcap,
                               temperature=transform.temperature, outputs=outputs, num_kept=num_kept,
                               backend=self.backend, scratch_bytes=self.scratch_bytes, check=self.check)

    def forward(self, hidden, weight, targets, layout: PackedLayout, reference: Reference = None,
                *, bias=None, kto_kl=None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        spec = self.spec
        check_linear_inputs(hidden, weight, targets, bias)
        if not isinstance(layout, PackedLayout):
            raise TypeError(f"layout must be a fastpref.PackedLayout, got {type(layout).__name__}")
        if layout.num_tokens != hidden.shape[0]:
            raise ValueError(
                f"layout describes {layout.num_tokens} tokens but hidden has N = {hidden.shape[0]} rows")
        if layout.response_mask.device != hidden.device:
            raise ValueError(f"layout is on {layout.response_mask.device}, hidden on {hidden.device}")
        if spec.is_paired != layout.is_paired:
            raise ValueError(
                "loss_type 'kto' needs an unpaired layout (PackedLayout.unpaired with desirable labels)"
                if not spec.is_paired else
                f"loss types {list(spec.loss_types)} need a paired layout (PackedLayout.paired)")
        if kto_kl is not None and spec.is_paired:
            raise ValueError("kto_kl is KTO's reference point; the paired losses take none")

        response_targets = targets.masked_fill(~layout.response_mask, self.ignore_index)
        ignore_index = self.ignore_index
        deferred_errors.report_any(
            (targets == ignore_index) & layout.response_mask,
            lambda count, first: (f"targets at response positions must be token ids, but position {first} holds "
                                  f"ignore_index = {ignore_index} ({count} positions in all)"), self.check)

        reference_logps = self._reference_logps(reference, layout, hidden, response_targets,
                                                torch.is_grad_enabled() and weight.requires_grad)
        kl = self._kl(kto_kl, hidden)
        if self._computes_gradients_in_forward(hidden, weight):
            loss, parts, seq_logps = head_loss.head_preference_loss(
                hidden, weight, bias, response_targets, layout, reference_logps, spec, kl,
                ignore_index=ignore_index, transform=self.transform, check=self.check, backend=self.backend,
                group_rows=self.group_rows)
        else:
            token_outputs, token_logp = self._token_outputs(hidden, weight, response_targets, bias, layout)
            log_weights = None
            if spec.use_weighting:  # WPO's, without gradient, as TRL
                aligned = (token_outputs.log_probs - token_outputs.log_sum_sq_probs).detach()
                log_weights = sequence_logps(aligned, layout) / layout.lengths.to(aligned.dtype)
            with torch.autocast(hidden.device.type, enabled=False):  # the loss is computed in float32
                terms = loss_types.loss_terms(token_logp, layout, reference_logps, spec, kl,
                                              sequence_log_weights=log_weights)
            loss, parts, seq_logps = terms.loss, terms.parts, terms.sequence_logps
        metrics = self._metrics(layout, seq_logps.detach(), reference_logps,
                                {name: part.detach() for name, part in parts.items()}, kl)
        if self.token_metrics:
            metrics.update(_token_metrics(token_outputs, layout))
        return loss, metrics

    def _computes_gradients_in_forward(self, hidden, weight, trainable: Optional[bool] = None) -> bool:
        if self.gradients_in_forward is False:
            return False
        reason = head_loss.unavailable_reason(self.backend, hidden, weight, self.spec, self.token_metrics,
                                              requested=self.gradients_in_forward is True, trainable=trainable)
        if reason is not None and self.gradients_in_forward:
            raise ValueError(f"gradients_in_forward=True cannot run here: {reason}")
        return reason is None

    def _token_outputs(self, hidden, weight, response_targets, bias, layout):
        """(the op's outputs, the log-probs): with the per-token outputs the metrics (token_metrics)
        and WPO's weights (use_weighting) read, all from one pass over the vocabulary."""
        outputs = (_TOKEN_METRIC_OUTPUTS if self.token_metrics else ()) + (
            ("log_sum_sq_probs",) if self.spec.use_weighting else ())
        token_outputs = self._logprobs(hidden, weight, response_targets, bias, layout.num_response_tokens,
                                       outputs or None)
        return token_outputs, token_outputs.log_probs if outputs else token_outputs

    def sequence_logps(self, hidden, weight, targets, layout: PackedLayout, *, bias=None,
                       trainable_head: bool) -> torch.Tensor:
        """[S] summed response log-probs of each sequence, without gradients, computed as this
        loss computes the policy's: by the same path (the two-op path with the same per-token
        outputs, or the gradients-in-the-forward path's groups, which the policy takes where
        `trainable_head`), the same row blocks and the same sums. A reference pass run through it
        gives, for the same weights and inputs, the policy's log-probs bit for bit: a DPO step
        whose policy is its reference has rewards exactly 0."""
        check_linear_inputs(hidden, weight, targets, bias)
        response_targets = targets.masked_fill(~layout.response_mask, self.ignore_index)
        with torch.no_grad():
            if self._computes_gradients_in_forward(hidden, weight, trainable=trainable_head):
                token_logp = head_loss.grouped_logprobs(
                    hidden, weight, bias, response_targets, layout, ignore_index=self.ignore_index,
                    transform=self.transform, check=self.check, backend=self.backend, group_rows=self.group_rows)
            else:
                _, token_logp = self._token_outputs(hidden, weight, response_targets, bias, layout)
        return loss_types.sequence_logps_read(token_logp, layout, self.spec.ld_alpha)

    def _reference_logps(self, reference, layout, hidden, response_targets, trainable_head: bool):
        spec = self.spec
        if reference is None:
            if spec.needs_reference:
                raise ValueError(
                    f"loss types {list(spec.loss_types)} need a reference: per-sequence reference "
                    "log-probs [S] or a ReferenceHead")
            return None
        if not spec.needs_reference:
            raise ValueError(
                f"loss types {list(spec.loss_types)} are reference-free: pass reference=None")
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if isinstance(reference, ReferenceHead):
            check_linear_inputs(reference.hidden, reference.weight, response_targets, reference.bias)
            if reference.hidden.device != hidden.device:
                raise ValueError(
                    f"reference.hidden is on {reference.hidden.device}, hidden on {hidden.device}")
            return self.sequence_logps(reference.hidden, reference.weight, response_targets, layout,
                                       bias=reference.bias, trainable_head=trainable_head).to(dtype)
        if not isinstance(reference, torch.Tensor):
            raise TypeError(
                f"reference must be None, a [S] tensor or a ReferenceHead, got {type(reference).__name__}")
        if reference.shape != (layout.num_sequences,) or not reference.dtype.is_floating_point:
            raise ValueError(
                f"reference log-probs must be a float tensor with one value per sequence "
                f"({layout.num_sequences}), got {reference.dtype} of shape {tuple(reference.shape)}")
        if reference.device != hidden.device:
            raise ValueError(f"reference is on {reference.device}, hidden on {hidden.device}")
        deferred_errors.report_any(
            ~torch.isfinite(reference),
            lambda count, first: f"reference log-probs must be finite; sequence {first} is not ({count} in all)",
            self.check, non_finite=True)
        return reference.detach().to(dtype).contiguous()

    def _kl(self, kto_kl, hidden):
        if self.spec.is_paired:
            return None
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if kto_kl is None or (isinstance(kto_kl, (int, float)) and not isinstance(kto_kl, bool)):
            value = 0.0 if kto_kl is None else float(kto_kl)
            if not math.isfinite(value):
                raise ValueError(f"kto_kl must be a finite scalar, got {kto_kl!r}")
            return torch.full((), value, dtype=dtype, device=hidden.device)
        if not isinstance(kto_kl, torch.Tensor) or kto_kl.dim() != 0 or not kto_kl.dtype.is_floating_point:
            raise ValueError(f"kto_kl must be a finite scalar (a number or a 0-d float tensor), got {kto_kl!r}")
        if kto_kl.device != hidden.device:
            raise ValueError(f"kto_kl is on {kto_kl.device}, hidden on {hidden.device}")
        deferred_errors.report_any(~torch.isfinite(kto_kl), lambda count, first: "kto_kl must be finite", self.check,
                                   non_finite=True)
        return kto_kl.detach().to(dtype)

    def _metrics(self, layout, seq_logps, reference_logps, parts, kl) -> Dict[str, torch.Tensor]:
        """TRL's metric keys, from per-sequence sums: O(S) work, no vocabulary pass."""
        spec = self.spec
        lengths = layout.lengths.to(seq_logps.dtype)
        # NaN and inf go through, as in PyTorch (a GradScaler skips their step): counted here
        non_finite = ~torch.isfinite(seq_logps)
        if reference_logps is not None:
            non_finite |= ~torch.isfinite(reference_logps)
        metrics: Dict[str, torch.Tensor] = {"non_finite_logps": non_finite.to(seq_logps.dtype).mean()}
        if not spec.is_paired:
            scale = 1.0 / lengths if spec.averages("kto") else 1.0
            rewards = spec.beta * (seq_logps - reference_logps) * scale
            good, bad = layout.desirable, ~layout.desirable

            def mean_over(values, mask):
                return (values * mask).sum() / mask.sum().clamp(min=1)

            metrics["rewards/chosen"] = mean_over(rewards, good)
            metrics["rewards/rejected"] = mean_over(rewards, bad)
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            # not one of TRL's KTO metrics: the share of sequences whose reward has their label's sign
            metrics["rewards/accuracies"] = torch.where(good, rewards > 0, rewards < 0).to(rewards.dtype).mean()
            metrics["logps/chosen"] = mean_over(seq_logps, good)
            metrics["logps/rejected"] = mean_over(seq_logps, bad)
            metrics["kl"] = kl
            metrics["loss/kto"] = parts["kto"].sum()
            return metrics

        chosen, rejected = layout.chosen_index, layout.rejected_index
        preference_types = [t for t in spec.loss_types if t != "sft"] or ["sft"]
        primary = preference_types[0]
        if PAIRED[primary].reference_free:
            # as TRL's CPO/ORPO trainers: beta times the policy log-probs the loss uses
            scale = 1.0 / lengths if spec.averages(primary) else 1.0
            rewards = spec.beta * seq_logps * scale
        else:
            # as TRL's DPOTrainer: beta times the summed log-ratio, whatever the loss averages
            rewards = spec.beta * (seq_logps - reference_logps)
        reward_c, reward_r = rewards[chosen], rewards[rejected]
        metrics["rewards/chosen"] = reward_c.mean()
        metrics["rewards/rejected"] = reward_r.mean()
        metrics["rewards/accuracies"] = (reward_c > reward_r).to(rewards.dtype).mean()
        metrics["rewards/margins"] = (reward_c - reward_r).mean()
        metrics["logps/chosen"] = seq_logps[chosen].mean()
        metrics["logps/rejected"] = seq_logps[rejected].mean()
        for name, part in parts.items():
            if spec.weight_of(name) != 0.0:
                metrics[f"loss/{name}"] = part.sum()
        if any(PAIRED[name].reads_nll for name in spec.loss_types):
            metrics["nll_loss"] = -seq_logps[chosen].sum() / lengths[chosen].sum()
        if "orpo" in spec.loss_types:
            log_odds = orpo_log_odds(Pairs(seq_logps[chosen], seq_logps[rejected], None, None, lengths[chosen],
                                           lengths[rejected], None, spec))
            metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
            metrics["log_odds_chosen"] = log_odds.mean()
        return metrics


def preference_loss(hidden, weight, targets, layout: PackedLayout, reference: Reference = None,
                    *, bias=None, kto_kl=None, **options):
    """Functional form of :class:`PreferenceLoss`: options are its constructor's arguments."""
    return PreferenceLoss(**options)(hidden, weight, targets, layout, reference,
                                     bias=bias, kto_kl=kto_kl)
