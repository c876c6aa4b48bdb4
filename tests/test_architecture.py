"""The tree shows the layers: imports flow one way, no private names cross modules, modules stay small.

Rules from the README's design section, checked on the source (AST, including imports inside
functions), so a shortcut across layers fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suite"
MAX_LINES = 500

# what each part of suite/ may import from suite (besides itself); "*" = anything
BELOW_EXECUTION = {"errors", "results", "config", "keys", "data", "model", "threat", "attack", "scoring",
                   "reports", "_offline", "__init__"}
ALLOWED: dict[str, set[str]] = {
    "__init__": {"_offline"},
    "_offline": set(),
    "errors": set(),
    "results": set(),
    "data": {"errors"},
    "model": {"errors", "data", "__init__"},
    "threat": {"errors", "data", "model"},
    "config": {"errors", "threat"},
    "keys": {"errors", "config"},
    "attack": {"errors", "results", "config", "data", "model", "threat"},
    "scoring": {"errors", "results"},
    "reports": {"errors", "results"},
    "execution": BELOW_EXECUTION,
    "studies": BELOW_EXECUTION | {"execution"},
    "audit": BELOW_EXECUTION | {"execution"},
    "federation": BELOW_EXECUTION | {"execution"},
    "cli": {"*"},
}


def _modules() -> list[Path]:
    return sorted(p for p in SUITE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str:
    rel = path.relative_to(SUITE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _suite_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported suite module, imported names) for every import of a suite module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "suite":
                for a in node.names:
                    out.append((node.lineno, f"suite.{a.name}", []))
            elif node.module.startswith("suite."):
                out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("suite."):
                    out.append((node.lineno, a.name, []))
    return out


def _target_part(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_imports_only_its_own_layer_and_below(path):
    part = _part(path)
    allowed = ALLOWED[part]
    bad = [f"line {ln}: {mod}" for ln, mod, _ in _suite_imports(path)
           if "*" not in allowed and _target_part(mod) not in allowed | {part}]
    assert not bad, f"{path.relative_to(REPO)} ({part}) may import only {sorted(allowed)}: {bad}"


def test_no_private_name_crosses_a_module_boundary():
    offenders = []
    for path in [*_modules(), *(REPO / "bench").rglob("*.py"), *(REPO / "variants").rglob("*.py")]:
        for ln, mod, names in _suite_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and mod != "suite":
                offenders.append(f"{path.relative_to(REPO)}:{ln} imports {private} from {mod}")
    assert not offenders, offenders


def test_every_module_is_under_the_size_limit():
    big = {str(p.relative_to(REPO)): n for p in [*_modules(), *(REPO / "variants").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for pkg in sorted(p for p in SUITE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        readme = pkg / "README.md"
        assert readme.exists(), f"{pkg.relative_to(REPO)} has no README.md"
        text = readme.read_text()
        assert "import" in text.lower(), f"{readme.relative_to(REPO)} does not say what the package may import"
        for module in pkg.glob("*.py"):
            if module.name != "__init__.py":
                assert f"`{module.name}`" in text, f"{readme.relative_to(REPO)} has no row for `{module.name}`"
