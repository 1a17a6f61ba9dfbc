"""The documentation a newcomer and an operator read (README.md and docs/*.md) matches the code.

Every ``heapsync`` command has its line in the README's command table, every docs/ page is
reachable from the README, and no relative link or anchor in them points nowhere (a page moved or
a heading renamed breaks a link silently otherwise)."""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "pyproject.toml").exists():  # the tests may sit one folder deeper
    ROOT = ROOT.parent
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [README, *PAGES, ROOT / "BENCHMARKS.md"]


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {anchor(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return LINK.findall(text)


def commands(group: click.Group, prefix: str = "heapsync") -> list[str]:
    """Every command a user can run, as typed: ``heapsync dlq redrive``, ``heapsync status``, ...

    Asked through ``list_commands``/``get_command``, so commands other packages register (the dev
    tooling's ``heapsync dev``, ``simulator``, ...) count too."""
    found = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        if isinstance(command, click.Group):
            found += commands(command, f"{prefix} {name}")
        else:
            found.append(f"{prefix} {name}")
    return found


def the_cli() -> click.Group:
    """The click group behind the ``heapsync`` console script, wherever the package puts it."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["heapsync"]
    group = importlib.import_module(target.split(":")[0]).cli
    assert isinstance(group, click.Group)
    return group


def test_every_command_has_a_line_in_the_readme_command_table() -> None:
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `heapsync ")]
    every = commands(the_cli())
    assert {"heapsync dev", "heapsync dlq redrive", "heapsync status"} <= set(every)
    missing = [c for c in every if not any(re.match(rf"\| `{re.escape(c)}(`| )", row) for row in rows)]
    assert missing == []


def test_every_docs_page_is_linked_from_the_readme() -> None:
    assert PAGES, "docs/ has no pages"
    linked = {(ROOT / target.split("#", 1)[0]).resolve() for target in links(README) if not target.startswith("#")}
    assert [p.name for p in PAGES if p.resolve() not in linked] == []


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment}")
    assert broken == []


TOP = ("heapsync", "heapsync_ops", "heapsync_dev", "ingest", "processors", "sinks", "tests", "deploy", "bench", "docs")


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_and_module_the_docs_name_exists(doc: Path) -> None:
    """A module moved (``heapsync/cli.py`` -> ``heapsync_ops/cli.py``) must take its mentions along."""
    text = doc.read_text()
    missing = []
    for path in re.findall(r"`((?:%s)/[A-Za-z0-9_./-]*)`" % "|".join(TOP), text):
        if not (ROOT / path).exists():
            missing.append(path)
    for dotted in re.findall(r"`((?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`" % "|".join(TOP[:6]), text):
        if not re.search(r"[A-Z]|\.[a-z0-9]*_", dotted):  # `heapsync.pages` is a topic, not a module
            continue
        module, _, attr = dotted.rpartition(".")
        try:
            if not hasattr(importlib.import_module(module), attr):
                missing.append(dotted)
        except ImportError:
            try:
                importlib.import_module(dotted)
            except ImportError:
                missing.append(dotted)
    assert missing == []


def test_the_readme_stays_short() -> None:
    assert len(README.read_text().splitlines()) <= 260  # a newcomer's page: the rest lives in docs/


def test_no_document_cites_files_the_repository_does_not_have() -> None:
    """DESIGN.md and COMMON.md were briefs outside the repository; the docs/ pages replace them."""
    cited = []
    for path in [*documents(), *ROOT.glob("[!.]*/**/*.py")]:
        if ".venv" in path.parts or path == Path(__file__).resolve():
            continue
        for name in re.findall(r"\b(DESIGN|COMMON)\.md\b", path.read_text(errors="replace")):
            cited.append(f"{path.relative_to(ROOT)}: {name}.md")
    assert cited == []


def test_every_test_file_the_code_cites_exists() -> None:
    """A test moved (``tests/test_ingest_app.py`` -> ``tests/ingest/test_app.py``) must take its citations along."""
    missing = []
    for path in ROOT.glob("[!.]*/**/*.py"):
        if ".venv" in path.parts or "tests" in path.relative_to(ROOT).parts[:1]:
            continue
        for cited in re.findall(r"\btests/[A-Za-z0-9_/]+\.py\b", path.read_text(errors="replace")):
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert missing == []


def test_every_environment_variable_the_benchmarks_read_is_documented() -> None:
    """``BENCH_E2E_KEEP_LOGS`` and the like: an operator finds them where the benchmarks are described."""
    docs = (ROOT / "BENCHMARKS.md").read_text() + (ROOT / "docs" / "settings.md").read_text()
    read = {name for path in (ROOT / "bench").glob("*.py")
            for name in re.findall(r"""environ(?:\.get\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']""", path.read_text())}
    assert read and sorted(n for n in read if n not in docs) == []
