"""Anything not named in the registry: ``timm:<model>`` and ``torchvision:<model>`` classifiers.

Options go straight to ``timm.create_model`` / ``torchvision.models.get_model``; the model is
wrapped so that it takes [0, 1] images like every other classification variant.
"""

from __future__ import annotations

from suite.errors import GistressError, close_matches
from variants.base import IMAGENET_MEAN, IMAGENET_STD, Variant, classifier, parse_variant_name


def _unknown(library: str, model_name: str, known) -> GistressError:
    near = close_matches(model_name, known)
    hint = f"did you mean {near}?" if near else f"list the names with {library}.list_models()"
    return GistressError(f"unknown {library} model '{model_name}'", hint)


def _bad_options(name: str, options: dict, exc: Exception) -> GistressError:
    return GistressError(
        f"{name} rejected the options {sorted(options)}: {exc}",
        "pass only keyword arguments the library's model constructor accepts",
    )


def _build_timm(name: str, model_name: str, pretrained: bool, options: dict) -> Variant:
    import timm
    from timm.models import split_model_name_tag

    arch, _ = split_model_name_tag(model_name)
    if not arch or not timm.is_model(arch):
        raise _unknown("timm", model_name, timm.list_models())
    try:
        net = timm.create_model(model_name, **options)
    except TypeError as exc:
        raise _bad_options(name, options, exc) from None
    except RuntimeError as exc:  # e.g. an unknown pretrained tag
        raise GistressError(f"{name}: {exc}", "check the name (timm.list_pretrained())") from None
    cfg = net.pretrained_cfg
    norm = (tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)))
    size = options.get("img_size", cfg.get("input_size", (3, 224, 224)))
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    tag = cfg.get("tag")
    has_weights = bool(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file"))
    source = f"timm:{cfg.get('architecture', arch)}" + (f".{tag}" if tag else "") if has_weights else None
    num_classes = int(getattr(net, "num_classes", options.get("num_classes", 1000)))
    variant = classifier(name, net, norm, size, num_classes, {**options, "pretrained_source": source})
    if pretrained:
        from variants.weights import load_pretrained

        load_pretrained(variant)
    return variant


def _build_torchvision(name: str, model_name: str, pretrained: bool, options: dict) -> Variant:
    from torchvision import models

    known = models.list_models(module=models)  # classification models only
    if model_name not in known:
        if model_name in models.list_models():
            raise GistressError(
                f"torchvision:{model_name} is not a classification model",
                "external torchvision variants must be classifiers; detection uses the YOLO variants",
            )
        raise _unknown("torchvision", model_name, known)
    try:
        weights = models.get_model_weights(model_name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        weights = None
    kw = weights.transforms.keywords if weights is not None else {}
    size = int(kw.get("crop_size", 224))
    norm = (tuple(kw.get("mean", IMAGENET_MEAN)), tuple(kw.get("std", IMAGENET_STD)))
    if pretrained:
        from variants.weights import torchvision_checkpoint

        torchvision_checkpoint(model_name)  # raises, naming the path, before torchvision downloads
    categories = len(weights.meta.get("categories") or []) if weights is not None else 0
    try:
        net = models.get_model(model_name, weights="DEFAULT" if pretrained else None, **options)
    except ValueError as exc:
        if pretrained:  # torchvision pins constructor options (num_classes) to the weights
            raise GistressError(
                f"{name}: pretrained weights do not fit the options {sorted(options)}: {exc}",
                f"drop those options (the weights have {categories} classes) or use weights=random",
            ) from None
        raise _bad_options(name, options, exc) from None
    except TypeError as exc:
        raise _bad_options(name, options, exc) from None
    num_classes = int(options.get("num_classes", categories or 1000))
    source = f"torchvision:{model_name}" if weights else None
    return classifier(name, net, norm, size, num_classes, {**options, "pretrained_source": source},
                      weights="pretrained" if pretrained else "random")


def build_external(name: str, pretrained: bool = False, **options) -> Variant:
    """Build ``timm:<model>`` or ``torchvision:<model>`` as a classification Variant.

    Input size and mean/std come from the model's pretrained config (timm) or its default
    weights' transforms (torchvision; 224 and ImageNet statistics otherwise). ``pretrained``
    loads from the local caches only, with a GistressError naming the path on a miss.
    """
    library, model_name = parse_variant_name(name)
    if library == "timm":
        return _build_timm(name, model_name, pretrained, options)
    if library == "torchvision":
        return _build_torchvision(name, model_name, pretrained, options)
    raise GistressError(f"unknown model library in '{name}'", "use timm:<model> or torchvision:<model>")
