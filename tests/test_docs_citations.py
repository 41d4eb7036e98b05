"""The repository stands on its own: every citation in a ``.py`` or ``.md`` file names a document
of ``docs/`` that exists and a section heading that exists in it, and nothing cites a file
outside the repository, an issue number or a section number of the paper (the citation format:
docs/architecture.md, "Citing these documents")."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SKIPPED = {"benchmarks/results", "tests/assets"}
"""Folders not scanned (besides hidden ones, ``__pycache__`` and ``*.egg-info``): generated
reports and third-party assets."""

CITATION = re.compile(r'docs/([\w.-]+?)\.md(?:,[\s#]*"([^"]+)")?')
"""``docs/<name>.md`` and, when a section is named, ``, "<heading>"`` after it."""
MD_LINK = re.compile(r"\]\(([^()\s#]*)(?:#([^()\s]+))?\)")
"""Markdown link targets ``](path#anchor)``."""
FORBIDDEN = {
    "an issue number": re.compile(r"\b[Ii]ssue[\s#-]*\d"),
    "a document outside the repository": re.compile(
        r"shared/docs|paper[-_]notes|\.\./shared/[^\s`'\")]*\.md|shared/data/(?:README|SOURCES)"),
    "a section number of the paper": re.compile(r"\bpaper\s*§\s*\d"),
}


def _scanned(suffix: str) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(REPO):
        rel = Path(root).relative_to(REPO).as_posix()
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not d.endswith(".egg-info")
                   and (f"{rel}/{d}" if rel != "." else d) not in SKIPPED]
        out += [Path(root) / f for f in files if f.endswith(suffix)]
    return sorted(out)


FILES = [p for p in _scanned(".py") + _scanned(".md") if p != Path(__file__).resolve()]
"""Every scanned file but this one, whose patterns and examples would match themselves."""


def _text(path: Path) -> str:
    """The file with comment lines joined, so a citation wrapped over ``#`` lines reads whole."""
    text = path.read_text(encoding="utf-8")
    return re.sub(r"\n[ \t]*#[ \t]*", " ", text) if path.suffix == ".py" else text


def _headings(doc: Path) -> list[str]:
    """Markdown headings of ``doc`` (outside code fences), without the ``#`` marks."""
    out, fenced = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            out.append(m.group(1))
    return out


def _sections(doc: Path) -> set[str]:
    """What a citation may name: a heading, or ``Decision N`` for a ``Decision N: ...`` heading."""
    heads = _headings(doc)
    return set(heads) | {h.split(":", 1)[0] for h in heads if re.match(r"Decision \d+:", h)}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_scan_sees_the_code_and_the_docs():
    names = {_rel(p) for p in FILES}
    assert {"docs/method.md", "docs/architecture.md", "safety_decoding/masks.py", "README.md"} <= names
    assert not any(n.startswith((".venv/", "benchmarks/results/", "tests/assets/")) for n in names)
    assert "tests/test_docs_citations.py" not in names


def test_method_has_the_sections_the_code_relies_on():
    sections = _sections(DOCS / "method.md")
    for name in ("The [CLS] token and the head", "Strategic attention mask", "Training objective",
                 "Strategic decoding: schedules", "Actions: refuse, reweight, monitor",
                 "Probe windows and tau", "Data: what may train and what only evaluates",
                 "Evaluation", "Decision 1"):
        assert name in sections


def test_decisions_are_numbered_once_and_in_order():
    numbers = [int(m.group(1)) for h in _headings(DOCS / "method.md")
               if (m := re.match(r"Decision (\d+):", h))]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_cited_docs_and_sections_exist(path):
    problems = []
    for m in CITATION.finditer(_text(path)):
        doc = DOCS / f"{m.group(1)}.md"
        if not doc.is_file():
            problems.append(f"docs/{m.group(1)}.md does not exist")
        elif m.group(2) is not None:
            section = " ".join(m.group(2).split())
            if section not in _sections(doc):
                problems.append(f'docs/{m.group(1)}.md has no section "{section}"')
    assert not problems, f"{_rel(path)}: " + "; ".join(problems)


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_docs_are_cited_by_their_path(path):
    """A document named alone could be any file: the citation says ``docs/<name>.md``. (A
    quoted name is a path being built, a ``](name.md`` a link relative to the document.)"""
    names = "|".join(re.escape(p.stem) for p in DOCS.glob("*.md"))
    bare = re.compile(rf"(?<![\w/.\"'-])(?<!\]\()(?:{names})\.md\b")
    hits = bare.findall(_text(path))
    assert not hits, f"{_rel(path)} cites {hits} without the docs/ folder"


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_nothing_outside_the_repository_is_cited(path):
    text = _text(path)
    found = [f"{what}: {m.group(0)!r}" for what, rx in FORBIDDEN.items() for m in rx.finditer(text)]
    assert not found, f"{_rel(path)} cites " + "; ".join(found)


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".md"], ids=_rel)
def test_markdown_links_between_documents_resolve(path):
    problems = []
    for m in MD_LINK.finditer(path.read_text(encoding="utf-8")):
        target, anchor = m.group(1), m.group(2)
        if "://" in target or target.startswith("mailto:") or not (target.endswith(".md") or anchor):
            continue
        doc = (path.parent / target).resolve() if target else path
        if not doc.is_file():
            problems.append(f"{target} does not exist")
        elif anchor and anchor not in {_slug(h) for h in _headings(doc)}:
            problems.append(f"{target or _rel(path)} has no heading for #{anchor}")
    assert not problems, f"{_rel(path)}: " + "; ".join(problems)


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The patterns are live: each forbidden form and a wrong section is caught."""
    bad = {"an issue number": "see issue 5", "a document outside the repository":
           "../shared/docs/method.md", "a section number of the paper": "(paper §3.3)"}
    for what, text in bad.items():
        assert FORBIDDEN[what].search(text), what
    m = CITATION.search('docs/method.md, "No such section"')
    assert m.group(2) not in _sections(DOCS / "method.md")
    assert CITATION.search('docs/method.md,\n    "Decision 1"').group(2).split() == ["Decision", "1"]
    assert "decision-7-a-response-trip-cuts-back-to-s_t" in {_slug(h) for h in _headings(DOCS / "method.md")}
