"""Image files: PNGs of tensors, boxes drawn on targets, and a side-by-side grid per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    arr = (x.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def tile(images: torch.Tensor) -> Image.Image:
    """A batch (B, 3, H, W) laid out in one row."""
    pils = [to_pil(im) for im in images]
    w, h = pils[0].size
    out = Image.new("RGB", (w * len(pils), h), "white")
    for i, im in enumerate(pils):
        out.paste(im, (i * w, 0))
    return out


def draw_boxes(img: Image.Image, boxes: list[torch.Tensor] | None, offset_w: int | None = None) -> Image.Image:
    """Draws each image's xyxy boxes on a tiled row (image i starts at i * offset_w)."""
    if not boxes:
        return img
    img = img.copy()
    d = ImageDraw.Draw(img)
    w = offset_w or img.size[0]
    for i, bx in enumerate(boxes):
        for b in bx.tolist():
            d.rectangle([b[0] + i * w, b[1], b[2] + i * w, b[3]], outline=(255, 40, 40), width=2)
    return img


LEGIBLE_PX = 256  # the long side of an upscaled copy: a 32-pixel image is a smudge at its own size


def upscale_factor(size: tuple[int, int], long_side: int = LEGIBLE_PX) -> int:
    """The integer factor that brings an image's long side to at least ``long_side`` (1: no need)."""
    return max(1, -(-long_side // max(size)))


def save_png(images: torch.Tensor, path: Path, boxes=None, *, scale: int = 1) -> Path:
    """Saves a batch as one PNG row (boxes drawn when given), ``scale`` times larger with
    nearest-neighbour upscaling (each pixel a visible block, nothing smoothed or invented)."""
    img = tile(images)
    if boxes is not None:
        img = draw_boxes(img, boxes, images.shape[-1])
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def side_by_side(rows: list[tuple[str, torch.Tensor]], path: Path, boxes=None) -> Path:
    """A grid with one labelled row per entry (target, init, reconstruction, control)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = rows[0][1].shape[0]
    fig, axes = plt.subplots(n, len(rows), figsize=(2.2 * len(rows), 2.2 * n), squeeze=False)
    for j, (title, imgs) in enumerate(rows):
        for i in range(n):
            ax = axes[i][j]
            pil = to_pil(imgs[i])
            if boxes is not None and title == "target":
                pil = draw_boxes(pil, [boxes[i]])
            ax.imshow(pil, interpolation="nearest")  # pixels as they are, not smoothed
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
