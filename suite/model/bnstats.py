"""BatchNorm statistics as a threat level: what the server learns from BN buffers.

A client training in BN train mode normalizes each BN layer's input with the batch's own
per-channel mean and biased variance, and then updates its running buffers (PyTorch,
``momentum`` m):

    running_mean <- (1 - m) running_mean + m mean
    running_var  <- (1 - m) running_var  + m var_unbiased,   var_unbiased = var * n / (n - 1)

with n the number of elements per channel (B*H*W for a 2-D BN). A server that sees the
buffers before and after one local step can invert this exactly (``recover_batch_stats``;
with m = 0.1 it is the first paper's ``10 * after - 9 * before``). ``batch_stats`` measures the
true statistics directly: the ``bn_stats=exact`` upper bound and the oracle for tests.

Layers are named by ``model.named_modules()`` and listed in module order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from suite.errors import GistressError
from suite.model.batchnorm import BNCapture, frozen_bn_stats, modes_restored, named_bn_layers

Stats = list[tuple[str, torch.Tensor, torch.Tensor]]


def has_bn(model: nn.Module) -> bool:
    """Whether the model has any BatchNorm layer."""
    return bool(named_bn_layers(model))


def running_stats(model: nn.Module) -> Stats:
    """``(name, running_mean, running_var)`` clones for every BN layer that tracks running stats."""
    return [
        (name, m.running_mean.detach().clone(), m.running_var.detach().clone())
        for name, m in named_bn_layers(model)
        if m.running_mean is not None and m.running_var is not None
    ]


def bn_momentum(model: nn.Module) -> float:
    """The momentum shared by every stat-tracking BN layer of ``model`` (needed to invert).

    Raises if the layers disagree or use PyTorch's cumulative average (``momentum=None``).
    Libraries differ (torchvision keeps 0.1, ultralytics sets 0.03), so read it from the model
    rather than assuming the default.
    """
    values = {m.momentum for _, m in named_bn_layers(model) if m.track_running_stats}
    if not values:
        raise GistressError("the model has no BN layer that tracks running statistics",
                            "BN-statistics threat levels need BatchNorm layers with running stats")
    if None in values:
        raise GistressError("a BN layer uses momentum=None (cumulative average)",
                            "pass momentum=1/num_batches_tracked to recover_batch_stats explicitly")
    if len(values) > 1:
        raise GistressError(f"BN layers use different momenta {sorted(values)}",
                            "invert layer by layer, or give the layers one momentum")
    return float(values.pop())


def _per_layer_counts(n_per_channel, names: list[str]) -> list[int | None]:
    if n_per_channel is None:
        return [None] * len(names)
    if isinstance(n_per_channel, bool):
        raise GistressError("n_per_channel must be counts, not a bool", "use count_per_channel(model, x)")
    if isinstance(n_per_channel, int):
        counts = [n_per_channel] * len(names)
    elif isinstance(n_per_channel, Mapping):
        missing = [n for n in names if n not in n_per_channel]
        if missing:
            raise GistressError(f"n_per_channel has no count for BN layer(s) {', '.join(missing[:3])}",
                                "use count_per_channel(model, x)")
        counts = [n_per_channel[n] for n in names]
    elif isinstance(n_per_channel, Sequence) and len(n_per_channel) == len(names):
        counts = list(n_per_channel)
    else:
        raise GistressError(
            f"n_per_channel must be an int, one count per BN layer ({len(names)}), or a name->count map",
            "use count_per_channel(model, x)",
        )
    for name, n in zip(names, counts):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise GistressError(
                f"BN layer '{name}': elements per channel must be an integer >= 2, got {n!r}",
                "n is batch size x spatial size at that layer; PyTorch refuses train-mode BN with n = 1",
            )
    return counts


def recover_batch_stats(
    before: Stats,
    after: Stats,
    momentum: float | None,
    n_per_channel: int | Sequence[int] | Mapping[str, int] | None = None,
) -> Stats:
    """Invert one running-stat update: ``(name, batch mean, batch variance)`` per BN layer.

    ``before``/``after`` come from ``running_stats`` around one train-mode forward (one local
    step). mean = (after - (1-m) before) / m; the variance inverts to the UNBIASED batch
    variance, which is scaled by (n-1)/n to the biased variance BN normalizes with when
    ``n_per_channel`` is given (an int for every layer, a list in layer order, or a name->count
    map; ``count_per_channel`` computes it from the known batch shape). With
    ``n_per_channel=None`` the unbiased variance is returned as is (relative difference 1/n).

    ``momentum`` must be the BN layers' momentum in (0, 1]. PyTorch's ``momentum=None`` is a
    cumulative average whose factor is 1/num_batches_tracked: pass that number explicitly.
    """
    if momentum is None:
        raise GistressError(
            "BN momentum None is a cumulative moving average: it cannot be inverted without the count",
            "pass momentum=1/num_batches_tracked (the layer's buffer after the step), or set a BN momentum",
        )
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 < momentum <= 1.0:
        raise GistressError(
            f"BN momentum must be in (0, 1] to invert the running-stat update, got {momentum!r}",
            "momentum 0 never updates the buffers, so they reveal nothing; PyTorch's default is 0.1",
        )
    names_b, names_a = [e[0] for e in before], [e[0] for e in after]
    if names_b != names_a:
        raise GistressError("'before' and 'after' list different BN layers",
                            "take both with running_stats(model) on the same model")
    counts = _per_layer_counts(n_per_channel, names_b)
    m = float(momentum)
    out: Stats = []
    for (name, mb, vb), (_, ma, va), n in zip(before, after, counts):
        if mb.shape != ma.shape or vb.shape != va.shape:
            raise GistressError(f"BN layer '{name}' changed shape between 'before' and 'after'",
                                "take both with running_stats(model) on the same model")
        # float64 so the inversion adds no rounding to what the float32 buffers already carry
        mean = (ma.double() - (1 - m) * mb.double()) / m
        var = (va.double() - (1 - m) * vb.double()) / m
        if n is not None:
            var = var * (n - 1) / n
        out.append((name, mean.to(ma.dtype), var.to(va.dtype)))
    return out


def forward_untouched(model: nn.Module, x: torch.Tensor, train: bool):
    """``model(x)`` without gradients in train or eval mode, leaving the model as it was.

    BN layers are frozen for the call (running stats and ``num_batches_tracked`` are never
    written) and every module's train/eval flag is restored afterwards. Returns the output.
    """
    with modes_restored(model), frozen_bn_stats(model), torch.no_grad():
        model.train(train)
        return model(x)


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach().double(), dim=dims, correction=0)
    return mean.to(x.dtype), var.to(x.dtype)


def batch_stats(model: nn.Module, images: torch.Tensor) -> Stats:
    """True ``(name, mean, biased var)`` of every BN layer's input for a train-mode forward.

    This is what train-mode BN normalizes with (the ``bn_stats=exact`` grant). Statistics are
    computed in float64 from the captured inputs. The model's BN buffers (running stats,
    ``num_batches_tracked``) and train/eval flags are restored afterwards, so calling this has
    no effect on the model.
    """
    if not isinstance(images, torch.Tensor):
        raise GistressError("images must be a tensor", "pass the (B, C, H, W) batch")
    with BNCapture(model, _channel_stats) as cap:
        forward_untouched(model, images, train=True)
    return [(name, mean, var) for name, (mean, var) in cap.named_once()]


def count_per_channel(model: nn.Module, example: torch.Tensor | Sequence[int]) -> dict[str, int]:
    """Elements per channel (B*H*W) each BN layer sees for an input of this shape.

    ``example`` is an input tensor or its shape; a shape is filled with zeros on the model's
    device. The attacker knows the batch size and image size (SoK level 0), so this is fair to
    use with ``recover_batch_stats``. Runs in eval mode and restores the model.
    """
    if not isinstance(example, torch.Tensor):
        try:
            shape = tuple(int(s) for s in example)
        except (TypeError, ValueError):
            raise GistressError("example must be an input tensor or its shape",
                                "pass e.g. (4, 3, 32, 32)") from None
        p = next(model.parameters(), None)
        example = torch.zeros(shape, device=p.device if p is not None else "cpu",
                              dtype=p.dtype if p is not None else torch.float32)
    with BNCapture(model, lambda x: x.numel() // x.shape[1]) as cap:
        forward_untouched(model, example, train=False)
    return dict(cap.named_once())
