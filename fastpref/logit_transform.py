"""The transform between an LM head's output and the logits its softmax sees, in TRL's order.

    x = W h + b                                   (the head's raw output)
    y = x * logit_scale                           (Granite, Cohere, Falcon-H1, ...)
    y = softcap * tanh(y / softcap)               (Gemma-2's final_logit_softcapping), when set
    z = y / temperature

Every backend applies it tile by tile to the logits it computes and multiplies the logit gradient
by its slope at the head's output x:

    dz/dx = (logit_scale / temperature) (1 - tanh^2(y / softcap))     under a soft cap
    dz/dx = logit_scale / temperature                                 without one

where 1 - tanh^2(u) is taken as 4e / (1 + e)^2 with e = exp(-2|u|): it keeps its digits where the
cap is flat, which 1 - tanh^2 rounded to 0 would not.

Kernels take two numbers: ``pre`` and ``post`` with z = post * tanh(pre * x) under a soft cap
(pre = logit_scale / softcap, post = softcap / temperature) and z = pre * x without
(pre = logit_scale / temperature).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

Number = Union[int, float]


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LogitTransform:
    """A validated (logit_scale, softcap, temperature); see the module docstring for the math."""

    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    @classmethod
    def build(cls, logit_scale: Number = 1.0, softcap: Optional[Number] = None,
              temperature: Number = 1.0) -> "LogitTransform":
        """Raise TypeError/ValueError naming the argument for a value the transform cannot take."""
        logit_scale = _finite_number("logit_scale", logit_scale)
        if softcap is not None:
            softcap = _finite_number("softcap", softcap)
            if softcap <= 0:
                raise ValueError(f"softcap must be > 0 (or None for no soft cap), got {softcap!r}")
        temperature = _finite_number("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        return cls(logit_scale, softcap, temperature)

    @property
    def is_identity(self) -> bool:
        return self.softcap is None and self.logit_scale == 1.0 and self.temperature == 1.0

    @property
    def pre(self) -> float:
        """The factor applied to x first: inside the tanh under a soft cap, the whole map without."""
        if self.softcap is None:
            return self.logit_scale / self.temperature
        return self.logit_scale / self.softcap

    @property
    def post(self) -> float:
        """softcap / temperature, the tanh's output scale (1 without a soft cap, unused there)."""
        return 1.0 if self.softcap is None else self.softcap / self.temperature

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """z from x, in place."""
        if self.softcap is None:
            return x if self.pre == 1.0 else x.mul_(self.pre)
        return x.mul_(self.pre).tanh_().mul_(self.post)

    def slope(self, x: torch.Tensor) -> Union[torch.Tensor, float]:
        """dz/dx at the head's outputs x: a tensor like x under a soft cap, a number without one."""
        if self.softcap is None:
            return self.pre
        e = (x * self.pre).abs_().mul_(-2.0).exp_()
        return e.div_((1.0 + e).square_()).mul_(4.0 * self.pre * self.post)
