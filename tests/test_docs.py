"""The documentation agrees with the code: the README's settings table, the column reference, the endpoint labels,
and every link.

Modelled on datasette's tests/test_docs.py: the code is the one source, and these tests fail when the text lags.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy_app import settings
from proxy_app.calls import COLUMNS
from proxy_app.ops import labels

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SETTINGS_START, SETTINGS_END = "<!-- settings:start -->", "<!-- settings:end -->"
LINK = re.compile(r"\]\(([^)\s]+)\)")  # a Markdown link's target


def between(text: str, start: str, end: str) -> str:
    """The text between two markers, each of which must appear exactly once, in that order."""
    assert text.count(start) == 1 and text.count(end) == 1, f"{start} and {end} must each appear once"
    return text.split(start, 1)[1].split(end, 1)[0]


def test_docs_readme_settings_block_is_the_generated_table():
    block = between(README.read_text(encoding="utf-8"), SETTINGS_START, SETTINGS_END)
    expected = settings.settings_table()
    assert block.strip("\n") == expected.strip("\n"), (
        "README.md's settings table differs from settings.SETTINGS; replace the lines between the settings markers "
        "with the output of "
        f"`python -c 'from proxy_app.settings import settings_table; print(settings_table(), end=\"\")'`:\n{expected}"
    )


def test_docs_settings_table_lists_every_setting_with_its_default():
    rows = [line for line in settings.settings_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [settings.PREFIX + setting.name for setting in settings.SETTINGS]
    assert "| `OLLAMA_PROXY_PORT` | `11434` |" in settings.settings_table()
    assert "| `OLLAMA_PROXY_ADMIN_TOKEN` | (empty) |" in settings.settings_table()


def test_docs_columns_reference_lists_every_column_in_order():
    names = []
    for line in (ROOT / "docs" / "columns.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([a-z_]+)`", line.split("|")[1])
    assert tuple(names) == COLUMNS


def test_docs_metrics_page_lists_every_endpoint_label():
    block = between((ROOT / "docs" / "metrics.md").read_text(encoding="utf-8"), "<!-- endpoints:start -->",
                    "<!-- endpoints:end -->")  # fmt: skip
    documented = re.findall(r"`([^`]+)`", block)
    labels_in_code = {*labels.ENDPOINTS, *(label for _prefix, label in labels.FOLDED_PREFIXES), labels.OTHER}
    assert len(documented) == len(set(documented))
    assert set(documented) == labels_in_code


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda path: path.relative_to(ROOT).as_posix())
def test_docs_relative_links_point_at_files_and_anchors_that_exist(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists() or (anchor and anchor not in anchors_of(linked)):
            broken.append(target)
    assert broken == []


def anchors_of(page: Path) -> set[str]:
    """The anchors a Markdown page offers: GitHub's slug of each heading, and explicit ``id`` attributes."""
    text = page.read_text(encoding="utf-8")
    slugs = {_slug(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}
    return slugs | set(re.findall(r'id="([^"]+)"', text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
