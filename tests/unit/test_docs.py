"""Every documentation reference in the repository resolves.

Scans the files git knows about (tracked, plus untracked ones that are not ignored), text files only:

- no file names a document that is not in the repository (the working notes the code was first
  written against lived outside it);
- every ``docs/<page>.md`` or ``docs/<page>.md#<anchor>`` reference, anywhere (code, configs,
  tests, READMEs, docs), names an existing page, and the anchor exists in it: an ``<a id="...">``
  or a heading whose GitHub slug is the anchor;
- every relative Markdown link ``[text](path)`` / ``[text](path#anchor)`` in a ``.md`` file resolves
  to an existing file (and anchor);
- every test named as ``tests/<path>.py::test_<name>`` (the docs say which test checks what) exists.

A failure lists every dangling reference as ``file:line: reference``.
"""

from __future__ import annotations

import os
import re
import subprocess
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
THIS_FILE = os.path.relpath(os.path.abspath(__file__), ROOT).replace(os.sep, "/")

# Names of documents that are not part of the repository; a reference to them cannot be followed.
FOREIGN_DOCUMENTS = ("../shared", "PPO-NOTES", "DEMO.md", "DESIGN.md", "STYLE.md", "WORKLOAD.md", "RESULTS.md")

# docs/<page>.md with an optional #anchor; not when it is the tail of a longer path (other/docs/x.md).
DOCS_REFERENCE = re.compile(r"(?<![\w./-])docs/((?:[\w.-]+/)*[\w-][\w.-]*\.md)(?:#([\w-]+))?")
# [text](target) or ![alt](target), with an optional "title".
MARKDOWN_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")
HTML_ANCHOR = re.compile(r"<[A-Za-z][^>]*?\s(?:id|name)\s*=\s*[\"']([^\"']+)[\"']")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# tests/unit/test_x.py::test_name, as pytest writes a test's node id.
TEST_REFERENCE = re.compile(r"(?<![\w./-])(tests/(?:[\w-]+/)*test_\w+\.py)::(test_\w+)")


# ----------------------------------------------------------------------------- reading the tree

def repository_files(root: str) -> list[str]:
    """Tracked files plus untracked files git does not ignore, relative to ``root``, that exist."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the documentation check needs `git ls-files`")
    names = sorted({name for name in listed.decode("utf-8", "surrogateescape").split("\0") if name})
    return [name for name in names if os.path.isfile(os.path.join(root, name))
            and not os.path.islink(os.path.join(root, name))]


def read_text(root: str, name: str) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    with open(os.path.join(root, name), "rb") as handle:
        data = handle.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_texts(root: str, names: list[str]) -> dict[str, str]:
    texts = {}
    for name in names:
        text = read_text(root, name)
        if text is not None:
            texts[name] = text
    return texts


# ----------------------------------------------------------------------------- markdown anchors

def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower-cased, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
        elif fence is not None and line.strip().startswith(fence):
            fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def markdown_anchors(text: str) -> set[str]:
    """Every anchor a Markdown page defines: explicit HTML ids and heading slugs (duplicates get -1, -2...)."""
    anchors = set(HTML_ANCHOR.findall(text))
    seen: dict[str, int] = {}
    for _, line in prose_lines(text):
        heading = HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


class AnchorIndex:
    """Anchors of the Markdown files under ``root``, read once each."""

    def __init__(self, root: str, texts: dict[str, str]):
        self.root, self.texts, self.cache = root, texts, {}

    def exists(self, name: str) -> bool:
        return name in self.texts or os.path.exists(os.path.join(self.root, name))

    def text(self, name: str) -> str | None:
        if name not in self.texts and os.path.isfile(os.path.join(self.root, name)):
            return read_text(self.root, name)
        return self.texts.get(name)

    def anchors(self, name: str) -> set[str]:
        if name not in self.cache:
            self.cache[name] = markdown_anchors(self.text(name) or "")
        return self.cache[name]


# ----------------------------------------------------------------------------- the three checks

def foreign_documents(texts: dict[str, str], skip: str = THIS_FILE) -> list[str]:
    """``file:line: name`` for every mention of a document that is not in the repository."""
    problems = []
    for name, text in texts.items():
        if name == skip or not any(foreign in text for foreign in FOREIGN_DOCUMENTS):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            problems += [f"{name}:{number}: {foreign}" for foreign in FOREIGN_DOCUMENTS if foreign in line]
    return problems


def dangling_docs_references(texts: dict[str, str], index: AnchorIndex) -> list[str]:
    """``file:line: docs/page.md#anchor`` for every docs reference whose page or anchor does not exist."""
    problems = []
    for name, text in texts.items():
        if "docs/" not in text:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for match in DOCS_REFERENCE.finditer(line):
                page, anchor = "docs/" + match.group(1), match.group(2)
                if not index.exists(page) or (anchor and anchor not in index.anchors(page)):
                    problems.append(f"{name}:{number}: {match.group(0)}")
    return problems


def dangling_markdown_links(texts: dict[str, str], index: AnchorIndex) -> list[str]:
    """``file:line: target`` for every relative link of a .md file whose file or anchor does not exist."""
    problems = []
    for name, text in texts.items():
        if not name.endswith(".md"):
            continue
        directory = os.path.dirname(name)
        for number, line in prose_lines(text):
            for target in MARKDOWN_LINK.findall(INLINE_CODE.sub("", line)):
                if URL_SCHEME.match(target):
                    continue
                path, _, anchor = unquote(target).partition("#")
                if not path:
                    linked = name
                elif path.startswith("/"):
                    linked = os.path.normpath(path.lstrip("/"))
                else:
                    linked = os.path.normpath(os.path.join(directory, path))
                linked = linked.replace(os.sep, "/")
                if linked.startswith("../") or not index.exists(linked):
                    problems.append(f"{name}:{number}: {target}")
                elif anchor and linked.endswith(".md") and anchor not in index.anchors(linked):
                    problems.append(f"{name}:{number}: {target}")
    return problems


def dangling_test_references(texts: dict[str, str], index: AnchorIndex) -> list[str]:
    """``file:line: tests/...py::test_name`` for every named test whose file or function does not exist."""
    problems = []
    for name, text in texts.items():
        if "::test_" not in text:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            for match in TEST_REFERENCE.finditer(line):
                test_file, function = match.groups()
                source = index.text(test_file)
                if source is None or not re.search(rf"^\s*(?:async\s+)?def {function}\(", source, re.MULTILINE):
                    problems.append(f"{name}:{number}: {match.group(0)}")
    return problems


def report(problems: list[str], what: str) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


# ----------------------------------------------------------------------------- the repository

@pytest.fixture(scope="module")
def repository() -> tuple[dict[str, str], AnchorIndex]:
    texts = load_texts(ROOT, repository_files(ROOT))
    index = AnchorIndex(ROOT, texts)
    # Its own examples name missing pages and foreign documents on purpose.
    return {name: text for name, text in texts.items() if name != THIS_FILE}, index


def test_no_file_names_a_document_outside_the_repository(repository):
    texts, _ = repository
    problems = foreign_documents(texts)
    assert not problems, report(problems, "references to documents that are not in the repository")


def test_every_docs_reference_names_an_existing_page_and_anchor(repository):
    texts, index = repository
    problems = dangling_docs_references(texts, index)
    assert not problems, report(problems, "dangling docs/ references")


def test_every_relative_markdown_link_resolves(repository):
    texts, index = repository
    problems = dangling_markdown_links(texts, index)
    assert not problems, report(problems, "dangling Markdown links")


def test_every_named_test_exists(repository):
    texts, index = repository
    problems = dangling_test_references(texts, index)
    assert not problems, report(problems, "references to tests that do not exist")


# ----------------------------------------------------------------------------- the checker itself

def test_github_slugs():
    assert github_slug("11. Padding and position ids") == "11-padding-and-position-ids"
    assert github_slug("F. Logprob consistency, padding and masking") == "f-logprob-consistency-padding-and-masking"
    assert github_slug("The `model:` block (shared by every stage)") == "the-model-block-shared-by-every-stage"
    assert github_slug("中文说明 (README_zh.md)") == "中文说明-readme_zhmd"
    assert markdown_anchors("# A\n## A\n```\n# not a heading\n```\n<a id=\"x-1\"></a>") == {"a", "a-1", "x-1"}


def test_the_checks_find_what_dangles(tmp_path):
    """A small tree with one good and one bad reference of each kind: only the bad ones are reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text('# Title\n\n<a id="7"></a>\nSee [top](#title), [gone](#nowhere), '
                                               "[up](../README.md), [missing](other.md).\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("[page](docs/page.md#7) and [bad](docs/page.md#8)\n"
                                        "```\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    shared, notes = FOREIGN_DOCUMENTS[:2]  # named once, in the list the check reads
    (tmp_path / "code.py").write_text("# docs/page.md#7 docs/page.md#title\n# docs/page.md#8 docs/none.md\n"
                                      f"# see {notes} item 3 and {shared}/x\n"
                                      "# tests/test_a.py::test_here, tests/test_a.py::test_gone, tests/test_b.py::test_x\n",
                                      encoding="utf-8")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_here():\n    pass\n", encoding="utf-8")
    texts = load_texts(str(tmp_path), ["README.md", "code.py", "docs/page.md", "tests/test_a.py"])
    index = AnchorIndex(str(tmp_path), texts)
    assert foreign_documents(texts) == [f"code.py:3: {shared}", f"code.py:3: {notes}"]
    assert dangling_docs_references(texts, index) == [
        "README.md:1: docs/page.md#8", "code.py:2: docs/page.md#8", "code.py:2: docs/none.md"]
    assert dangling_markdown_links(texts, index) == [
        "README.md:1: docs/page.md#8", "docs/page.md:4: #nowhere", "docs/page.md:4: other.md"]
    assert dangling_test_references(texts, index) == [
        "code.py:4: tests/test_a.py::test_gone", "code.py:4: tests/test_b.py::test_x"]
