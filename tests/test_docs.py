"""The docs point at things that exist: every relative link at a file (and its `#anchor` at a heading
there, slugged as GitHub slugs them), every `make <target>` at a Makefile target, every `python x.py`
at a file and every `python -m module` at a module. Commands are looked for in code only (fenced blocks
and `inline code`), so prose that says "make" is left alone."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MAKE = re.compile(r"(?<![\w./$-])make\s+([A-Za-z_][\w-]*)")
PYTHON = re.compile(r"(?<![\w-])python3?\s+(?:-m\s+([\w.]+)|([\w./-]+\.py)\b)")
MAKE_TARGET = re.compile(r"^([A-Za-z_][\w-]*)\s*:(?!=)", re.M)


def split_markdown(text: str) -> tuple[list[str], list[str]]:
    """A Markdown text in, (prose lines with inline code removed, code snippets) out. Code snippets
    are the lines of fenced blocks and the contents of inline code spans."""
    prose, code, in_fence = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if in_fence:
            code.append(line)
            continue
        code.extend(m.group(2) for m in INLINE_CODE.finditer(line))
        # A heading keeps its code's text (it is part of the anchor); elsewhere code is not prose,
        # so a [text](target) inside it is no link.
        keep = r"\2" if HEADING.match(line) else ""
        prose.append(INLINE_CODE.sub(keep, line))
    return prose, code


def slug(heading: str) -> str:
    """A heading's text in, its anchor out, as GitHub makes it: link text kept, lower case,
    punctuation dropped (letters, digits, spaces, '-' and '_' stay), spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in split_markdown(path.read_text(encoding="utf-8"))[0]:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def make_targets(root: Path) -> set[str]:
    return set(MAKE_TARGET.findall((root / "Makefile").read_text(encoding="utf-8")))


def module_exists(root: Path, module: str) -> bool:
    """True when `python -m module` would find something: a file or package of this repository
    first, else an installed module."""
    base = root / module.replace(".", "/")
    if base.with_suffix(".py").is_file() or (base / "__main__.py").is_file():
        return True
    if (root / module.split(".")[0]).exists():  # one of ours: it must be here, not elsewhere
        return False
    return importlib.util.find_spec(module) is not None


def doc_problems(path: Path, root: Path) -> list[str]:
    """One Markdown file in; out, one line per thing it points at that does not exist."""
    prose, code = split_markdown(path.read_text(encoding="utf-8"))
    name = path.relative_to(root) if path.is_relative_to(root) else path
    problems = []
    for line in prose:
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                problems.append(f"{name}: link to {target}: no file {file_part}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{name}: link to {target}: no heading #{anchor} in {file_part or name}")
    targets = make_targets(root)
    for snippet in code:
        for target in MAKE.findall(snippet):
            if target not in targets:
                problems.append(f"{name}: `make {target}`: no such Makefile target")
        for module, script in PYTHON.findall(snippet):
            if module and not module_exists(root, module):
                problems.append(f"{name}: `python -m {module}`: no such module")
            if script and not (root / script).is_file():
                problems.append(f"{name}: `python {script}`: no such file")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_commands_point_at_what_exists(doc):
    problems = doc_problems(doc, ROOT)
    assert not problems, "\n".join(problems)


def test_readme_is_the_door():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    pages = {p.name for p in DOCS[1:]}
    assert pages, "no docs/*.md"
    linked = {Path(t.partition("#")[0]).name for t in LINK.findall(readme) if t.startswith("docs/")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_the_checker_finds_what_is_broken(tmp_path):
    """The checks above would pass on an empty checker; this one shows each kind of problem found."""
    (tmp_path / "Makefile").write_text("X := 1\nall: build\nbuild:\n\techo\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "run.py").write_text("")
    (tmp_path / "other.md").write_text("# Other page\n\n## Using `bloom`, on purpose\n\n```bash\n# not a heading\n```\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n"
        "[ok](other.md#using-bloom-on-purpose) [ok](#doc) [ok](https://example.com/x) [ok](jobs/run.py)\n"
        "[bad](missing.md) [bad](other.md#not-a-heading) [bad](#nowhere)\n\n"
        "```bash\nmake all\nmake build ARGS=1\nmake nothing\npython jobs/run.py --x\npython jobs/gone.py\n"
        "python -m jobs.run\npython -m jobs.gone\npython -m no_such_module_anywhere_xyz\n```\n\n"
        "Prose may make sense without `make ghost` being spared, and `python -m os` is found.\n"
    )
    problems = doc_problems(doc, tmp_path)
    assert problems == [
        "doc.md: link to missing.md: no file missing.md",
        "doc.md: link to other.md#not-a-heading: no heading #not-a-heading in other.md",
        "doc.md: link to #nowhere: no heading #nowhere in doc.md",
        "doc.md: `make nothing`: no such Makefile target",
        "doc.md: `python jobs/gone.py`: no such file",
        "doc.md: `python -m jobs.gone`: no such module",
        "doc.md: `python -m no_such_module_anywhere_xyz`: no such module",
        "doc.md: `make ghost`: no such Makefile target",
    ]
