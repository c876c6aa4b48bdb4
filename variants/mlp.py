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
              activation: str = "relu") -> Variant:
    """Build the MLP at 32x32: ``depth`` hidden layers of ``hidden`` units, ``activation`` relu|sigmoid."""
    num_classes = check_positive_int("num_classes", num_classes, name)
    hidden = check_positive_int("hidden", hidden, name)
    depth = check_positive_int("depth", depth, name)
    activation = check_choice("activation", activation, tuple(ACTIVATIONS), name)
    net = MLP(3 * INPUT_SIZE * INPUT_SIZE, (hidden,) * depth, num_classes, activation)
    return classifier(name, net, (CIFAR_MEAN, CIFAR_STD), INPUT_SIZE, num_classes,
                      dict(num_classes=num_classes, hidden=hidden, depth=depth, activation=activation,
                           pretrained_source=None))
