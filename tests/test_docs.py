"""The documentation holds together: every relative link in README.md, CHANGELOG.md and
docs/*.md leads to a file that exists (and an `#anchor` into a markdown file to one of its
headings), and the README stays short.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target), with an optional "title".
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans removed."""
    lines: list[str] = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        lines.append("" if fenced else line)
    return lines


def link_targets(text: str) -> list[str]:
    """Every link target written in the prose (not in code)."""
    targets: list[str] = []
    for line in prose_lines(text):
        targets += REFERENCE_LINK.findall(line)
        targets += INLINE_LINK.findall(CODE_SPAN.sub("", line))
    return targets


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading, simply: lowercase, punctuation other than '-' and
    '_' dropped, each space a '-'."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a markdown file's headings; a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match is None:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(doc: Path) -> list[str]:
    """The relative links in `doc` that lead nowhere, each with the reason."""
    broken: list[str] = []
    for target in link_targets(doc.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue  # http:, https:, mailto: ...: not ours to check
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / unquote(path_part)).resolve() if path_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file {os.path.relpath(linked, ROOT)}")
        elif anchor and linked.suffix == ".md" and unquote(anchor) not in anchors(linked):
            broken.append(f"{target}: no heading in {linked.name} has the anchor #{anchor}")
    return broken


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert doc.is_file(), f"{doc} is missing"
    broken = broken_links(doc)
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_the_check_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# A Title, with `code`\n\n## Twice\n\n## Twice\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Here\n"
        "[ok](other.md#a-title-with-code) [ok](other.md#twice-1) [ok](#here)\n"
        "[web](https://example.com/x) `[in code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[missing](nowhere.md) [bad anchor](other.md#nope) ![image](gone.png)\n"
    )
    assert [line.split(":")[0] for line in broken_links(doc)] == [
        "nowhere.md",
        "other.md#nope",
        "gone.png",
    ]
