"""The documentation holds: every link and anchor leads somewhere, every page is in the index, the
example lines of the data formats load as the formats they are given as, and the table of loss
types is the table of fastpref.loss_types."""
import re
from pathlib import Path

import pytest

from fastpref.train.data import load_rows, tokenize_pairs, tokenize_unpaired
from fastpref.train.default_assets import default_tokenizer

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # no headings in code
    return {github_anchor(heading) for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_and_anchor_leads_somewhere(page):
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (page.parent / target) if target else page
        assert path.exists(), f"{page.name}: {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{page.name}: {target}#{anchor}"


def test_every_page_is_in_the_index():
    index = (DOCS / "README.md").read_text()
    missing = [page.name for page in DOCS.glob("*.md") if page.name != "README.md" and f"]({page.name})" not in index]
    assert not missing


def test_the_data_format_examples_load_as_their_formats(tmp_path):
    text = (DOCS / "trainer.md").read_text()
    lines = re.search(r"^```json\n(.*?)^```", text, flags=re.M | re.S).group(1).splitlines()
    tokenizer = default_tokenizer()
    formats = []
    for number, line in enumerate(lines):
        path = tmp_path / f"{number}.jsonl"
        path.write_text(line + "\n")
        rows = load_rows(path)
        tokenize = tokenize_unpaired if "label" in rows.column_names else tokenize_pairs
        examples, report = tokenize(rows, tokenizer)
        assert len(examples) == 1 and report.rows_skipped == 0, report.summary()
        formats.append((report.format, tokenize is tokenize_unpaired))
    assert formats == [("explicit", False), ("implicit", False), ("conversational", False), ("explicit", True)]


def test_the_loss_table_is_the_docstrings_of_fastpref_loss_types():
    """docs/losses.md lists every row of the table, each with its function's docstring and what it reads."""
    from fastpref import loss_types

    text = (ROOT / "docs" / "losses.md").read_text()
    for name, row in loss_types.PAIRED.items():
        reads = ", ".join(f"`{hyper}`" for hyper in row.reads) or "-"
        line = (f"| `{name}` | {row.trainer} | {' '.join(row.loss.__doc__.split())} | {reads} | "
                f"{'none' if row.reference_free else 'yes'} |")
        assert line in text, line
    listed = [name for name in re.findall(r"^\| `(\w+)` \|", text, flags=re.M) if name != "loss_type"]
    assert listed == list(loss_types.ALL)
