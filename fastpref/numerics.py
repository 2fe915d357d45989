"""Scalar functions shared by the losses and the backends, accurate at both ends of their range."""
from __future__ import annotations

import math

import torch


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
