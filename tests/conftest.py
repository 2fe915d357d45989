"""Test set-up: Triton kernels run under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before fastpref's kernels are defined, hence here, before any test
module imports fastpref.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastpref  # noqa: E402


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every kernel output starts as NaN, so an unwritten element fails the test that reads it."""
    with fastpref.poison_outputs():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
