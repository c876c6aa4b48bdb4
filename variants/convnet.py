"""The configurable ConvNet used for micro-design ablations (Geiping et al. 2020; SoK Tab. 4).

The standard configuration has biased 3x3 convolutions with padding 1, ReLU, two max-pool
layers and one dropout layer before the classifier, and no BatchNorm. Every micro design is a
knob so that one ablation changes exactly one thing. Eight conv layers widen w -> 2w -> 4w
in the pattern of Geiping et al.'s ConvNet.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from suite.errors import GistressError
from variants.base import CIFAR_MEAN, CIFAR_STD, Variant, classifier, register
from variants.resnet import check_choice, check_positive_int

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "none": nn.Identity,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}

# (output width as a multiple of the base width, max-pool after this conv)
_PLAN = ((1, False), (2, False), (2, False), (4, False), (4, False), (4, True), (4, False), (4, True))
INPUT_SIZE = 32


def _features(activation, pooling, kernel_size, padding, bias, width, batchnorm) -> nn.Sequential:
    layers, cin = [], 3
    for i, (mult, pool_after) in enumerate(_PLAN):
        cout = width * mult
        layers.append((f"conv{i}", nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=bias)))
        if batchnorm:
            layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
        layers.append((f"act{i}", _ACTIVATIONS[activation]()))
        if pool_after and pooling == "max":
            # ceil_mode keeps odd maps (large kernels shrink them) from losing a row
            layers.append((f"pool{i}", nn.MaxPool2d(2, ceil_mode=True)))
        cin = cout
    return nn.Sequential(OrderedDict(layers))


class ConvNet(nn.Module):
    """Eight conv layers (+ optional BN), activation, two max-pools, dropout, one linear layer."""

    def __init__(self, features: nn.Sequential, flat: int, dropout: float, num_classes: int):
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(flat, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.features(x).flatten(1)))


@register("convnet", "classification", INPUT_SIZE, "Configurable ConvNet for micro-design ablations (SoK Tab. 4)")
def build_convnet(
    name: str,
    activation: str = "relu",
    pooling: str = "max",
    dropout: float = 0.0,
    kernel_size: int = 3,
    padding: int = 1,
    bias: bool = True,
    width: int = 32,
    num_classes: int = 10,
    batchnorm: bool = False,
) -> Variant:
    """Build the ConvNet at 32x32 with CIFAR normalization.

    activation: relu | none | sigmoid | tanh | leaky_relu | gelu. pooling: max | none.
    dropout: probability of the dropout layer before the classifier (0 keeps the layer as a
    no-op). kernel_size / padding / bias apply to every conv layer; width is the first layer's
    channel count; batchnorm adds BN after every conv.
    """
    activation = check_choice("activation", activation, _ACTIVATIONS, name)
    pooling = check_choice("pooling", pooling, ("max", "none"), name)
    kernel_size = check_positive_int("kernel_size", kernel_size, name)
    width = check_positive_int("width", width, name)
    num_classes = check_positive_int("num_classes", num_classes, name)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise GistressError(f"{name}: padding={padding!r} must be an integer >= 0", "pass e.g. padding=1")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise GistressError(f"{name}: dropout={dropout!r} must be in [0, 1)", "pass e.g. dropout=0.5")
    features = _features(activation, pooling, kernel_size, padding, bool(bias), width, bool(batchnorm))
    # the flatten size depends on every knob; measure it instead of deriving it
    try:
        with torch.no_grad():
            flat = features.eval()(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)).flatten(1).shape[1]
    except RuntimeError:
        flat = 0
    if flat == 0:
        raise GistressError(
            f"{name}: kernel_size={kernel_size} with padding={padding} shrinks the 32x32 input to nothing",
            f"use padding >= {(kernel_size - 1) // 2} or a smaller kernel_size",
        )
    features.train()
    net = ConvNet(features, flat, float(dropout), num_classes)
    norm = (CIFAR_MEAN, CIFAR_STD)
    options = dict(
        activation=activation,
        pooling=pooling,
        dropout=float(dropout),
        kernel_size=kernel_size,
        padding=padding,
        bias=bool(bias),
        width=width,
        num_classes=num_classes,
        batchnorm=bool(batchnorm),
        pretrained_source=None,
    )
    return classifier(name, net, norm, INPUT_SIZE, num_classes, options)
