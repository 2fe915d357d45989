"""The preference loss family: names, hyper-parameters, and their validation.

Per pair p, with policy log-probs pi_c, pi_r and reference log-probs ref_c, ref_r of the chosen
and rejected responses (sums over response tokens, or means where a loss averages), and
Dc = pi_c - ref_c, Dr = pi_r - ref_r, d = beta (Dc - Dr):

    sigmoid   (DPO)      -(1 - e) log s(d) - e log s(-d)            e = label_smoothing
    robust    (cDPO)     [-(1 - e) log s(d) + e log s(-d)] / (1 - 2e)
    hinge                relu(1 - d)
    ipo                  (Dc - Dr - 1 / (2 beta))^2                  on mean log-probs by default
    apo_zero             (1 - s(beta Dc)) + s(beta Dr)
    apo_down             s(beta Dc) + (1 - s(d))
    simpo  (ref-free)    -(1 - e) log s(x) - e log s(-x),  x = beta (pi_c - pi_r) - gamma,  mean log-probs
    orpo   (ref-free)    nll - beta log s(log odds(c) - log odds(r)),  odds(y) = p / (1 - p),
                         p = exp(mean log-prob);  beta plays ORPO's lambda
    sft    (ref-free)    nll = -(sum of chosen response log-probs) / (number of chosen response tokens)
    kto    (unpaired)    w_y (1 - s(beta (D_y - z0) sign_y)),  sign +1 desirable, -1 undesirable,
                         z0 = the KL reference point (given, detached; 0 by default)

with s the logistic sigmoid. Pair terms are averaged over pairs, KTO over sequences; nll is the
token-level mean over all chosen response tokens of the batch (as TRL and Liger-Kernel compute it).
Several types combine as a weighted sum, e.g. ("sigmoid", "sft") with weights (1, alpha) is RPO.
"dpo" is accepted as another name of "sigmoid" (LOSS_TYPE_ALIASES); a spec holds and reports "sigmoid".

IPO: TRL length-normalises each log-ratio (mean log-probs), which is the default here; the IPO
paper states the loss on sequence log-probs: pass ``average_logps=False`` for that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

from .transfer import to_device

# Order matters: it indexes the per-type weights and reductions handed to the fused kernels.
PAIRED_LOSS_TYPES = ("sigmoid", "ipo", "simpo", "hinge", "robust", "orpo", "apo_zero", "apo_down", "sft")
UNPAIRED_LOSS_TYPES = ("kto",)
LOSS_TYPES = PAIRED_LOSS_TYPES + UNPAIRED_LOSS_TYPES
# Other names a loss type is given under, reported under TRL's (DPO's loss is TRL's "sigmoid").
LOSS_TYPE_ALIASES = {"dpo": "sigmoid"}
ACCEPTED_LOSS_TYPES = LOSS_TYPES + tuple(LOSS_TYPE_ALIASES)

REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})
# Reduction of the policy/reference log-probs each type uses unless average_logps overrides it.
AVERAGES_BY_DEFAULT = frozenset({"ipo", "simpo", "orpo"})
# Types whose reduction is part of their definition.
FIXED_REDUCTION = frozenset({"orpo", "sft"})
NLL_TYPES = frozenset({"orpo", "sft"})


def canonical_loss_types(loss_type: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The loss types `loss_type` names, under TRL's names (an alias replaced); checked to be known."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    for name in types:
        if name not in ACCEPTED_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; valid types: {', '.join(LOSS_TYPES)} "
                             f"({', '.join(f'{alias} = {known}' for alias, known in LOSS_TYPE_ALIASES.items())})")
    return tuple(LOSS_TYPE_ALIASES.get(name, name) for name in types)


@dataclass(frozen=True)
class LossSpec:
    """A validated loss configuration (see the module docstring for the formulas)."""

    loss_types: Tuple[str, ...]
    loss_weights: Tuple[float, ...]
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    average_logps: Optional[bool] = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def build(cls, loss_type: Union[str, Sequence[str]] = "sigmoid", *,
              loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1,
              label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
              average_logps: Optional[bool] = None, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0) -> "LossSpec":
        types = canonical_loss_types(loss_type)
        if not types:
            raise ValueError(f"loss_type must name at least one of {list(LOSS_TYPES)}")
        if len(set(types)) != len(types):
            raise ValueError(f"loss_type lists a type twice: {list(types)}")
        if "kto" in types and len(types) > 1:
            raise ValueError("loss_type 'kto' is unpaired and cannot be combined with paired losses")
        if loss_weights is None:
            weights = (1.0,) * len(types)
        else:
            weights = tuple(float(w) for w in loss_weights)
            if len(weights) != len(types):
                raise ValueError(
                    f"loss_weights must have one weight per loss type ({len(types)}), got {len(weights)}")
        for name, value in (("beta", beta), ("desirable_weight", desirable_weight),
                            ("undesirable_weight", undesirable_weight)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
        if not isinstance(simpo_gamma, (int, float)):
            raise TypeError(f"simpo_gamma must be a number, got {type(simpo_gamma).__name__}")
        if average_logps is not None and not isinstance(average_logps, bool):
            raise TypeError(f"average_logps must be None, True or False, got {average_logps!r}")
        return cls(types, weights, float(beta), float(label_smoothing), float(simpo_gamma),
                   average_logps, float(desirable_weight), float(undesirable_weight))

    def op_arguments(self) -> tuple:
        """The spec as custom ops take it: (loss type indices into LOSS_TYPES, weights, beta,
        label_smoothing, simpo_gamma, average_logps, desirable_weight, undesirable_weight)."""
        return ([LOSS_TYPES.index(name) for name in self.loss_types], list(self.loss_weights), self.beta,
                self.label_smoothing, self.simpo_gamma, self.average_logps, self.desirable_weight,
                self.undesirable_weight)

    @classmethod
    def from_op_arguments(cls, loss_types, loss_weights, beta, label_smoothing, simpo_gamma, average_logps,
                          desirable_weight, undesirable_weight) -> "LossSpec":
        """The spec back from op_arguments()."""
        return cls.build(tuple(LOSS_TYPES[i] for i in loss_types), loss_weights=loss_weights, beta=beta,
                         label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, average_logps=average_logps,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)

    @property
    def needs_reference(self) -> bool:
        return any(name not in REFERENCE_FREE for name in self.loss_types)

    @property
    def is_paired(self) -> bool:
        return self.loss_types != ("kto",)

    def averages(self, loss_type: str) -> bool:
        """Whether `loss_type` works on mean (True) or summed (False) response log-probs."""
        if loss_type in FIXED_REDUCTION or self.average_logps is None:
            return loss_type in AVERAGES_BY_DEFAULT
        return self.average_logps

    def weight_of(self, loss_type: str) -> float:
        return dict(zip(self.loss_types, self.loss_weights)).get(loss_type, 0.0)

    def kernel_tables(self, device):
        """(weights [T] float32, averages [T] int32) indexed like PAIRED_LOSS_TYPES, for the kernels
        (made on the CPU and queued to the device without the host waiting)."""
        weights = torch.tensor([self.weight_of(n) for n in PAIRED_LOSS_TYPES], dtype=torch.float32)
        averages = torch.tensor([self.averages(n) for n in PAIRED_LOSS_TYPES], dtype=torch.int32)
        return to_device(weights, device), to_device(averages, device)
