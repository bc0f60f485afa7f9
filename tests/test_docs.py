"""Every internal reference in the docs resolves: links, anchors, repository paths and quoted section names.

Checked: README.md, BENCHMARKS.md and docs/*.md (relative links, `#anchors` against GitHub's heading slugs,
backticked repository paths) and the comments and docstrings of src/ and configs/ that name a section of a
document (`README section "X"`, `README "X"`, `docs/design.md "X"`, `BENCHMARKS.md "X"`). Each checker is
also fed a broken reference, so each check can fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tahoe_ft"
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# a repository path inside a code span: src/..., configs/..., scripts/..., docs/..., tests/..., .ci/...
_REPO_PATH = re.compile(r"(?<![\w./-])((?:src|configs|scripts|docs|tests|\.ci|\.github)/[\w./-]*)")
# a code span with a placeholder is a pattern, not a path: configs/experiment/NAME.yaml, runs/<exp>/...
_PLACEHOLDER = re.compile(r"[<>{}*…]|\.\.\.|\bNAME\b|\bFILE\b|\bEXP\b")
# a document's section named in code or config: README section "X", README "X", docs/design.md "X"
_SECTION_REF = re.compile(
    r"\b(README(?:\.md)?|BENCHMARKS(?:\.md)?|docs/[\w./-]+\.md)(?:'s)?\s+(?:section\s+)?\"([^\"\n]+)\""
)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lowercase, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (GitHub keeps '_')
    return text.replace(" ", "-")


def headings(text: str) -> list[str]:
    """The headings of a markdown text, in order (fenced code excluded)."""
    return [m.group(2) for _, line in prose_lines(text) if (m := _HEADING.match(line))]


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for the text's headings (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        if s in seen:
            seen[s] += 1
            s = f"{s}-{seen[s]}"
        else:
            seen[s] = 0
        out.add(s)
    return out


def broken_links(doc: Path, text: str | None = None) -> list[str]:
    """Relative links of `doc` whose file does not exist or whose `#anchor` is no heading of the target."""
    text = doc.read_text() if text is None else text
    problems = []
    for n, line in prose_lines(text):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve()
            where = f"{doc.name}:{n}: ({target})"
            if path and not dest.exists():
                problems.append(f"{where} no file {path}")
            elif anchor and (not path or dest.suffix == ".md"):
                if anchor.lower() not in anchors(dest.read_text() if path else text):
                    problems.append(
                        f"{where} no heading with anchor #{anchor} in {dest.name if path else doc.name}"
                    )
    return problems


def missing_paths(
    doc: Path, text: str | None = None, root: Path = ROOT, package: Path = PACKAGE
) -> list[str]:
    """Repository paths in code spans of `doc` that do not exist.

    `src/...`, `configs/...`, `scripts/...`, `docs/...`, `tests/...` resolve from the repository root; in
    docs/design.md a bare module file (`training/recipe.py`, `api.py`) resolves from `src/tahoe_ft/`.
    Spans with a placeholder (`<run>`, `NAME`, `*`) are patterns and are skipped.
    """
    text = doc.read_text() if text is None else text
    problems = []
    for n, line in prose_lines(text):
        for _, span in _CODE_SPAN.findall(line):
            if _PLACEHOLDER.search(span):
                continue
            found = [(p, root / p) for p in _REPO_PATH.findall(span)]
            if doc.name == "design.md":
                for p in re.findall(r"(?<![\w./-])([\w/]+\.py)\b", span):
                    if _REPO_PATH.match(p):  # a repository path, checked above
                        continue
                    found.append((p, package.parent / p if p.startswith("tahoe_ft/") else package / p))
            for ref, path in found:
                ref = ref.split("::")[0]
                path = Path(str(path).split("::")[0].rstrip("."))
                if not path.exists():
                    problems.append(f"{doc.name}:{n}: `{span}` names {ref}, which does not exist")
    return problems


def _heading_named(name: str, doc_text: str) -> bool:
    """A quoted section name matches a heading equal to it or starting with it (punctuation aside)."""
    want = slug(name)
    return any(slug(h) == want or slug(h).startswith(want + "-") for h in headings(doc_text))


def dangling_section_refs(source: Path, text: str | None = None, root: Path = ROOT) -> list[str]:
    """`README section "X"`-style references in `source` that name no heading of the document."""
    text = source.read_text() if text is None else text
    joined = re.sub(r"\s*\n\s*(?:#|//|\*)?\s*", " ", text)  # a reference may wrap over comment lines
    problems = []
    for doc_name, name in _SECTION_REF.findall(joined):
        doc = root / (doc_name if doc_name.endswith(".md") else doc_name + ".md")
        if not doc.is_file():
            problems.append(f'{source.name}: {doc_name} "{name}": no file {doc.name}')
        elif not _heading_named(name, doc.read_text()):
            problems.append(f'{source.name}: {doc_name} "{name}": no such heading in {doc.name}')
    return problems


def _sources() -> list[Path]:
    files = [p for p in (ROOT / "src").rglob("*") if p.suffix in {".py", ".md"}]
    files += [p for p in (ROOT / "configs").rglob("*.yaml")]
    files += [p for p in (ROOT / "scripts").glob("*") if p.suffix in {".py", ".sh"}]
    return sorted(files)


# --- the repository's documents ------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(doc):
    assert broken_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_backticked_repository_paths_exist(doc):
    assert missing_paths(doc) == []


def test_section_names_quoted_in_code_and_configs_are_headings():
    problems = [p for src in _sources() for p in dangling_section_refs(src)]
    assert problems == []


def test_the_documents_exist_and_readme_links_them():
    readme = (ROOT / "README.md").read_text()
    for name in ("docs/design.md", "docs/results.md", "BENCHMARKS.md"):
        assert (ROOT / name).is_file(), name
        assert f"]({name}" in readme, f"README.md does not link {name}"


# --- each checker reports what it should ----------------------------------------------------------


def test_slug_follows_github():
    assert slug("Fine-tune on your own screen") == "fine-tune-on-your-own-screen"
    assert slug("What a run leaves (`runs/`)") == "what-a-run-leaves-runs"
    assert slug("Demo, 3 seeds × 2 folds") == "demo-3-seeds--2-folds"
    assert slug("`check_mean` and *the* ceiling") == "check_mean-and-the-ceiling"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_a_missing_file_and_a_missing_anchor_are_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Known section\n")
    doc = tmp_path / "doc.md"
    text = (
        "# Doc\n\n## Here\n\nSee [ok](other.md#known-section), [self](#here), [web](https://example.org/x#y),\n"
        "[gone](missing.md), [bad anchor](other.md#unknown), [bad self](#nowhere).\n\n"
        "```\n[in code](also-missing.md)\n```\n`[in a span](missing-too.md)`\n"
    )
    problems = broken_links(doc, text)
    assert len(problems) == 3, problems
    assert "no file missing.md" in problems[0]
    assert "#unknown" in problems[1] and "#nowhere" in problems[2]


def test_a_missing_repository_path_is_reported(tmp_path):
    text = (
        "`src/tahoe_ft/cli.py`, `configs/data/custom.yaml`, `bash scripts/test.sh`, `docs/`,\n"
        "`configs/experiment/NAME.yaml`, `runs/<experiment>/latest`,\n"
        "`src/tahoe_ft/no_such_module.py`, `configs/data/nope.yaml`, `training/recipe.py::train()`\n"
    )
    problems = missing_paths(ROOT / "README.md", text)
    assert len(problems) == 2, problems
    assert "no_such_module.py" in problems[0] and "nope.yaml" in problems[1]
    # in docs/design.md a bare module file resolves from src/tahoe_ft/
    design = ROOT / "docs" / "design.md"
    assert missing_paths(design, "`training/recipe.py::train()` and `api.py`") == []
    assert len(missing_paths(design, "`training/no_such.py`")) == 1


def test_a_quoted_section_that_is_no_heading_is_reported(tmp_path):
    (tmp_path / "README.md").write_text("# Tool\n\n## Choosing the defaults\n\n## Model hparams (dict)\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text(
        "# Design\n\n## Model hparams (dict saved in every checkpoint)\n"
    )
    src = tmp_path / "mod.py"
    text = (
        '# chosen on validation folds (README "Choosing the defaults"); see docs/design.md "Model hparams"\n'
        '# and README section\n# "Gone section"; docs/design.md "Nothing"; docs/missing.md "X"\n'
    )
    problems = dangling_section_refs(src, text, root=tmp_path)
    assert len(problems) == 3, problems
    assert '"Gone section"' in problems[0] and '"Nothing"' in problems[1] and "no file" in problems[2]


# -- module paths named anywhere (issue #34): configs, code (docstrings and comments), scripts, Markdown --------

_SRC_PATH = re.compile(r"(?<![\w/])src/tahoe_ft/[\w/]+\.py\b")
_DOTTED_MODULE = re.compile(r"(?<![\w./])tahoe_ft(?:\.[a-z_][a-z0-9_]*)+")


def module_problems(text: str, where: str, api: set[str], package: Path = PACKAGE) -> list[str]:
    """`src/tahoe_ft/...py` paths and `tahoe_ft.a.b` references in `text` that name no module (a dotted name
    may end in attributes of the module it reaches, or be an API name of the package)."""
    problems = []
    for p in _SRC_PATH.findall(text):
        if not (package.parent.parent / p).exists():
            problems.append(f"{where}: {p} does not exist")
    for ref in _DOTTED_MODULE.findall(text):
        parts = ref.split(".")[1:]
        here = package
        if parts[0] in api or parts[0].startswith("__"):  # an API function, or tahoe_ft.__file__
            continue
        for i, part in enumerate(parts):
            if (here / part).is_dir():
                here = here / part
                continue
            if (
                (here / f"{part}.py").is_file()
                or i > 0
                and here != package
                and (here / "__init__.py").is_file()
            ):
                break  # a module (or a name in a package's __init__); the rest are its attributes
            problems.append(f"{where}: {ref} names no module ({'.'.join(['tahoe_ft', *parts[: i + 1]])})")
            break
    return problems


def _texts_naming_modules() -> list[tuple[str, str]]:
    files = [*sorted((ROOT / "configs").rglob("*.yaml")), *sorted(PACKAGE.rglob("*.py")),
             *sorted((ROOT / "scripts").glob("*")), *DOCS]  # fmt: skip
    return [(str(f.relative_to(ROOT)), f.read_text()) for f in files if f.is_file() and f.suffix != ".xz"]


def test_module_paths_in_configs_code_scripts_and_docs_exist():
    import tahoe_ft

    api = set(tahoe_ft.__all__) | {"__version__", "eval"}
    problems = [p for where, text in _texts_naming_modules() for p in module_problems(text, where, api)]
    assert problems == []


def test_a_stale_module_path_is_reported():
    text = "see src/tahoe_ft/nowhere.py and tahoe_ft.sweep.study.run_sweep; tahoe_ft.search.study is fine"
    problems = module_problems(text, "x.yaml", {"train"})
    assert problems == [
        "x.yaml: src/tahoe_ft/nowhere.py does not exist",
        "x.yaml: tahoe_ft.sweep.study.run_sweep names no module (tahoe_ft.sweep)",
    ]
