"""README and docs stay true: every `gistress` invocation parses, named specs and linked files
exist, and the README opens with the two commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from suite.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(text: str) -> list[list[str]]:
    """`gistress ...` lines in fenced blocks and in inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        lines += block.replace("\\\n", " ").splitlines()
    # inline spans that are whole invocations (with flags), not mentions like `gistress attack`
    lines += [c for c in re.findall(r"`(gistress [^`]+)`", text) if " --" in c]
    out = []
    for line in lines:
        line = line.split("  #", 1)[0]
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]
        if words[:1] == ["gistress"] and len(words) > 1 and not any("<" in w for w in words):
            out.append(words[1:])
    return out


def test_readme_opens_with_the_two_commands():
    head = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_cli_invocation_parses_and_names_real_files(page):
    parser = build_parser()
    for words in _commands(page.read_text()):
        args, extra = parser.parse_known_args(words)
        assert not extra, (page.name, words)
        assert getattr(args, "_run", None), (page.name, words)
        spec = getattr(args, "spec", None)
        if spec and spec.startswith("runs/"):
            assert (REPO / spec).is_file(), (page.name, spec)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_exist(page):
    for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
        assert (page.parent / target).exists(), (page.name, target)


def test_readme_covers_the_tour():
    text = (REPO / "README.md").read_text()
    for needle in ("gistress audit", "gistress attack", "gistress study", "gistress ui", "## Design",
                   "## Troubleshooting", "docs/mlflow-runs.png"):
        assert needle in text, needle
    assert len(_commands(text)) >= 6


def test_the_project_never_points_outside_its_own_clone():
    """A user's clone has no ../shared: facts the project relies on live in its own docs."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    texts = [REPO / f for f in tracked if f.endswith((".md", ".py", ".yaml", ".toml", ".txt"))]
    offenders = [str(p.relative_to(REPO)) for p in texts
                 if p.is_file() and p.name != "test_docs.py"
                 and re.search(r"(\.\./shared|shared/papers|shared/DESIGN)", p.read_text(errors="ignore"))]
    assert offenders == []
