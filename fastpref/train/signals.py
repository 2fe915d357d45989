"""Stop requests from outside: SIGTERM and SIGUSR1, turned into a checkpoint at the next step.

Cluster schedulers end a job with SIGTERM (SLURM's preemption and time limit, Kubernetes,
``timeout``), and SLURM can send SIGUSR1 ahead of the deadline (``--signal=USR1@120``). Killing the
process there would lose the steps since the last checkpoint and leave the files of the run
half-written, so while training runs these signals only note the request; the loop stops at the
next step boundary (the reference pass after its current batch), saves, and exits with
128 + the signal's number, as the signal itself would have.

Under several processes each one may receive the signal at a different moment (or only some of
them): at every boundary the processes agree, by an all-reduce, whether any was asked to stop, so
that all save together (a sharded checkpoint needs every process).
"""
from __future__ import annotations

import signal
import threading
from typing import Dict, Optional

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopRequests:
    """While entered (in the main thread, where Python delivers signals), SIGTERM and SIGUSR1 set
    ``received`` (the signal's number) instead of ending the process; leaving restores the
    previous handlers."""

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def _note(self, number, frame) -> None:
        self.received = number

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                number = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
                if number is not None:
                    self._previous[number] = signal.signal(number, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def signal_name(number: int) -> str:
    return signal.Signals(number).name


class TrainingInterrupted(Exception):
    """Training stopped early on request (Ctrl-C, SIGTERM, SIGUSR1); the message says what was saved
    and how to resume. ``exit_code``: what the process should exit with (128 + the signal)."""

    def __init__(self, message: str, signal_number: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signal_number)
