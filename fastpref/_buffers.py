"""Allocation of kernel outputs.

Every buffer a backend hands back is allocated here. Normally that is ``torch.empty`` (no fill
cost); with poisoning switched on (``FASTPREF_POISON=1`` in the environment, as the tests set it) new buffers
are filled with NaN, so an element a kernel forgot to write shows up in any test instead of
silently carrying whatever the allocator left there.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

_poison = os.environ.get("FASTPREF_POISON", "0") not in ("", "0")


def new_output(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor, or a NaN-filled (for integers: -1-filled) one when poisoning."""
    if not _poison:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(tuple(shape), fill, dtype=dtype, device=device)
