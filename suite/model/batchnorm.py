"""BatchNorm handling in one place: finding the layers, freezing their running statistics,
restoring train/eval flags, and capturing what each layer sees in a forward pass.

Freezing means ``track_running_stats = False``: a train-mode forward still normalizes with the
batch's own statistics (the same output and gradients as a tracking layer; checked bit for bit on
CPU) but writes neither the running mean/variance nor ``num_batches_tracked``; an eval-mode
forward keeps normalizing with the stored running statistics. Every caller that must not drift a model's
BN state uses it: the attacker's copy of the server model (for good), the detection loss and the
no-side-effect forwards of ``suite.model.bnstats`` (for one block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from suite.errors import GistressError

BatchNorm = nn.modules.batchnorm._BatchNorm


def named_bn_layers(model: nn.Module) -> list[tuple[str, BatchNorm]]:
    """Every BatchNorm layer (any dimension, subclasses included) with its name, in module order."""
    if not isinstance(model, nn.Module):
        raise GistressError(f"expected a torch.nn.Module, got {type(model).__name__}", "pass the model")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BatchNorm)]


def freeze_bn_stats(model: nn.Module) -> list[tuple[BatchNorm, bool]]:
    """Stop every BN layer of ``model`` from writing its running statistics, for good.

    Sets ``track_running_stats = False`` (see the module notes for what that keeps and what it
    stops). Returns each layer's previous flag, which ``frozen_bn_stats`` restores.
    """
    saved = [(m, m.track_running_stats) for _, m in named_bn_layers(model)]
    for m, _ in saved:
        m.track_running_stats = False
    return saved


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, BN layers never write their running statistics (``freeze_bn_stats``);
    each layer's ``track_running_stats`` flag is restored afterwards."""
    saved = freeze_bn_stats(model)
    try:
        yield model
    finally:
        for m, flag in saved:
            m.track_running_stats = flag


@contextlib.contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model's train/eval flags may change; every module's own ``training``
    flag is put back afterwards (not ``model.train(...)``, which would flatten per-module flags
    such as a detection head kept in training format)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class BNCapture:
    """Forward pre-hooks on every BN layer that record ``fn(layer input)`` at each call.

    The hooks are registered on construction and removed by ``remove()`` (or on leaving a
    ``with`` block). Only each layer's latest value is kept, so a capture left in place over many
    forwards holds one value per layer. Results are in module-registration order (the order of
    ``model.modules()``), whatever order the layers execute in (YOLO's C2f registers its output
    conv before its bottlenecks); layers the forward pass never reached are left out.
    """

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], object]):
        self.layers = named_bn_layers(model)
        self.fn = fn
        self._last: dict[int, object] = {}
        self._calls: dict[int, int] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(_module, args):
            self._last[index] = self.fn(args[0])
            self._calls[index] = self._calls.get(index, 0) + 1

        return hook

    def __enter__(self) -> BNCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def clear(self) -> None:
        """Forget everything recorded so far (the hooks stay)."""
        self._last, self._calls = {}, {}

    def remove(self) -> None:
        """Remove the hooks (what was recorded stays readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def values(self) -> list:
        """Each reached layer's latest value, in module order."""
        return [self._last[i] for i in range(len(self.layers)) if i in self._last]

    def named_once(self) -> list[tuple[str, object]]:
        """``(name, value)`` of each reached layer, in module order; a GistressError if a layer
        ran more than once (its per-layer value would be ambiguous)."""
        out = []
        for i, (name, _) in enumerate(self.layers):
            calls = self._calls.get(i, 0)
            if calls > 1:
                raise GistressError(
                    f"BN layer '{name}' ran {calls} times in one forward pass",
                    "per-layer statistics are ambiguous for a reused BN module",
                )
            if calls:
                out.append((name, self._last[i]))
        return out
