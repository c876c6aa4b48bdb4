"""``gistress variants [--json]``: every named variant with task, parameters and input size."""

from __future__ import annotations

import json


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("variants", help="list the architecture variants")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p


def run(args) -> int:
    """Print the table (or JSON)."""
    from variants.listing import describe_all

    rows = describe_all()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<22}{'task':<16}{'params':>12}  {'input':>5}  description")
    for r in rows:
        print(f"{r['name']:<22}{r['task']:<16}{r['params'] / 1e6:>11.2f}M  {r['input_size']:>5}  {r['description']}")
    print("also: timm:<name> and torchvision:<name> build any model of those libraries")
    return 0
