"""Modern ImageNet architectures through timm: ViT-B/16, Swin-T, ConvNeXt-T, MaxViT-T.

``stem="imagenet"`` is the standard 224x224 configuration (the timm config whose parameter count
matches the paper's reference). ``stem="cifar"`` keeps depth and widths and shrinks only the
input side so that a 32x32 image still yields a sensible token grid / feature pyramid:

- ViT-B: patch 4 -> 8x8 = 64 tokens.
- Swin-T: patch 2, window 4 -> stages at 16, 8, 4, 2 (timm shrinks the last window to 2).
- ConvNeXt-T: stem patch 2 -> stages at 16, 8, 4, 2.
- MaxViT-T: stem stride 1 and partition 2 -> stages at 16, 8, 4, 2; timm's default
  partition at 32 px would be 1x1 (attention over a single token).

Attacks differentiate twice; fused attention has no double backward on CPU, so callers run
attacks under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``.
"""

from __future__ import annotations

from variants.base import Variant, classifier, register
from variants.resnet import check_choice, resolve_classes, stem_defaults

# name -> (timm model, CIFAR-config kwargs for timm.create_model, description)
_MODELS = {
    "vit_b_16": (
        "vit_base_patch16_224",
        dict(img_size=32, patch_size=4),
        "ViT-B/16 (timm vit_base_patch16_224); cifar: patch 4 at 32 px",
    ),
    "swin_t": (
        "swin_tiny_patch4_window7_224",
        dict(img_size=32, patch_size=2, window_size=4),
        "Swin-T (timm swin_tiny_patch4_window7_224); cifar: patch 2, window 4",
    ),
    "convnext_t": (
        "convnext_tiny",
        dict(patch_size=2),
        "ConvNeXt-T (timm convnext_tiny); cifar: stem patch 2",
    ),
    "maxvit_t": (
        "maxvit_tiny_tf_224",
        # built for 64 px so timm's bookkeeping (partition 64/32 = 2, feature sizes) matches
        # the stride-1 stem we switch to below for 32 px input
        dict(img_size=64),
        "MaxViT-T (timm maxvit_tiny_tf_224); cifar: stem stride 1, partition 2",
    ),
}


def _create(name: str, stem: str, num_classes: int):
    import timm

    arch, cifar_kwargs, _ = _MODELS[name]
    net = timm.create_model(arch, num_classes=num_classes, **(cifar_kwargs if stem == "cifar" else {}))
    if stem == "cifar" and name == "maxvit_t":
        net.stem.conv1.stride = (1, 1)  # Conv2dSame pads from the stride at run time
        net.stem.stride = 1
        net.img_size = (32, 32)
    return net


def _description(name: str) -> str:
    return _MODELS[name][2]


# decorators apply bottom-up: the registry (and the listing) reads vit_b_16 first
@register("maxvit_t", "classification", 224, _description("maxvit_t"))
@register("convnext_t", "classification", 224, _description("convnext_t"))
@register("swin_t", "classification", 224, _description("swin_t"))
@register("vit_b_16", "classification", 224, _description("vit_b_16"))
def build_modern(name: str, stem: str = "imagenet", num_classes: int | None = None) -> Variant:
    """Build a timm ViT-B/16, Swin-T, ConvNeXt-T or MaxViT-T.

    stem: ``imagenet`` (224 px, the model's own pretrained mean/std) or ``cifar`` (32 px, CIFAR
    mean/std, see the module notes). num_classes: None means 1000 (imagenet) / 10 (cifar).
    """
    stem = check_choice("stem", stem, ("imagenet", "cifar"), name)
    nc = resolve_classes(num_classes, stem, name)
    net = _create(name, stem, nc)
    size, norm = stem_defaults(stem)
    source = None
    if stem == "imagenet":
        cfg = net.pretrained_cfg
        # ViT-B's default weights use mean/std 0.5, not the ImageNet statistics
        norm = (tuple(cfg.get("mean", norm[0])), tuple(cfg.get("std", norm[1])))
        tag = cfg.get("tag")
        source = f"timm:{cfg['architecture']}" + (f".{tag}" if tag else "")
    return classifier(name, net, norm, size, nc,
                      dict(stem=stem, num_classes=nc, pretrained_source=source))
