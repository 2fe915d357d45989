"""Warnings about other packages' code that a fastpref user can do nothing about."""
from __future__ import annotations

import contextlib
import warnings


@contextlib.contextmanager
def peft_internals_quiet():
    """peft reads transformers' deprecated `is_gradient_checkpointing` while it wraps or loads a
    model: that FutureWarning is about peft's code, not the caller's, and is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
