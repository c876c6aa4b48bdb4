"""The multilayer perceptron of federated learning's first experiments: the "2NN" of McMahan et al.
(2017), two hidden layers of 200 units with ReLU, on the flattened image.

Its first layer is dense with a bias, the structure the linear closed form reads an image off
(``suite/attack/closed_form.py``). CIFAR normalization at 32 px.
"""

from __future__ import annotations

from torch import nn

from variants.base import CIFAR_MEAN, CIFAR_STD, Variant, classifier, register
from variants.resnet import check_choice, check_positive_int

INPUT_SIZE = 32
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` dense layers with an activation, then the classifier."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, activation: str):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


@register("mlp", "classification", INPUT_SIZE, "2NN MLP of McMahan et al. 2017 (2 x 200, ReLU); dense first layer")
def build_mlp(name: str, num_classes: int = 10, hidden: int = 200, depth: int = 2,
              activation: str = "relu", input_size: int = INPUT_SIZE) -> Variant:
    """Build the MLP: ``depth`` hidden layers of ``hidden`` units, ``activation`` relu|sigmoid, on
    ``input_size`` x ``input_size`` images (32 by default)."""
    num_classes = check_positive_int("num_classes", num_classes, name)
    hidden = check_positive_int("hidden", hidden, name)
    depth = check_positive_int("depth", depth, name)
    activation = check_choice("activation", activation, tuple(ACTIVATIONS), name)
    input_size = check_positive_int("input_size", input_size, name)
    net = MLP(3 * input_size * input_size, (hidden,) * depth, num_classes, activation)
    return classifier(name, net, (CIFAR_MEAN, CIFAR_STD), input_size, num_classes,
                      dict(num_classes=num_classes, hidden=hidden, depth=depth, activation=activation,
                           input_size=input_size, pretrained_source=None))
