"""Architecture variants: one registry, ``build(name, **options) -> Variant``.

Named families live one per module (``resnet``, ``convnet``, ``lenet``, ``mlp``, ``modern``, ``yolo``);
``timm:<name>`` and ``torchvision:<name>`` build anything else through those libraries.
``parse_variant_name`` is the one parser of those names and ``task_of`` the one rule for a name's
task; checkpoint files are read by ``variants.checkpoint.read_checkpoint`` (one trust rule).
"""

from __future__ import annotations

import suite  # noqa: F401  (offline defaults before torch-adjacent imports)
from variants.base import (  # noqa: F401  (the package's public names)
    Variant,
    VariantEntry,
    VariantName,
    entries,
    lookup,
    parse_variant_name,
    register,
    task_of,
)


def build(
    name: str,
    *,
    weights: str = "random",
    seed: int = 0,
    trust_checkpoint: bool = False,
    **options,
) -> Variant:
    """Build a variant by name with its options and weights.

    weights: ``random`` (seeded), ``calibrated`` (random, BN statistics to be estimated on the
    run's data with ``variants.weights.calibrate_bn``), ``pretrained`` (from the libraries' local
    caches; a clear error offline on a miss), or ``file:<path>`` (``weights_only=True`` unless
    ``trust_checkpoint``).
    """
    import torch

    from variants import weights as W

    W.check_weights_spec(weights)
    torch.manual_seed(seed)
    if parse_variant_name(name).external:
        from variants.external import build_external

        variant = build_external(name, pretrained=(weights == "pretrained"), **options)
    else:
        entry = lookup(name)
        from variants.base import check_options

        check_options(name, entry.builder, options)
        merged = {**entry.defaults, **options}
        variant = entry.builder(name=name, **merged)
        if weights == "pretrained":
            W.load_pretrained(variant)
    if weights.startswith("file:"):
        W.load_file(variant, weights[len("file:"):], trust_checkpoint=trust_checkpoint)
    variant.weights = weights
    return variant


def names() -> list[str]:
    """Registered variant names in registry order."""
    return list(entries())
