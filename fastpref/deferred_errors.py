"""Errors in the inputs that are found on the device, raised without stalling it.

Checking targets or log-probs for bad values on the host would stop the CPU until the GPU has
caught up, once per call. Instead each call computes a few integers on the device (how many
targets are out of range, the first such position, ...), copies them without blocking into host
memory (pinned on CUDA, so the copy is asynchronous) and registers them here with a function that
turns them into a message. They are raised as a ``ValueError``:

- at the start of any later call of fastpref's op or loss, once the copy has landed (a CUDA event
  says so without waiting; on a CPU it has landed when the call returns): never a stall;
- by :func:`raise_pending_errors`, which waits for the copies: the trainer calls it where it
  synchronises anyway (when it logs its metrics), and so can any caller;
- at once, inside the call, when the caller passes ``check=True``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch

Describe = Callable[[List[int]], Optional[str]]


@dataclass
class _Pending:
    values: np.ndarray  # host memory the device's integers are copied into
    landed: Optional[torch.cuda.Event]  # None: already on the host
    describe: Describe  # the values -> an error message, or None when nothing is wrong


_pending: List[_Pending] = []


def defer(flags: torch.Tensor, describe: Describe) -> None:
    """Register the device integers `flags` (1-D int64) to be checked once they reach the host."""
    if flags.is_cuda:
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        _pending.append(_Pending(host.numpy(), landed, describe))
    else:
        _pending.append(_Pending(flags.numpy(), None, describe))


def check_now(flags: torch.Tensor, describe: Describe) -> None:
    """Read `flags` at once (a synchronisation on a GPU) and raise if they describe an error."""
    message = describe(flags.tolist())
    if message is not None:
        raise ValueError(message)


def _raise(ready: List[_Pending]) -> None:
    for pending in ready:
        message = pending.describe(pending.values.tolist())
        if message is not None:
            raise ValueError(message)


def raise_landed_errors() -> None:
    """Raise the first error among the checks whose values are on the host already; never waits."""
    ready, waiting = [], []
    for pending in _pending:
        (ready if pending.landed is None or pending.landed.query() else waiting).append(pending)
    if ready:
        _pending[:] = waiting
        _raise(ready)


def raise_pending_errors() -> None:
    """Wait for every pending check and raise the first error among them (a ValueError naming the
    argument and the first bad position). Call it where a synchronisation costs nothing extra: when
    metrics are read, at the end of a step."""
    ready, _pending[:] = list(_pending), []
    for pending in ready:
        if pending.landed is not None:
            pending.landed.synchronize()
    _raise(ready)


def report_any(bad: torch.Tensor, describe: Callable[[int, int], str], check: bool = False) -> None:
    """Raise, at once with `check` or later, when any entry of the bool tensor `bad` is set:
    ValueError(describe(how many, the first one's flat index))."""
    bad = bad.reshape(-1)
    flags = torch.stack([bad.sum(), bad.to(torch.uint8).argmax()])

    def message(values: List[int]) -> Optional[str]:
        count, first = values
        return describe(count, first) if count else None

    (check_now if check else defer)(flags, message)
