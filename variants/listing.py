"""What ``gistress variants`` lists: name, task, parameter count, input size, description.

Parameters are counted on the meta device (shapes only, no memory, no initialization work), so
listing every variant, ViT-B included, takes seconds. Builders that cannot run on the meta
device (e.g. ones that need real values while constructing) fall back to a normal build.
"""

from __future__ import annotations

import torch

from variants.base import Variant, VariantEntry, entries, lookup


def _build_cheaply(build) -> Variant:
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # any meta-device limitation: pay for a real build instead
        return build()


def describe(name_or_entry: str | VariantEntry) -> dict:
    """``dict(name, task, params, input_size, description)`` for a registered variant (default
    options) or a ``timm:<model>`` / ``torchvision:<model>`` name."""
    if isinstance(name_or_entry, str) and name_or_entry.startswith(("timm:", "torchvision:")):
        from variants.external import build_external

        variant = _build_cheaply(lambda: build_external(name_or_entry))
        return dict(
            name=name_or_entry,
            task=variant.task,
            params=variant.num_params,
            input_size=variant.input_size,
            description=f"external {name_or_entry.split(':', 1)[0]} model",
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
