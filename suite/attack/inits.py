"""Attacker start images. ``random_init`` draws the seeded random starts the attacker makes itself;
``noisy_target`` derives the start from the target: it is built by the caller (the runner), handed
to the attacker as an explicit init, and tagged as an oracle."""

from __future__ import annotations

from pathlib import Path

import torch

from suite.errors import GistressError


def random_init(shape, normalization, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """A random start in pixel space: ``randn`` draws N(0, 1) in the network's normalized space
    (DLG's start), ``uniform`` draws U(0, 1) pixels."""
    if distribution == "uniform":
        return torch.rand(shape, generator=generator)
    mean = torch.tensor(normalization[0]).view(1, -1, 1, 1)
    std = torch.tensor(normalization[1]).view(1, -1, 1, 1)
    return torch.randn(shape, generator=generator) * std + mean


def noisy_target(images: torch.Tensor, normalization, *, p: float | None, sigma: float | None,
                 generator: torch.Generator) -> torch.Tensor:
    """The target with a fraction ``p`` of pixel positions (one mask shared across channels)
    replaced by N(0, 1) noise in normalized space, plus additive Gaussian ``sigma`` noise
    (normalized space) when given. Returns pixels (not clamped)."""
    mean = torch.tensor(normalization[0]).view(1, -1, 1, 1)
    std = torch.tensor(normalization[1]).view(1, -1, 1, 1)
    z = (images.cpu() - mean) / std
    if p:
        b, _, h, w = z.shape
        mask = torch.rand((b, 1, h, w), generator=generator) < p
        noise = torch.randn(z.shape, generator=generator)
        z = torch.where(mask.expand_as(z), noise, z)
    if sigma:
        z = z + sigma * torch.randn(z.shape, generator=generator)
    return z * std + mean


def from_file(path: str, batch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """A start image read from ``path``, resized to ``size`` and repeated over the batch."""
    from suite.data.transforms import open_image

    file = Path(path)
    if not file.is_file():
        raise GistressError(f"init file {path} does not exist", "pass an existing image file")
    try:
        im = open_image(file).resize((size[1], size[0]))  # the suite's reader: corrupt files fail cleanly
    except GistressError as exc:
        raise GistressError(f"init file {path} is not a readable image ({exc.message})", "pass a PNG or JPEG") from None
    import numpy as np

    x = torch.from_numpy(np.asarray(im, dtype="float32") / 255.0).permute(2, 0, 1)
    return x.unsqueeze(0).repeat(batch_size, 1, 1, 1)
