"""Errors in the inputs that are found on the device, raised without stalling it.

Checking targets or log-probs for bad values on the host would stop the CPU until the GPU has
caught up, once per call. Instead each call computes a few integers on the device (how many
targets are out of range, the first such position, ...), copies them without blocking into host
memory (pinned on CUDA, so the copy is asynchronous) and registers them here with a function that
turns them into a message. Two kinds:

- **errors**, a caller's bug (a target outside the vocabulary, a wrong ``num_kept``): raised as
  a ``ValueError`` at the start of any later call of fastpref's op or loss once the copy has
  landed (a CUDA event says so without waiting; on a CPU it has landed when the call returns),
  never a stall; by :func:`raise_pending_errors`, which waits for the copies (the trainer calls
  it where it synchronises anyway, when it logs its metrics); or at once, inside the call, with
  ``check=True``.
- **non-finite values** (NaN or inf log-probs from NaN or inf in the hidden states, the weight or
  the reference): not a bug but a numerical event, such as a float16 overflow that a GradScaler
  skips. They propagate as in PyTorch (to the loss and the gradients) and are raised only where
  the caller asks: with ``check=True``, or by ``raise_pending_errors(non_finite=True)``, which
  raises the first of those seen since the previous :func:`raise_pending_errors`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import sys

import numpy as np
import torch

Describe = Callable[[List[int]], Optional[str]]


@dataclass
class _Pending:
    values: np.ndarray  # host memory the device's integers are copied into
    landed: Optional[torch.cuda.Event]  # None: already on the host
    describe: Optional[Describe]  # the values -> an error message, or None when nothing is wrong
    describe_non_finite: Optional[Describe]  # the values -> a non-finite value's message, or None
    origin: str  # where the call that flagged them was made, outside fastpref


_pending: List[_Pending] = []
# the message of the first non-finite value that landed since the last raise_pending_errors()
_first_non_finite: List[str] = []


def defer(flags: torch.Tensor, describe: Optional[Describe], describe_non_finite: Optional[Describe] = None) -> None:
    """Register the device integers `flags` (1-D int64) to be checked once they reach the host:
    `describe` reads an error off them, `describe_non_finite` a non-finite value (see the module
    docstring); each returns None when there is none."""
    if flags.is_cuda:
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        _pending.append(_Pending(host.numpy(), landed, describe, describe_non_finite, _origin()))
    else:
        _pending.append(_Pending(flags.numpy(), None, describe, describe_non_finite, _origin()))


def _origin() -> str:
    """The innermost frame of the calling stack outside fastpref (and torch, which runs its custom
    ops): the caller's call; inside a compiled graph, which cannot walk the stack, the graph."""
    if torch.compiler.is_compiling():
        return "a torch.compile'd function"
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("fastpref", "torch"):
        frame = frame.f_back
    if frame is None:
        return "an unknown caller"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


def check_now(flags: torch.Tensor, describe: Optional[Describe], describe_non_finite: Optional[Describe] = None
              ) -> None:
    """Read `flags` at once (a synchronisation on a GPU) and raise if they describe an error or a
    non-finite value (check=True asks for both)."""
    values = flags.tolist()
    for read in (describe, describe_non_finite):
        message = None if read is None else read(values)
        if message is not None:
            raise ValueError(message)


def _raise(ready: List[_Pending]) -> None:
    """Raise the first error among `ready`; keep the first non-finite value's message."""
    for pending in ready:
        values = pending.values.tolist()
        later = f" [found after the call that flagged it returned: the call at {pending.origin}]"
        if pending.describe is not None:
            message = pending.describe(values)
            if message is not None:
                raise ValueError(message + later)
        if pending.describe_non_finite is not None and not _first_non_finite:
            message = pending.describe_non_finite(values)
            if message is not None:
                _first_non_finite.append(message + later)


def raise_landed_errors() -> None:
    """Raise the first error among the checks whose values are on the host already; never waits."""
    ready, waiting = [], []
    for pending in _pending:
        (ready if pending.landed is None or pending.landed.query() else waiting).append(pending)
    if ready:
        _pending[:] = waiting
        _raise(ready)


def raise_pending_errors(non_finite: bool = False) -> None:
    """Wait for every pending check and raise the first error among them (a ValueError naming the
    argument and the first bad position). Call it where a synchronisation costs nothing extra: when
    metrics are read, at the end of a step.

    non_finite: also raise for the first NaN or inf log-prob (or reference log-prob, or KTO
    reference point) seen since the previous call; by default they are let through, as PyTorch
    lets them through (a GradScaler skips their step), and forgotten here."""
    ready, _pending[:] = list(_pending), []
    for pending in ready:
        if pending.landed is not None:
            pending.landed.synchronize()
    try:
        _raise(ready)
    finally:
        first_non_finite = _first_non_finite[:]
        _first_non_finite.clear()
    if non_finite and first_non_finite:
        raise ValueError(first_non_finite[0])


def report_any(bad: torch.Tensor, describe: Callable[[int, int], str], check: bool = False, *,
               non_finite: bool = False) -> None:
    """Raise, at once with `check` or later, when any entry of the bool tensor `bad` is set:
    ValueError(describe(how many, the first one's flat index)). `non_finite`: `bad` marks NaN or
    inf values, raised later only when asked for (see the module docstring)."""
    bad = bad.reshape(-1)
    flags = torch.stack([bad.sum(), bad.to(torch.uint8).argmax()])

    def message(values: List[int]) -> Optional[str]:
        count, first = values
        return describe(count, first) if count else None

    if check:
        check_now(flags, message)
    elif non_finite:
        defer(flags, None, message)
    else:
        defer(flags, message)
