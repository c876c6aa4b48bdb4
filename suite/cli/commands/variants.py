"""``gistress variants [--json]``: every named variant with task, parameters and input size."""

from __future__ import annotations

import json


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("variants", help="list the architecture variants")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p


def catalogue() -> list[dict]:
    """The generated variant listing (variants/catalogue.json), read without importing the
    variants package (which imports torch): the listing starts in well under a second."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("variants")
    path = Path(spec.submodule_search_locations[0]) / "catalogue.json"
    return json.loads(path.read_text())


def run(args) -> int:
    """Print the table (or JSON)."""
    rows = catalogue()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<22}{'task':<16}{'params':>12}  {'input':>5}  description")
    for r in rows:
        print(f"{r['name']:<22}{r['task']:<16}{r['params'] / 1e6:>11.2f}M  {r['input_size']:>5}  {r['description']}")
    print("also: timm:<name> and torchvision:<name> build any model of those libraries")
    return 0
