"""The fast tier, ``pytest -m "not slow"``: what of a test's grid of parameters it keeps.

A test marked ``slow`` runs only in the whole suite. A grid keeps a few of its values in the fast
tier and leaves the rest to the whole suite, so that every code path still runs in the fast tier
at one value (one dtype, one shape, one option) and in every combination in the whole suite.
"""
import pytest

PARAMETER_SET = type(pytest.param(None))


def slow(value):
    """`value` (a plain value or a pytest.param) as a pytest parameter marked slow."""
    if isinstance(value, PARAMETER_SET):
        return pytest.param(*value.values, id=value.id, marks=[*value.marks, pytest.mark.slow])
    return pytest.param(value, marks=pytest.mark.slow)


def first_fast(values):
    """`values` as pytest parameters, every one but the first marked slow."""
    return [value if index == 0 else slow(value) for index, value in enumerate(values)]


def fast_only(params, fast_ids):
    """`params` (pytest.param with ids), every one whose id is not in `fast_ids` marked slow."""
    unknown = set(fast_ids) - {param.id for param in params}
    assert not unknown, f"no parameters with the ids {sorted(unknown)}"
    return [param if param.id in fast_ids else slow(param) for param in params]
