"""Verifiable rewards for ``fastpref train --rounds --judge fastpref.rewards:NAME``.

Each follows TRL's reward-function convention, ``scores = fn(prompts, completions)``: one float per
(prompt, completion), higher is better, computed from the text alone, so that anyone can check it.
"""
from __future__ import annotations

from typing import List, Sequence

# the answer length `brevity` rewards, in words
TARGET_WORDS = 12


def brevity(prompts: Sequence[str], completions: Sequence[str]) -> List[float]:
    """Minus the distance, in words, between the completion and a TARGET_WORDS-word answer: 0 at
    exactly TARGET_WORDS words, -1 per word more or fewer. Shorter answers meet it, and so do fewer,
    longer words in an answer of the same tokens (what SmolLM2 learns first: docs/iterative.md)."""
    return [-float(abs(len(completion.split()) - TARGET_WORDS)) for completion in completions]
