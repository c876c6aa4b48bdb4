"""What ``gistress variants`` lists: name, task, parameter count, input size, description.

Parameters are counted on the meta device (shapes only, no memory, no initialization work).
Even so, building every family imports timm and ultralytics, which takes seconds, so the listing
is generated once into ``variants/catalogue.json`` (``python -m variants.listing``) and read from
there without importing torch; a test rebuilds it and fails when it is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from variants.base import Variant, VariantEntry, entries, lookup, parse_variant_name

CATALOGUE = Path(__file__).with_name("catalogue.json")


def _build_cheaply(build) -> Variant:
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # any meta-device limitation: pay for a real build instead
        return build()


def describe(name_or_entry: str | VariantEntry) -> dict:
    """``dict(name, task, params, input_size, description)`` for a registered variant (default
    options) or a ``timm:<model>`` / ``torchvision:<model>`` name."""
    parsed = parse_variant_name(name_or_entry) if isinstance(name_or_entry, str) else None
    if parsed is not None and parsed.external:
        from variants.external import build_external

        variant = _build_cheaply(lambda: build_external(name_or_entry))
        return dict(
            name=name_or_entry,
            task=variant.task,
            params=variant.num_params,
            input_size=variant.input_size,
            description=f"external {parsed.library} model",
        )
    entry = lookup(name_or_entry) if isinstance(name_or_entry, str) else name_or_entry
    variant = _build_cheaply(lambda: entry.builder(name=entry.name, **entry.defaults))
    return dict(
        name=entry.name,
        task=entry.task,
        params=variant.num_params,
        input_size=variant.input_size,
        description=entry.description,
    )


def describe_all() -> list[dict]:
    """``describe`` for every registered variant, in registry order."""
    return [describe(entry) for entry in entries().values()]


def write_catalogue(path: Path = CATALOGUE) -> Path:
    """Regenerate the catalogue file from the registry (real builds on the meta device)."""
    path.write_text(json.dumps(describe_all(), indent=1) + "\n")
    return path


if __name__ == "__main__":
    print(write_catalogue(Path(sys.argv[1]) if len(sys.argv) > 1 else CATALOGUE))
