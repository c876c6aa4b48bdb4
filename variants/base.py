"""The Variant record and the one registry every architecture family registers into.

``build(name, **options)`` feels like timm's ``create_model``: the family builder receives the
options it declares; unknown options are an error naming the valid ones.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import nn

from suite.errors import GistressError, close_matches

Task = Literal["classification", "detection"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

# the family modules that register named variants, in listing order
FAMILIES = ("resnet", "convnet", "lenet", "mlp", "modern", "yolo")
# libraries whose every classifier builds as ``<library>:<model>``
EXTERNAL_LIBRARIES = ("timm", "torchvision")


class VariantName(NamedTuple):
    """A parsed variant name: ``library`` is ``timm``/``torchvision`` for an external model (then
    ``model`` is that library's name for it) and None for a registry name (``model`` is the name)."""

    library: str | None
    model: str

    @property
    def external(self) -> bool:
        """Whether the name is ``timm:<model>``/``torchvision:<model>`` rather than a registry name."""
        return self.library is not None


def parse_variant_name(name: str) -> VariantName:
    """The one parser of variant names: ``timm:<model>`` and ``torchvision:<model>`` are external
    models; any other name (one with another prefix included) is a registry name, as it is."""
    library, sep, model = name.partition(":")
    if sep and library in EXTERNAL_LIBRARIES:
        return VariantName(library, model)
    return VariantName(None, name)


class Normalized(nn.Module):
    """Wraps a network so that it takes images in [0, 1] and normalizes inside."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@dataclass
class Variant:
    """A built architecture: the module (taking [0, 1] images) and what the suite needs to know.

    ``model`` normalizes internally; ``normalization`` is (mean, std) so that callers working in
    normalized space (noisy-target init) can convert. For detection variants ``model`` is the
    ultralytics ``DetectionModel`` itself (it takes [0, 1] input, identity normalization).
    """

    name: str
    model: nn.Module
    task: Task
    input_size: int
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    num_classes: int
    options: dict = field(default_factory=dict)
    weights: str = "random"

    @property
    def num_params(self) -> int:
        """Number of parameters of the model (trainable or not)."""
        return sum(p.numel() for p in self.model.parameters())

    def to_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the network's normalized input space."""
        mean = torch.tensor(self.normalization[0], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.normalization[1], device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def from_normalized(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized input space -> [0, 1] pixels (not clamped)."""
        mean = torch.tensor(self.normalization[0], device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.normalization[1], device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
        return z * std + mean


def classifier(name: str, net: nn.Module, norm, input_size: int, num_classes: int, options: dict,
               weights: str = "random") -> Variant:
    """A classification Variant whose module normalizes ``[0, 1]`` input with ``norm`` inside."""
    return Variant(name=name, model=Normalized(net, *norm), task="classification", input_size=input_size,
                   normalization=norm, num_classes=num_classes, options=options, weights=weights)


@dataclass(frozen=True)
class VariantEntry:
    """A registry row: how to build a named variant and what to list about it."""

    name: str
    task: Task
    input_size: int
    builder: Callable[..., Variant]
    description: str = ""
    defaults: dict = field(default_factory=dict)

    def option_names(self) -> list[str]:
        """The options the builder declares (its keyword parameters but ``name``)."""
        sig = inspect.signature(self.builder)
        return [p for p in sig.parameters if p != "name"]


_REGISTRY: dict[str, VariantEntry] = {}
_families_loaded = False


def _load_families() -> None:
    global _families_loaded
    if _families_loaded:
        return
    _families_loaded = True
    for fam in FAMILIES:
        importlib.import_module(f"variants.{fam}")


def register(name: str, task: Task, input_size: int, description: str = "", **defaults):
    """Decorator: register ``builder(name=..., **options) -> Variant`` under ``name``."""

    def deco(builder):
        _REGISTRY[name] = VariantEntry(name, task, input_size, builder, description, dict(defaults))
        return builder

    return deco


def entries() -> dict[str, VariantEntry]:
    """All registered variants, by name (families are imported on first use)."""
    _load_families()
    # family order, whatever order the family modules happened to be imported in
    rank = {f"variants.{fam}": i for i, fam in enumerate(FAMILIES)}
    order = sorted(_REGISTRY.values(), key=lambda e: rank.get(e.builder.__module__, len(rank)))
    return {e.name: e for e in order}


def lookup(name: str) -> VariantEntry:
    """The registry entry for ``name``; a clear error with close matches if unknown."""
    table = entries()
    if name in table:
        return table[name]
    near = close_matches(name, table)
    hint = f"did you mean {near}?" if near else "run `gistress variants` for the list"
    raise GistressError(
        f"unknown variant '{name}'",
        f"{hint} (any timm model as timm:<name>, any torchvision model as torchvision:<name>)",
    )


def task_of(name: str) -> Task:
    """The one rule for the task of a variant name, without building it: ``timm:``/
    ``torchvision:`` models are classifiers, a registry name has its entry's task (an unknown
    name is a GistressError with close matches). A built Variant's ``task`` agrees with it."""
    if parse_variant_name(name).external:
        return "classification"
    return lookup(name).task


def check_options(entry_name: str, builder, options: dict) -> None:
    """Reject options the builder does not declare, naming the valid ones."""
    sig = inspect.signature(builder)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [p for p in sig.parameters if p != "name"]
    for key in options:
        if key not in valid:
            near = close_matches(key, valid, n=1)  # one suggestion: the nearest
            extra = f"did you mean '{near}'? " if near else ""
            raise GistressError(
                f"unknown option '{key}' for variant '{entry_name}'",
                f"{extra}valid options: {', '.join(valid)}",
            )
