"""The sigmoid LeNet of Deep Leakage from Gradients (Zhu et al. 2019), the DLG baseline model.

Three 5x5 convolutions (12 channels; strides 2, 2, 1) with sigmoid activations and one linear
layer on the 12x8x8 map. All weights and biases are drawn from U(-0.5, 0.5) as in DLG's code;
that wide initialization (not PyTorch's default) is what makes the baseline attack converge.
DLG works on [0, 1] pixels, so the normalization is the identity.
"""

from __future__ import annotations

from torch import nn

from variants.base import IDENTITY_NORM, Variant, classifier, register
from variants.resnet import check_positive_int

INPUT_SIZE = 32


class LeNet(nn.Module):
    """DLG's LeNet for 32x32 RGB input."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(12 * 8 * 8, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(m.weight, -0.5, 0.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


@register("lenet", "classification", INPUT_SIZE, "DLG sigmoid LeNet (Zhu et al. 2019), U(-0.5, 0.5) init")
def build_lenet(name: str, num_classes: int = 10) -> Variant:
    """Build DLG's LeNet at 32x32 with identity normalization ([0, 1] pixels in)."""
    num_classes = check_positive_int("num_classes", num_classes, name)
    return classifier(name, LeNet(num_classes), IDENTITY_NORM, INPUT_SIZE, num_classes,
                      dict(num_classes=num_classes, pretrained_source=None))
