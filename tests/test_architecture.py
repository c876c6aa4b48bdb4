"""The tree shows the layers: imports flow one way, no private names cross modules, modules stay small.

Rules from the README's design section, checked on the source (AST, including imports inside
functions and relative imports), so a shortcut across layers fails here rather than in review.
The ``variants`` (model zoo) and ``bench`` (benchmark harness) packages are layers of their own:
``variants`` sits between ``suite.model`` and the config, ``bench`` on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suite"
PACKAGES = ("suite", "variants", "bench")
MAX_LINES = 500

# what each part may import from the three packages (besides itself); "*" = anything. A part is
# a subpackage or module of suite/ ("suite" alone is suite/__init__.py), or a whole package
# (variants, bench)
BELOW_EXECUTION = {"suite", "suite.errors", "suite.results", "suite.config", "suite.keys", "suite.data",
                   "suite.model", "suite.threat", "suite.attack", "suite.scoring", "suite.reports",
                   "suite._offline", "variants"}
ALLOWED: dict[str, set[str]] = {
    "suite": {"suite._offline"},
    "suite._offline": set(),
    "suite.errors": set(),
    "suite.results": set(),
    "suite.data": {"suite.errors"},
    "suite.model": {"suite.errors", "suite.data", "suite"},
    "variants": {"suite", "suite.errors", "suite.model"},
    "suite.threat": {"suite.errors", "suite.data", "suite.model"},
    "suite.config": {"suite.errors", "suite.threat", "variants"},
    "suite.keys": {"suite.errors", "suite.config"},
    "suite.attack": {"suite.errors", "suite.results", "suite.config", "suite.data", "suite.model", "suite.threat"},
    "suite.scoring": {"suite.errors", "suite.results"},
    "suite.reports": {"suite.errors", "suite.results"},
    "suite.execution": BELOW_EXECUTION,
    "suite.studies": BELOW_EXECUTION | {"suite.execution"},
    "suite.audit": BELOW_EXECUTION | {"suite.execution"},
    "suite.federation": BELOW_EXECUTION | {"suite.execution"},
    "suite.cli": {"*"},
    "bench": {"*"},
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    """suite/model/detection.py -> suite.model.detection; suite/model/__init__.py -> suite.model."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    """True if ``dotted`` names a module or package of the repository."""
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _part(dotted: str) -> str:
    """The layer a module belongs to: suite.<first component>, or the whole package."""
    parts = dotted.split(".")
    return ".".join(parts[:2]) if parts[0] == "suite" else parts[0]


def _from_target(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of ``from X import ...``, relative forms (``from ..x``) resolved."""
    if node.level == 0:
        return node.module or ""
    package = _dotted(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported repository module, names imported from it) for every import of one of
    the three packages; ``from pkg import submodule`` counts as importing the submodule."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(path, node)
            if target.split(".")[0] not in PACKAGES:
                continue
            names = []
            for a in node.names:
                if _is_module(f"{target}.{a.name}"):
                    out.append((node.lineno, f"{target}.{a.name}", []))
                else:
                    names.append(a.name)
            if names:
                out.append((node.lineno, target, names))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES)
    return out


def _where(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", _modules(), ids=_where)
def test_module_imports_only_its_own_layer_and_below(path):
    part = _part(_dotted(path))
    allowed = ALLOWED[part]
    bad = [f"line {ln}: {mod}" for ln, mod, _ in _imports(path)
           if "*" not in allowed and _part(mod) not in allowed | {part}]
    assert not bad, f"{_where(path)} ({part}) may import only {sorted(allowed)}: {bad}"


def test_no_private_name_crosses_a_module_boundary():
    offenders = []
    for path in _modules():
        for ln, mod, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                offenders.append(f"{_where(path)}:{ln} imports {private} from {mod}")
    assert not offenders, offenders


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph (its nodes, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_layers_import_each_other_without_a_cycle():
    """Between parts (suite's subpackages, variants, bench), imports anywhere in a module, lazy
    ones included, form no cycle."""
    graph: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for path in _modules():
        src = _part(_dotted(path))
        for ln, mod, _ in _imports(path):
            dst = _part(mod)
            if dst != src:
                graph.setdefault(src, set()).add(dst)
                where.setdefault((src, dst), f"{_where(path)}:{ln}")
    cycle = _cycle(graph)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + ", ".join(
        where[a, b] for a, b in zip(cycle, cycle[1:]))


def test_every_module_is_under_the_size_limit():
    big = {_where(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
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
