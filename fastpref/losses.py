"""Preference losses straight from hidden states: no [tokens x vocab] tensor anywhere.

    loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, weight, targets, layout, reference)

1. per-token log-probs of the response tokens by the fused linear op (prompt tokens are
   dropped before any matmul);
2. one fused pass over all pairs: per-sequence sums, the pair loss of every active type
   (formulas in :mod:`fastpref.loss_spec`) and its gradient with respect to each sequence's
   log-prob, handed back as per-token gradient scales;
3. the backward is the linear op's backward driven by those scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends as _backends
from .layout import PackedLayout
from .linear_logprobs import check_linear_inputs, linear_logprobs
from .loss_spec import NLL_TYPES, PAIRED_LOSS_TYPES, REFERENCE_FREE, LossSpec
from .numerics import log1m_exp


@dataclass
class ReferenceHead:
    """The reference model's final hidden states [N, H] (same packed tokens) and LM head."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


Reference = Union[None, torch.Tensor, ReferenceHead]


class _FusedPreferenceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logp, layout, reference_logps, spec, kl, backend):
        result = backend.preference_loss(token_logp.contiguous(), layout, reference_logps, spec, kl)
        ctx.save_for_backward(result.token_grad)
        ctx.mark_non_differentiable(result.parts, result.sequence_logps)
        return result.loss, result.parts, result.sequence_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts, _grad_sequence_logps):
        (token_grad,) = ctx.saved_tensors
        return grad_loss * token_grad, None, None, None, None, None


def sequence_logps(token_logp: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """[S] summed log-probs of each sequence's response tokens (token_logp is 0 elsewhere)."""
    sums = torch.zeros(layout.num_sequences, dtype=token_logp.dtype, device=token_logp.device)
    return sums.index_add_(0, layout.sequence_ids, token_logp)


class PreferenceLoss(torch.nn.Module):
    """A preference-optimisation loss over a packed batch, fused with the LM head.

    Args:
        loss_type: one of fastpref.loss_spec.LOSS_TYPES, or a sequence of them for a weighted sum
            (e.g. ("sigmoid", "sft") with loss_weights (1.0, alpha) is RPO).
        beta: the inverse temperature (ORPO's lambda for "orpo"). Must be > 0.
        loss_weights: one weight per loss type (default: all 1).
        label_smoothing: e in [0, 0.5) for "sigmoid" (conservative DPO), "robust" and "simpo".
        simpo_gamma: SimPO's target margin gamma.
        average_logps: None for each type's own reduction (mean log-probs for ipo and simpo,
            sums for the rest), or True/False to average/sum for every type that allows it
            (orpo and sft have theirs fixed).
        desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
        ignore_index: the target id marking positions outside the responses.
        backend: "auto", "triton" or "torch" (see fastpref.available_backends); it runs both
            the linear log-prob op and the fused pair loss.

    Call with (hidden [N, H], weight [V, H], targets [N], layout, reference=None, *, bias=None,
    kto_kl=None) -> (loss, metrics). `reference` is the reference model's summed response
    log-prob per sequence ([S] tensor, the cheap precomputed path) or a :class:`ReferenceHead`
    to compute them with the same fused op under no_grad; reference-free losses (simpo, orpo,
    sft) take none. `metrics` holds detached 0-d tensors under TRL's keys.
    """

    def __init__(self, loss_type: Union[str, Sequence[str]] = "sigmoid", *, beta: float = 0.1,
                 loss_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, average_logps: Optional[bool] = None,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.spec = LossSpec.build(
            loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma, average_logps=average_logps,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        self.backend = backend

    def extra_repr(self) -> str:
        return f"spec={self.spec}, backend={self.backend!r}"

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
        unlabeled = (targets == self.ignore_index) & layout.response_mask
        if bool(unlabeled.any()):
            position = int(unlabeled.nonzero()[0, 0])
            raise ValueError(
                f"targets at response positions must be token ids, but position {position} holds "
                f"ignore_index = {self.ignore_index}")

        impl = _backends.resolve(self.backend, hidden.device)
        reference_logps = self._reference_logps(reference, layout, hidden, response_targets)
        token_logp = linear_logprobs(hidden, weight, response_targets, bias=bias,
                                     ignore_index=self.ignore_index, backend=impl.name)
        kl = self._kl(kto_kl, token_logp)
        loss, parts, seq_logps = _FusedPreferenceLoss.apply(
            token_logp, layout, reference_logps, spec, kl, impl)
        return loss, self._metrics(layout, seq_logps, reference_logps, parts, kl)

    def _reference_logps(self, reference, layout, hidden, response_targets):
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
            with torch.no_grad():
                token_logp = linear_logprobs(
                    reference.hidden, reference.weight, response_targets, bias=reference.bias,
                    ignore_index=self.ignore_index, backend=self.backend)
            return sequence_logps(token_logp, layout).to(dtype)
        if not isinstance(reference, torch.Tensor):
            raise TypeError(
                f"reference must be None, a [S] tensor or a ReferenceHead, got {type(reference).__name__}")
        if reference.shape != (layout.num_sequences,) or not reference.dtype.is_floating_point:
            raise ValueError(
                f"reference log-probs must be a float tensor with one value per sequence "
                f"({layout.num_sequences}), got {reference.dtype} of shape {tuple(reference.shape)}")
        if reference.device != hidden.device:
            raise ValueError(f"reference is on {reference.device}, hidden on {hidden.device}")
        if not bool(torch.isfinite(reference).all()):
            raise ValueError("reference log-probs must be finite")
        return reference.detach().to(dtype).contiguous()

    def _kl(self, kto_kl, token_logp):
        if self.spec.is_paired:
            return None
        value = torch.as_tensor(0.0 if kto_kl is None else kto_kl, dtype=token_logp.dtype)
        if value.dim() != 0 or not bool(torch.isfinite(value)):
            raise ValueError(f"kto_kl must be a finite scalar, got {kto_kl!r}")
        return value.detach().to(token_logp.device)

    def _metrics(self, layout, seq_logps, reference_logps, parts, kl) -> Dict[str, torch.Tensor]:
        """TRL's metric keys, from per-sequence sums: O(S) work, no vocabulary pass."""
        spec = self.spec
        lengths = layout.lengths.to(seq_logps.dtype)
        metrics: Dict[str, torch.Tensor] = {}
        if not spec.is_paired:
            scale = 1.0 / lengths if spec.averages("kto") else 1.0
            rewards = spec.beta * (seq_logps - reference_logps) * scale
            good, bad = layout.desirable, ~layout.desirable

            def mean_over(values, mask):
                return (values * mask).sum() / mask.sum().clamp(min=1)

            metrics["rewards/chosen"] = mean_over(rewards, good)
            metrics["rewards/rejected"] = mean_over(rewards, bad)
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
            metrics["logps/chosen"] = mean_over(seq_logps, good)
            metrics["logps/rejected"] = mean_over(seq_logps, bad)
            metrics["kl"] = kl
            metrics["loss/kto"] = parts[0].sum()
            return metrics

        chosen, rejected = layout.chosen_index, layout.rejected_index
        preference_types = [t for t in spec.loss_types if t != "sft"] or ["sft"]
        primary = preference_types[0]
        if primary in REFERENCE_FREE:
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
        for k, name in enumerate(PAIRED_LOSS_TYPES):
            if spec.weight_of(name) != 0.0:
                metrics[f"loss/{name}"] = parts[k].sum()
        if NLL_TYPES & set(spec.loss_types):
            metrics["nll_loss"] = -seq_logps[chosen].sum() / lengths[chosen].sum()
        if "orpo" in spec.loss_types:
            mean_c, mean_r = seq_logps[chosen] / lengths[chosen], seq_logps[rejected] / lengths[rejected]
            log_odds = (mean_c - mean_r) - (log1m_exp(mean_c) - log1m_exp(mean_r))
            metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
            metrics["log_odds_chosen"] = log_odds.mean()
        return metrics


def preference_loss(hidden, weight, targets, layout: PackedLayout, reference: Reference = None,
                    *, bias=None, kto_kl=None, **options):
    """Functional form of :class:`PreferenceLoss`: options are its constructor's arguments."""
    return PreferenceLoss(**options)(hidden, weight, targets, layout, reference,
                                     bias=bias, kto_kl=kto_kl)
