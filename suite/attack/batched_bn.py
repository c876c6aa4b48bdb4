"""Batch normalization under ``torch.func.vmap``, for batched restarts (``restart_mode``).

R restarts run as one vmapped objective only where train-mode BN can be vmapped correctly: a
plain ``_BatchNorm`` layer runs as its composite mean/var formula while the restarts are
vmapped (``vmappable_batch_norm``); a BN subclass with its own forward (timm's
``BatchNormAct2d``) cannot be swapped that way and keeps restarts sequential
(``own_forward_bn_layers``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from suite.model.batchnorm import BatchNorm, named_bn_layers


def train_mode_bn_layers(model: nn.Module) -> list[BatchNorm]:
    """The model's BN layers in train mode (batch statistics), in module order."""
    return [m for _, m in named_bn_layers(model) if m.training]


def own_forward_bn_layers(model: nn.Module) -> list[BatchNorm]:
    """Train-mode BN layers whose class overrides ``_BatchNorm.forward`` (vmap cannot batch them
    correctly, and the composite formula would not be their forward)."""
    return [m for m in train_mode_bn_layers(model) if type(m).forward is not BatchNorm.forward]


@contextlib.contextmanager
def vmappable_batch_norm(model: nn.Module) -> Iterator[nn.Module]:
    """Train-mode BN layers as their composite formula while restarts are vmapped.

    The fused op cannot run under vmap with running-stat buffers (an in-place update of a
    batched input), and without them its double backward under vmap is wrong: 0.3-0.5 %
    relative error in float64 against finite differences, while the composite mean/var formula
    agrees to 1e-16 (functorch issue #534, still open). Buffers are left untouched; each layer's
    own forward is back after the block.
    """
    layers = train_mode_bn_layers(model)
    for m in layers:
        m.forward = _composite_bn_forward(m)
    try:
        yield model
    finally:
        for m in layers:
            del m.forward


def _composite_bn_forward(m: BatchNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + m.eps)
        if m.affine:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * m.weight.view(shape) + m.bias.view(shape)
        return y

    return forward
