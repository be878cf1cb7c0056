"""Every ``docs/<name>.md`` and ``docs/<name>.md#<anchor>`` cited anywhere in the tree exists.

Code, scripts, configs and docs cite the repository's own documents (docs/architecture.md, docs/design-decisions.md,
…) by path and heading anchor. The anchor is GitHub's slug of the heading: lower case, punctuation dropped, spaces to
hyphens, ``-1``, ``-2``, … for repeated headings. Markdown links between the docs (``](sampling.md#presets)``) are
checked the same way. Pure Python, no services.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SUFFIXES = (".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".ini")
NAMES = ("Dockerfile",)
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", ".schemathesis", "out",
             "runs", "wandb", ".whl", "node_modules"}
MAX_BYTES = 2_000_000

# docs/<name>.md or docs/<sub>/<name>.md, optionally #<anchor>; not part of a longer path (mydocs/…, x/docs/…).
CITATION = re.compile(r"(?<![\w./-])docs/((?:[\w-]+/)*[\w.-]+\.md)(?:#([\w-]+))?")
# A relative markdown link inside a doc: ](<name>.md), ](<name>.md#<anchor>), ](#<anchor>).
LINK = re.compile(r"\]\((?!https?://)([\w./-]*\.md)?(?:#([\w-]+))?\)")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def slug(text: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in "_- ")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """The heading anchors of a markdown file (headings inside fenced code blocks are not headings)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        match = None if fenced else HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def tree_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = Path(folder) / name
            if (name.endswith(SUFFIXES) or name in NAMES) and path.stat().st_size <= MAX_BYTES:
                files.append(path)
    return sorted(files)


def citations() -> list[tuple[str, Path, str | None]]:
    """(where, cited file, anchor or None) of every citation of a doc in the tree."""
    found = []
    for path in tree_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(ROOT).as_posix()
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{rel}:{line}", DOCS / match.group(1), match.group(2)))
        if path.suffix == ".md":
            for match in LINK.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                target = (path.parent / match.group(1)).resolve() if match.group(1) else path
                found.append((f"{rel}:{line}", target, match.group(2)))
    return found


CITATIONS = citations()


def test_the_tree_cites_its_docs():
    """The scan itself works: the code cites the docs by anchor (if this fails, the pattern broke, not a doc)."""
    assert any(anchor for _, _, anchor in CITATIONS)
    assert (DOCS / "architecture.md").exists() and (DOCS / "design-decisions.md").exists()


def test_slug_follows_github():
    assert slug("Time-Aware Context Drop") == "time-aware-context-drop"
    assert slug("Data lineage (`train.record_samples`)") == "data-lineage-trainrecord_samples"
    assert slug("The demo's VAE") == "the-demos-vae"
    assert slug("Measurements on the toy (tests/toy.py)") == "measurements-on-the-toy-teststoypy"


@pytest.mark.parametrize("where,target,anchor", CITATIONS, ids=[w for w, _, _ in CITATIONS])
def test_cited_doc_and_anchor_exist(where, target, anchor):
    assert target.is_file(), f"{where} cites {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}, " \
                             "which does not exist"
    if anchor is not None:
        known = anchors(target)
        assert anchor in known, (f"{where} cites {target.name}#{anchor}, but {target.name} has no such heading; "
                                 f"its anchors: {', '.join(sorted(known))}")
