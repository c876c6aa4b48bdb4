"""Image reading and the two input transforms: center crop (classification), letterbox (detection)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from suite.errors import GistressError

# ultralytics pads its letterbox with gray 114; we do the same so detectors see familiar borders.
PAD_VALUE = 114


def open_image(path: str | Path) -> Image.Image:
    """Read an image file fully into memory as RGB, or raise GistressError naming the file.

    Decoding is forced (``.load()``) so that a corrupt or truncated file fails here rather than
    later; truncated images are refused even when another library has switched PIL's
    ``LOAD_TRUNCATED_IMAGES`` on, because PIL would silently pad them with gray.
    """
    path = Path(path)
    if not path.is_file():
        raise GistressError(f"image file {path} not found", "check the path and the images folder")
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with _pil_open()(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise GistressError(
            f"cannot read image {path}: {err}",
            "replace the file with a complete image (it is corrupt, truncated or not an image)",
        ) from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _pil_open():
    """PIL's own ``Image.open``.

    Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that answers a file PIL cannot
    identify by trying to pip-install a HEIF plugin, then raises ModuleNotFoundError when it is
    not there; a non-image file must stay a one-line "cannot read image" error instead.
    """
    patches = sys.modules.get("ultralytics.utils.patches")
    original = getattr(patches, "_image_open", None)
    return original if callable(original) else Image.open


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float32 tensor in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def center_crop(img: Image.Image, size: int, name: str) -> torch.Tensor:
    """Classification input: shorter side resized to ``size`` (antialiased), then a center crop.

    Images smaller than ``size`` are refused instead of upsampled: an upsampled target is blurry,
    which makes reconstruction look easier than it is.
    """
    w, h = img.size
    if min(w, h) < size:
        raise GistressError(
            f"image {name} is {w}x{h}, smaller than --size {size}",
            f"pick --size ≤ {min(w, h)} or larger images",
        )
    if min(w, h) != size:
        scale = size / min(w, h)
        new_w = size if w <= h else max(size, round(w * scale))
        new_h = size if h < w else max(size, round(h * scale))
        # PIL antialiases when it shrinks (its filter support grows with the scale factor)
        img = img.resize((new_w, new_h), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return to_tensor(img)


def letterbox(
    img: Image.Image, size: int, boxes: np.ndarray | None = None
) -> tuple[torch.Tensor, np.ndarray | None, tuple[int, int, int, int]]:
    """Detection input: fit the image into ``size``×``size`` keeping aspect ratio, pad with gray.

    Follows ultralytics' LetterBox (scale = min(size/h, size/w), padding split evenly, with its
    -0.1/+0.1 rounding). ``boxes`` are (n, 4) xyxy in original pixels; they come back scaled and
    shifted into the letterboxed image. Returns (image (3, size, size), boxes, content xyxy).
    """
    w, h = img.size
    r = min(size / w, size / h)
    new_w, new_h = max(1, round(w * r)), max(1, round(h * r))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    canvas = Image.new("RGB", (size, size), (PAD_VALUE,) * 3)
    canvas.paste(img, (left, top))
    if boxes is not None:
        # x scales by new_w / w and y by new_h / h (not exactly r, because sizes are rounded)
        scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
        boxes = boxes.astype(np.float32) * scale + np.array([left, top, left, top], dtype=np.float32)
    return to_tensor(canvas), boxes, (left, top, left + new_w, top + new_h)
