"""The README as a front page and the documentation site: what they tell a reader must be true of the
code (the commands, flags and settings they name exist; their links resolve), and the site builds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest

from helpers import ROOT, run_forde

README = ROOT / "README.md"
MAX_README_BYTES = 12 * 1024
# What a reader of the site reads: its pages, the README, and BENCHMARKS.md (which the site includes).
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [README, ROOT / "BENCHMARKS.md"]

FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# `forde CMD` where a command is written (not forde-serve, forde_serve or "forde" as a method name)
COMMAND = re.compile(r"(?:^|(?<=[\s/]))forde ([a-z][\w-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def code_of(text: str) -> list[str]:
    """Every command line a page writes as code: fenced lines (backslash continuations joined), then
    inline code spans outside fenced blocks."""
    lines = []
    for block in FENCED.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += INLINE.findall(FENCED.sub("", text))
    return lines


def named_commands() -> dict[str, set[str]]:
    """{forde subcommand: the --flags written after it} over every page."""
    named: dict[str, set[str]] = {}
    for page in PAGES:
        for line in code_of(page.read_text()):
            for match in COMMAND.finditer(line):
                rest = re.split(r"\s#|&&|\||;", line[match.end() :])[0]
                named.setdefault(match.group(1), set()).update(re.findall(r"(?<![\w-])--[a-z][\w-]*", rest))
    return named


@cache
def help_text(*command: str) -> str:
    return run_forde(*command, "--help").stdout


def subcommands() -> set[str]:
    listing = help_text().split("Commands:", 1)[1]
    return set(re.findall(r"^  ([a-z][\w-]*)\s", listing, re.M))


def slug(heading: str) -> str:
    """A heading's anchor as Python-Markdown's toc (mkdocs) and GitHub both make it, for plain headings."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = unicodedata.normalize("NFKD", re.sub(r"[`*_]", "", text)).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*#*$", FENCED.sub("", page.read_text()), re.M)}


def ci_test_command() -> str:
    """The command `.ci/run` runs the tests with: its line that ends by running pytest."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line.endswith(".venv/bin/pytest")]
    assert len(commands) == 1, f".ci/run: expected one line that runs .venv/bin/pytest, got {commands}"
    return commands[0]


def test_readme_is_a_front_page_of_at_most_12_kb():
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {MAX_README_BYTES})"


def test_readme_opens_with_the_serve_command_then_the_test_command():
    text = README.read_text()
    blocks = re.findall(r"^```bash\n(.*?)\n```", text, re.S | re.M)
    assert len(blocks) >= 2, blocks
    serve, tests = blocks[:2]
    assert serve.endswith("forde serve"), serve
    assert "http://127.0.0.1:3000/ui" in text.split(f"```bash\n{tests}\n```")[0], "the page's address follows serve"
    assert tests == ci_test_command(), f"README's test command is not the one .ci/run runs: {tests!r}"


def test_readme_stands_on_its_own():
    text = README.read_text()
    for outside in ("../shared", "DESIGN.md", "/work/"):
        assert outside not in text, f"README.md points at {outside!r}, which a reader of the repository does not have"


def test_every_relative_link_in_the_readme_resolves():
    links = LINK.findall(README.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert {"docs/ui.png", "docs/index.md"} <= set(relative), relative
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else README
        assert target.exists(), f"README.md links to {link!r}, which does not exist"
        if anchor:
            assert target.suffix == ".md", f"README.md links to an anchor in {path!r}, which is not a page"
            assert anchor in anchors(target), f"README.md links to {link!r}: {path or 'README.md'} has no such heading"


def test_every_forde_command_named_in_the_docs_exists():
    named, existing = named_commands(), subcommands()
    assert {"train", "export", "serve", "score", "evaluate"} <= set(named), sorted(named)
    assert set(named) <= existing, f"the docs name forde {sorted(set(named) - existing)}, which `forde --help` lacks"
    assert existing <= set(named), f"forde {sorted(existing - set(named))} is not documented on any page"


def test_every_flag_the_docs_write_after_a_forde_command_exists():
    unknown = [
        f"forde {command} {flag}"
        for command, flags in sorted(named_commands().items())
        if command in subcommands()
        for flag in sorted(flags)
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text(command))
    ]
    assert not unknown, f"the docs write flags that `forde CMD --help` does not list: {unknown}"


def test_every_setting_the_docs_name_is_read_by_the_code():
    named = {name for page in PAGES for name in re.findall(r"\bFORDE_[A-Z_]+\b", page.read_text())}
    from forde_serve.app.settings import ServeSettings

    code = "\n".join(p.read_text() for p in (ROOT / "forde_serve").rglob("*.py"))
    read = set(re.findall(r"\bFORDE_[A-Z_]+\b", code)) | {
        f"FORDE_{name.upper()}" for name in ServeSettings.model_fields
    }
    assert "FORDE_MODEL" in named, sorted(named)
    assert named <= read, sorted(named - read)


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # Material's banner about MkDocs 2
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (site / "reference" / "runtime" / "index.html").read_text()
    assert 'id="forde_serve.runtime.EnsembleRuntime.predict"' in reference  # generated from the docstrings
    # The Benchmarks page is BENCHMARKS.md itself, included at build time: its last section is there.
    last_heading = re.findall(r"^## (.+)$", (ROOT / "BENCHMARKS.md").read_text(), re.M)[-1]
    assert f'id="{slug(last_heading)}"' in (site / "benchmarks" / "index.html").read_text()
    assert (site / "ui.png").read_bytes() == (ROOT / "docs" / "ui.png").read_bytes()
