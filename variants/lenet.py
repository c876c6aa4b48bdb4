"""The sigmoid LeNet of Deep Leakage from Gradients (Zhu et al. 2019), the DLG baseline model.

Three 5x5 convolutions (12 channels; strides 2, 2, 1) with sigmoid activations and one linear
layer on the 12x8x8 map (12 x input_size/4 x input_size/4 with the ``input_size`` option, which
scales the same network to larger images: the audit's 224 px positive control). All weights and biases are drawn from U(-0.5, 0.5) as in DLG's code;
that wide initialization (not PyTorch's default) is what makes the baseline attack converge.
DLG works on [0, 1] pixels, so the normalization is the identity.
"""

from __future__ import annotations

from torch import nn

from suite.errors import GistressError
from variants.base import IDENTITY_NORM, Variant, classifier, register
from variants.resnet import check_positive_int

INPUT_SIZE = 32


class LeNet(nn.Module):
    """DLG's LeNet for RGB input of ``input_size`` pixels (32 in DLG)."""

    def __init__(self, num_classes: int = 10, input_size: int = INPUT_SIZE):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * (input_size // 4) ** 2, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(m.weight, -0.5, 0.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@register("lenet", "classification", INPUT_SIZE, "DLG sigmoid LeNet (Zhu et al. 2019), U(-0.5, 0.5) init")
def build_lenet(name: str, num_classes: int = 10, input_size: int = INPUT_SIZE) -> Variant:
    """Build DLG's LeNet with identity normalization ([0, 1] pixels in), at 32x32 by default;
    ``input_size`` (a multiple of 4) widens only its linear layer, for larger images."""
    num_classes = check_positive_int("num_classes", num_classes, name)
    input_size = check_positive_int("input_size", input_size, name)
    if input_size % 4:
        raise GistressError(f"{name}: input_size={input_size} must be a multiple of 4 (two stride-2 convolutions)",
                            "pass e.g. input_size=32 or input_size=224")
    return classifier(name, LeNet(num_classes, input_size), IDENTITY_NORM, input_size, num_classes,
                      dict(num_classes=num_classes, input_size=input_size, pretrained_source=None))
