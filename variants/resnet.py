"""ResNet family: post-activation (torchvision-style) and pre-activation BasicBlock ResNets.

Both share one configurable trunk so the skip-connection ablation (SoK Fig. 9), the CIFAR stem
and the base width apply to either block type. Post-activation module names follow torchvision
(``conv1``, ``bn1``, ``layer1.0.downsample.0``, ``fc``), so torchvision's ImageNet weights load
as they are.

This module also holds the small option checks shared by the classification families.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from suite.errors import GistressError, close_matches
from variants.base import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Variant,
    classifier,
    register,
)

# ---------------------------------------------------------------- shared option checks


def check_choice(option: str, value, allowed: Iterable[str], variant: str):
    """Return ``value`` if it is one of ``allowed``; otherwise a GistressError naming the choices."""
    allowed = list(allowed)
    if value in allowed:
        return value
    near = close_matches(str(value), allowed)
    extra = f"did you mean '{near}'? " if near else ""
    raise GistressError(
        f"{variant}: {option}={value!r} is not one of {', '.join(allowed)}",
        f"{extra}pass {option}=<{'|'.join(allowed)}>",
    )


def check_positive_int(option: str, value, variant: str) -> int:
    """Return ``value`` as an int if it is a positive integer; otherwise a GistressError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GistressError(
            f"{variant}: {option}={value!r} must be a positive integer", f"pass e.g. {option}=10"
        )
    return value


def resolve_classes(num_classes, stem: str, variant: str) -> int:
    """``num_classes=None`` means "by stem": 1000 for the ImageNet stem, 10 for the CIFAR stem."""
    if num_classes is None:
        return 1000 if stem == "imagenet" else 10
    return check_positive_int("num_classes", num_classes, variant)


def stem_defaults(stem: str) -> tuple[int, tuple]:
    """Input size and (mean, std) that go with a stem."""
    if stem == "imagenet":
        return 224, (IMAGENET_MEAN, IMAGENET_STD)
    return 32, (CIFAR_MEAN, CIFAR_STD)


# ---------------------------------------------------------------- blocks


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block: conv-BN-ReLU-conv-BN, + shortcut, ReLU (He et al. 2015)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, skip: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        # not in-place: hooks that record BN outputs (BN prior) must see them unmodified
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = skip
        # a cut block loses its projection too: nothing carries the input past the block
        self.downsample = None
        if skip and (stride != 1 or cin != cout):
            self.downsample = nn.Sequential(_conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.skip:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.relu(out)


class PreActBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv + identity (He et al. 2016).

    A projection shortcut (1x1 conv, no BN) takes the pre-activated input, as in the paper's
    code, so every path out of the block starts after the same BN-ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, skip: bool = True):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(cout, cout)
        self.skip = skip
        self.shortcut = None
        if skip and (stride != 1 or cin != cout):
            self.shortcut = _conv1x1(cin, cout, stride)

    def forward(self, x):
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(pre))))
        if self.skip:
            out = out + (x if self.shortcut is None else self.shortcut(pre))
        return out


class ResNet(nn.Module):
    """A four-stage BasicBlock ResNet with a choice of stem, block type and base width.

    Pre-activation nets have no BN-ReLU in the stem (each block starts with one) and end with a
    final BN-ReLU before pooling.
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        preact: bool = False,
        stem: str = "imagenet",
        width: int = 64,
        num_classes: int = 1000,
        cut: frozenset[int] = frozenset(),
    ):
        super().__init__()
        self.preact = preact
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(3, width)
        if not preact:
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        block = PreActBlock if preact else BasicBlock
        cin, index = width, 0
        for stage, depth in enumerate(layers):
            cout = width * 2**stage
            blocks = []
            for i in range(depth):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(block(cin, cout, stride, skip=index not in cut))
                cin, index = cout, index + 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        if preact:
            self.bn_final = nn.BatchNorm2d(cin)
            self.relu_final = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[nn.Module]:
        """All residual blocks in order (the indices ``cut_skips`` refers to)."""
        return [b for s in (self.layer1, self.layer2, self.layer3, self.layer4) for b in s]

    def forward(self, x):
        x = self.conv1(x)
        if not self.preact:
            x = self.relu(self.bn1(x))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.preact:
            x = self.relu_final(self.bn_final(x))
        return self.fc(self.avgpool(x).flatten(1))


# ---------------------------------------------------------------- registry

_LAYERS = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "preact_resnet18": ((2, 2, 2, 2), True),
    "preact_resnet34": ((3, 4, 6, 3), True),
}


def _resolve_cuts(cut_skips, n_blocks: int, variant: str) -> list[int]:
    """Normalize ``cut_skips`` ("all", an int, "0,3" or a list of ints) to sorted block indices."""
    if cut_skips is None:
        return []
    if cut_skips == "all":
        return list(range(n_blocks))
    items = cut_skips
    if isinstance(items, str):
        items = [s for s in items.replace(" ", "").split(",") if s]
    elif isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    try:
        indices = sorted({int(i) for i in items})
    except (TypeError, ValueError):
        raise GistressError(
            f"{variant}: cut_skips={cut_skips!r} is not a list of block indices",
            f'pass cut_skips=[0, 3] (blocks 0..{n_blocks - 1}) or cut_skips="all"',
        ) from None
    bad = [i for i in indices if not 0 <= i < n_blocks]
    if bad:
        raise GistressError(
            f"{variant}: cut_skips {bad} out of range; this net has {n_blocks} residual blocks",
            f"use indices 0..{n_blocks - 1}",
        )
    return indices


# decorators apply bottom-up: the registry (and the listing) reads resnet18 first
@register("preact_resnet34", "classification", 224, "ResNet-34 with identity-mapping pre-activation blocks")
@register("preact_resnet18", "classification", 224, "ResNet-18 with identity-mapping pre-activation blocks")
@register("resnet34", "classification", 224, "ResNet-34, post-activation BasicBlocks (torchvision layout)")
@register("resnet18", "classification", 224, "ResNet-18, post-activation BasicBlocks (torchvision layout)")
def build_resnet(
    name: str,
    stem: str = "imagenet",
    width: int = 64,
    num_classes: int | None = None,
    cut_skips: list[int] | str | None = None,
) -> Variant:
    """Build a (pre-activation) ResNet-18/34.

    stem: ``imagenet`` (7x7 stride-2 conv + max-pool, input 224) or ``cifar`` (3x3 stride-1
    conv, no max-pool, input 32). width: channels of the first stage (64 standard, 128 as in the
    pre-activation CIFAR experiments). num_classes: None means 1000 (imagenet) / 10 (cifar).
    cut_skips: residual blocks (0-based over all blocks) whose shortcut is removed, or "all".
    """
    layers, preact = _LAYERS[name]
    stem = check_choice("stem", stem, ("imagenet", "cifar"), name)
    width = check_positive_int("width", width, name)
    nc = resolve_classes(num_classes, stem, name)
    cuts = _resolve_cuts(cut_skips, sum(layers), name)
    net = ResNet(layers, preact=preact, stem=stem, width=width, num_classes=nc, cut=frozenset(cuts))
    size, norm = stem_defaults(stem)
    # torchvision publishes ImageNet weights only for the plain post-activation layout
    stock = not preact and stem == "imagenet" and width == 64 and not cuts
    options = dict(
        stem=stem,
        width=width,
        num_classes=nc,
        cut_skips=cuts,
        pretrained_source=f"torchvision:{name}" if stock else None,
    )
    return classifier(name, net, norm, size, nc, options)
