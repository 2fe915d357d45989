"""How the trainer words the counts it prints."""
from __future__ import annotations

from typing import Optional


def count_of(number: float, noun: str, *, plural: Optional[str] = None, number_format: str = "") -> str:
    """`number` and `noun`, the noun plural unless the number is one: "1 pair", "0 pairs", "1.5 epochs".
    `plural`: for a noun that does not take an s; `number_format`: how to write the number (e.g. ".3g")."""
    return f"{number:{number_format}} {noun if number == 1 else plural or noun + 's'}"
