"""The documentation stays a user's manual: short README, no developer-machine paths, links that resolve,
and every benchmark record cited and headed by its commit and command."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BENCHMARKS = ROOT / "benchmarks" / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, BENCHMARKS, *DOCS]
# written by hand (docs/configuration.md is generated from the code: tests/test_config_reference.py)
HANDWRITTEN = [README, *(page for page in DOCS if page.name != "configuration.md")]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
FORBIDDEN = re.compile(r"/work/|/tmp/|\bissue \d", re.IGNORECASE)
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens.

    Args:
        heading: the heading's text without the leading ``#``.

    Returns:
        the anchor, e.g. ``"tuning-mkd-compare---tune"`` for ``Tuning: `mkd compare --tune```.
    """
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set:
    """Every heading anchor of a Markdown page (headings inside code blocks do not count)."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(match) for match in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def links(page: Path) -> list:
    """Relative link targets of a page, outside code blocks."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_slug_matches_github_anchors():
    assert slug("Tuning: `mkd compare --tune`") == "tuning-mkd-compare---tune"
    assert slug("The phantom's appearance gap") == "the-phantoms-appearance-gap"
    assert slug("Training cost: FLOPs per step, GFLOP/s, workers") == "training-cost-flops-per-step-gflops-workers"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250: move details into docs/)"


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_no_developer_machine_paths_or_issue_numbers(page):
    found = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert not found, f"{_relative(page)} names a machine path or an issue:\n" + "\n".join(found)


@pytest.mark.parametrize("page", HANDWRITTEN, ids=_relative)
def test_no_dated_lab_entries(page):
    dated = [line.strip() for line in page.read_text(encoding="utf-8").splitlines() if DATE.search(line)]
    assert not dated, f"{_relative(page)} has dated entries (they belong in benchmarks/README.md):\n" + "\n".join(dated)


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    missing = [_relative(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
    assert DOCS, "docs/ has no pages"


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{_relative(page)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("record", sorted(RESULTS.iterdir()), ids=lambda path: path.name)
def test_every_benchmark_record_is_cited_and_has_a_header(record):
    assert f"results/{record.name}" in BENCHMARKS.read_text(encoding="utf-8"), (
        f"{record.name} is not cited from benchmarks/README.md (cite it or git rm it)"
    )
    if record.suffix == ".json":
        data = json.loads(record.read_text(encoding="utf-8"))
        assert next(iter(data)) == "header", f"{record.name}: the first key must be 'header'"
        header = data["header"]
        assert re.fullmatch(r"[0-9a-f]{7,40}", header["commit"]), header["commit"]
        assert header["command"] and header["date"] and header["machine"]
    else:
        head = record.read_text(encoding="utf-8").splitlines()[:8]
        assert any(re.match(r"- commit: [0-9a-f]{7,40}$", line) for line in head), f"{record.name}: no commit"
        assert any(line.startswith("- command: ") and len(line) > 20 for line in head), f"{record.name}: no command"
        assert any(line.startswith("- date: ") for line in head), f"{record.name}: no date"


@pytest.mark.parametrize("figure", sorted((ROOT / "docs").glob("*.png")), ids=lambda path: path.name)
def test_every_figure_in_docs_is_cited(figure):
    cited = any(figure.name in page.read_text(encoding="utf-8") for page in PAGES)
    assert cited, f"docs/{figure.name} is cited nowhere (git rm it)"


@pytest.mark.parametrize("page", PAGES + sorted(RESULTS.glob("*.md")), ids=_relative)
def test_every_table_has_its_separator_row(page):
    # without the `| --- |` row under its header, Markdown renders a table as one paragraph of pipes
    lines = FENCE.sub("", page.read_text(encoding="utf-8")).splitlines()
    for number, line in enumerate(lines):
        starts_table = line.startswith("|") and (number == 0 or not lines[number - 1].startswith("|"))
        if starts_table:
            following = lines[number + 1] if number + 1 < len(lines) else ""
            assert re.fullmatch(r"\|( *:?-{3,}:? *\|)+", following.strip()), (
                f"{_relative(page)}: the table starting '{line[:60]}' has no separator row under its header"
            )
