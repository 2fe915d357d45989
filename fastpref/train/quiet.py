"""What other packages print that a fastpref user can do nothing about, or needs not see."""
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


@contextlib.contextmanager
def transformers_progress_bars_off():
    """transformers' own progress bars off (save_pretrained's "Writing model shards"): the trainer
    says what it saved. Its warnings and errors, which go through logging, still show."""
    from transformers.utils import logging as transformers_logging

    were_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_on:
            transformers_logging.enable_progress_bar()
