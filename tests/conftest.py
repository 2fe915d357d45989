"""Test set-up: Triton kernels run under the CPU interpreter when there is no GPU, and every new
output buffer is poisoned with NaN (FASTPREF_POISON).

Both must be set before fastpref's kernels are defined, hence here, before any test module
imports fastpref.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every kernel output starts as NaN, so an unwritten element fails the test that reads it
os.environ.setdefault("FASTPREF_POISON", "1")

import fastpref  # noqa: E402


@pytest.fixture(autouse=True)
def _no_error_left_pending():
    """A test that leaves a deferred input error behind fails (and does not hand it to the next)."""
    yield
    fastpref.raise_pending_errors()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> str:
    """The first 24 rows of the bundled HH-RLHF sample, as a local JSONL file."""
    import json

    from fastpref.train import data as data_module

    rows = data_module.load_rows(None).select(range(24)).to_list()
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
