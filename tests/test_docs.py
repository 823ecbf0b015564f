"""The documents' relative links resolve: every ``[text](path#anchor)`` in README.md, CHANGELOG.md,
docs/**/*.md and benchmarks/README.md names a file or folder of the repository, and its anchor a
heading of the target as GitHub renders it (github-slugger: lower case, everything but letters,
marks, numbers, ``_``, ``-`` and spaces dropped, spaces become ``-``, repeats get ``-1``, ``-2``).
External links (``https:``, ``mailto:``) are not fetched."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or ![alt](target); the target may sit in <...>, and may carry a "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
                         r"\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
                         r"(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents(root: Path = ROOT) -> list[Path]:
    """The documents whose links are checked."""
    found = [root / "README.md", root / "CHANGELOG.md", root / "benchmarks" / "README.md",
             *sorted((root / "docs").rglob("*.md"))]
    return [path for path in found if path.is_file()]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] \
                and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading (before de-duplication)."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    kept = [ch for ch in text.strip().lower()
            if ch in " -_" or unicodedata.category(ch)[0] in "LMN"
            or unicodedata.category(ch) == "Pc"]
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a Markdown file: its headings' slugs (repeats numbered) and HTML anchors."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(HTML_ANCHOR.findall(line))
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in the prose of a Markdown file."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = CODE_SPAN.sub("", line)
        for match in INLINE_LINK.finditer(line):
            out.append((number, match.group(1).strip("<>")))
        match = REFERENCE_DEF.match(line)
        if match:
            out.append((number, match.group(1).strip("<>")))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """What is wrong with the relative links of one document: a missing file or folder, a path
    outside the repository, an anchor no heading of the target has."""
    problems = []
    for number, target in links(path):
        if not target or EXTERNAL.match(target):
            continue
        where = f"{path.relative_to(root)}:{number}: ({target})"
        file_part, _, anchor = target.partition("#")
        file_part = file_part.split("?", 1)[0]
        resolved = (path.parent / file_part).resolve() if file_part else path
        if file_part.startswith("/") or not resolved.is_relative_to(root):
            problems.append(f"{where} leaves the repository")
            continue
        if not resolved.exists():
            problems.append(f"{where}: no file or folder {resolved.relative_to(root)}")
            continue
        if not anchor:
            continue
        page = resolved / "README.md" if resolved.is_dir() else resolved
        if page.suffix.lower() != ".md" or not page.is_file():
            problems.append(f"{where}: an anchor into {page.relative_to(root)}, "
                            "which is no Markdown file")
        elif anchor not in anchors(page):
            problems.append(f"{where}: {page.relative_to(root)} has no heading "
                            f"with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("path", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    problems = broken_links(path)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_documents_are_there():
    names = {str(p.relative_to(ROOT)) for p in documents()}
    assert {"README.md", "CHANGELOG.md", "docs/README.md", "docs/reproducing.md",
            "docs/formats.md"} <= names


def test_reproducing_md_carries_the_committed_table():
    """docs/reproducing.md holds docs/table1/table.md between its markers, as `make
    table1-report` copies it there."""
    text = (ROOT / "docs" / "reproducing.md").read_text(encoding="utf-8")
    match = re.search(r"(?s)<!-- docs/table1/table.md begins.*?-->\n"
                      r"(.*?)<!-- docs/table1/table.md ends -->", text)
    assert match, "docs/reproducing.md lost its table markers"
    assert match.group(1) == (ROOT / "docs" / "table1" / "table.md").read_text(encoding="utf-8"), \
        "docs/reproducing.md's copy of docs/table1/table.md is stale: run make table1-report"


def test_slugs_are_githubs():
    assert slug("FPD: converged at 100 epochs, 2–3 points below the paper") == \
        "fpd-converged-at-100-epochs-23-points-below-the-paper"
    assert slug("Random subspaces: `rbd_cuda.nn.RandomSubspace`") == \
        "random-subspaces-rbd_cudannrandomsubspace"
    assert slug("NES: the population's losses averaged across the ranks") == \
        "nes-the-populations-losses-averaged-across-the-ranks"
    assert slug("Sharded parameters: FSDP2, tensor parallelism, ZeRO") == \
        "sharded-parameters-fsdp2-tensor-parallelism-zero"
    assert slug("The v2 CUDA kernels (`RBD_CUDA_KERNELS=v2`): compiled") == \
        "the-v2-cuda-kernels-rbd_cuda_kernelsv2-compiled"
    assert slug("θ = θ₀ + P c, [a link](x.md)") == "θ--θ₀--p-c-a-link"


def test_a_broken_link_or_anchor_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A\n\n## Same\n\n## Same\n\n```\n[in code](missing.md)\n```\n")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[ok](docs/a.md) [ok](docs/a.md#same-1) [ok](#top) [ok](docs)\n"
        "[ok](https://example.org/x.md#y) [gone](docs/b.md) [bad anchor](docs/a.md#same-2)\n"
        "[bad here](#bottom) `[code](nope.md)`\n"
        "[out](../elsewhere.md) ![img](docs/a.png)\n\n[ref]: docs/c.md#x\n")
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert len(problems) == 6, problems
    for text in ("no file or folder docs/b.md", "no heading with the anchor #same-2",
                 "README.md has no heading with the anchor #bottom",
                 "(../elsewhere.md) leaves the repository", "no file or folder docs/a.png",
                 "no file or folder docs/c.md"):
        assert any(text in p for p in problems), (text, problems)
    assert broken_links(tmp_path / "docs" / "a.md", tmp_path) == []
