"""The README's front page holds: its length, its links, and its TRL snippet runs as written."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _text():
    return README.read_text()


def test_the_front_page_is_short_and_its_links_lead_somewhere():
    text = _text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (README.parent / target).exists(), target


@pytest.mark.filterwarnings("ignore::FutureWarning")  # TRL's own calls into transformers
def test_the_trl_snippet_runs_as_written_on_a_cpu(tmp_path, monkeypatch):
    section = _text().split("## TRL drop-in")[1]
    snippet = section.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    history = [entry for entry in namespace["trainer"].state.log_history if "loss" in entry]
    assert [entry["step"] for entry in history] == [2, 4]
    assert all(entry["loss"] > 0 for entry in history)
    assert (tmp_path / "trl-run").is_dir()
