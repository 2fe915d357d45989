"""The README's front page holds: its length, and every Python snippet runs as written, as a script
saved in the repository root runs it (the root first on sys.path). Its links: test_docs.py."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _text():
    return README.read_text()


def _python_snippets():
    """(heading of its section, code) of every ```python block of the README."""
    text = _text()
    return [(re.findall(r"^## (.+)$", text[:block.start()], flags=re.M)[-1], block.group(1))
            for block in re.finditer(r"^```python\n(.*?)^```", text, flags=re.M | re.S)]


def test_the_front_page_is_short():
    assert len(_text().splitlines()) <= 250


def _check_the_trl_run(folder: Path):
    (state,) = folder.glob("fastpref-run-trl/checkpoint-*/trainer_state.json")
    history = [entry for entry in json.loads(state.read_text())["log_history"] if "loss" in entry]
    assert [entry["step"] for entry in history] == [2, 4]
    assert all(entry["loss"] > 0 for entry in history)


# What a snippet leaves behind, beyond running without an error.
CHECKS = {"TRL drop-in: `FastprefDPOTrainer`": _check_the_trl_run}


# Left to the whole suite: a whole TRL run (train() with its checkpoint), and the op's snippet,
# which the losses' snippet runs too (each snippet is a process of its own, seconds to start).
SLOW_SNIPPETS = {"TRL drop-in: `FastprefDPOTrainer`", "The op: `linear_logprobs`"}


@pytest.mark.smoke
@pytest.mark.parametrize("heading, code", [
    pytest.param(heading, code, id=heading, marks=[pytest.mark.slow] if heading in SLOW_SNIPPETS else [])
    for heading, code in _python_snippets()])
def test_every_python_snippet_runs_as_written(heading, code, tmp_path):
    # PYTHONPATH puts the root right after the script's own folder, ahead of site-packages: what a
    # script saved in the root sees (it also writes to tmp_path, not into the checkout).
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    if heading in CHECKS:
        CHECKS[heading](tmp_path)


def test_every_python_snippet_is_found():
    assert {heading for heading, _ in _python_snippets()} >= {
        "The op: `linear_logprobs`", "Preference losses", "TRL drop-in: `FastprefDPOTrainer`"}
