"""The fast tier, ``pytest -m "not slow"``: what of a test's grid of parameters it keeps.

A test marked ``slow`` runs only in the whole suite. A grid keeps its first value of a parameter
in the fast tier and leaves the rest to the whole suite, so that every code path still runs in
the fast tier at one value (one dtype, one shape) and in every combination in the whole suite.
"""
import pytest


def first_fast(values):
    """`values` as pytest parameters, every one but the first marked slow."""
    return [value if index == 0 else pytest.param(value, marks=pytest.mark.slow)
            for index, value in enumerate(values)]
