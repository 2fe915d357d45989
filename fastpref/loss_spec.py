"""A validated loss configuration: which loss types (fastpref.loss_types' table), their weights
and hyper-parameters.

Every loss type and hyper-parameter is TRL's, under TRL's name and with TRL's meaning (formulas
in :mod:`fastpref.loss_types`). "dpo" is accepted as another name of "sigmoid"
(LOSS_TYPE_ALIASES); a spec holds and reports "sigmoid". A hyper-parameter set away from its
default that none of the chosen types reads is refused, naming the types that read it (beta is
always read: the metrics' rewards are beta times the log-probs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Tuple, Union

from . import loss_types
from .loss_types import F_DIVERGENCE_TYPES, PAIRED, Hyper

LOSS_TYPES = loss_types.ALL
# Other names a loss type is given under, reported under TRL's (DPO's loss is TRL's "sigmoid").
LOSS_TYPE_ALIASES = {"dpo": "sigmoid"}
ACCEPTED_LOSS_TYPES = LOSS_TYPES + tuple(LOSS_TYPE_ALIASES)
# the per-sequence weighting options, which every paired type takes
PAIRED_OPTIONS = ("use_weighting", "ld_alpha")


def canonical_loss_types(loss_type: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The loss types `loss_type` names, under TRL's names (an alias replaced); checked to be known."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    for name in types:
        if name not in ACCEPTED_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; valid types: {', '.join(LOSS_TYPES)} "
                             f"({', '.join(f'{alias} = {known}' for alias, known in LOSS_TYPE_ALIASES.items())})")
    return tuple(LOSS_TYPE_ALIASES.get(name, name) for name in types)


def _number(name: str, value, condition, expected: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not condition(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class LossSpec(Hyper):
    """A validated loss configuration (see the module docstring and fastpref.loss_types): the
    hyper-parameters the loss functions read (Hyper's fields), and the types, their weights and
    the per-sequence options."""

    loss_types: Tuple[str, ...]
    loss_weights: Tuple[float, ...]
    use_weighting: bool = False
    ld_alpha: Optional[float] = None
    average_logps: Optional[bool] = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def build(cls, loss_type: Union[str, Sequence[str]] = "sigmoid", *,
              loss_weights: Optional[Sequence[float]] = None, **options) -> "LossSpec":
        """Validate; `options` are the fields after loss_weights, by name."""
        known = {f.name for f in fields(cls)} - {"loss_types", "loss_weights"}
        for name in options:
            if name not in known:
                raise TypeError(f"unknown loss option {name!r}; options: {', '.join(sorted(known))}")
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
        defaults = {f.name: f.default for f in fields(cls)}
        values = {**{name: defaults[name] for name in known}, **options}
        positive = ("beta", "desirable_weight", "undesirable_weight", "discopop_tau")
        for name in positive:
            values[name] = _number(name, values[name], lambda v: v > 0 and math.isfinite(v), "a number > 0")
        values["label_smoothing"] = _number("label_smoothing", values["label_smoothing"], lambda v: 0.0 <= v < 0.5,
                                            "a number that lies in [0, 0.5)")
        for name in ("simpo_gamma", "f_alpha_divergence_coef"):
            if not isinstance(values[name], (int, float)) or isinstance(values[name], bool):
                raise TypeError(f"{name} must be a number, got {type(values[name]).__name__}")
            values[name] = _number(name, values[name], math.isfinite, "finite")
        if values["f_divergence_type"] not in F_DIVERGENCE_TYPES:
            raise ValueError(f"f_divergence_type must be one of {', '.join(F_DIVERGENCE_TYPES)}, "
                             f"got {values['f_divergence_type']!r}")
        if values["ld_alpha"] is not None:
            values["ld_alpha"] = _number("ld_alpha", values["ld_alpha"], lambda v: 0.0 <= v <= 1.0,
                                         "None or a number that lies in [0, 1]")
        for name in ("use_weighting",):
            if not isinstance(values[name], bool):
                raise TypeError(f"{name} must be True or False, got {values[name]!r}")
        if values["average_logps"] is not None and not isinstance(values["average_logps"], bool):
            raise TypeError(f"average_logps must be None, True or False, got {values['average_logps']!r}")
        _refuse_unread(types, values, defaults)
        coupled = [name for name in types if name in PAIRED and PAIRED[name].couples_pairs]
        if values["use_weighting"] and coupled:
            raise ValueError(f"use_weighting=True (WPO) with loss_type {coupled[0]!r}: it sorts the pairs, which "
                             "would misalign the per-pair weights (TRL refuses it too)")
        return cls(loss_types=types, loss_weights=weights, **values)

    @property
    def needs_reference(self) -> bool:
        return any(name == "kto" or not PAIRED[name].reference_free for name in self.loss_types)

    @property
    def is_paired(self) -> bool:
        return self.loss_types != ("kto",)

    @property
    def couples_pairs(self) -> bool:
        """Whether a pair's gradient depends on the other pairs' log-probs (AOT sorts them)."""
        return any(name in PAIRED and PAIRED[name].couples_pairs for name in self.loss_types)

    def averages(self, loss_type: str) -> bool:
        """Whether `loss_type` reads the log-probs per response token (True) or summed (False)."""
        if loss_type == "kto":
            return bool(self.average_logps)
        row = PAIRED[loss_type]
        if row.fixed_reduction or self.average_logps is None:
            return row.per_token
        return self.average_logps

    def weight_of(self, loss_type: str) -> float:
        return dict(zip(self.loss_types, self.loss_weights)).get(loss_type, 0.0)


def _refuse_unread(types: Tuple[str, ...], values, defaults) -> None:
    """A hyper-parameter set away from its default that none of `types` reads is a mistake."""
    readers = loss_types.reads_of(types)
    if types == ("kto",):
        readers.update(desirable_weight=types, undesirable_weight=types, average_logps=types)
    else:
        readers.update({name: types for name in PAIRED_OPTIONS})
        readers["average_logps"] = tuple(name for name in types if not PAIRED[name].fixed_reduction)
    readers["beta"] = types  # every type's rewards in the metrics are beta times its log-probs
    for name, value in values.items():
        if value != defaults[name] and not readers.get(name):
            every = [row.name for row in PAIRED.values() if name in row.reads]
            if name in ("desirable_weight", "undesirable_weight"):
                every = ["kto"]
            raise ValueError(f"{name}={value!r} is read by none of the loss types {list(types)}"
                             + (f" (it is read by {', '.join(every)})" if every else ""))
