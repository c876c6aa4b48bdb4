"""ImageFolder trees (ImageNet-val layout): one sub-folder per class, class index = sorted order."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from suite.data.transforms import open_image
from suite.errors import GistressError, close_matches

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})


class ImageFolderSource:
    """Images under ``root/<class>/<file>``, ordered by class folder then file name.

    Names are relative paths with '/' ("n01440764/x.JPEG"); an image may also be named by its
    position in that order. Hidden entries and files without an image extension are skipped.
    """

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise GistressError(f"ImageFolder root {root} not found", "check the path after 'imagefolder:'")
        self.root = root
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.names: list[str] = []
        self.labels: list[int] = []
        for label, cls in enumerate(self.classes):
            files = sorted(
                p.name
                for p in (root / cls).iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            self.names.extend(f"{cls}/{f}" for f in files)
            self.labels.extend([label] * len(files))
        if not self.names:
            raise GistressError(
                f"no images in {root} (expected one sub-folder per class holding image files)",
                "point imagefolder:<root> at a folder like ImageNet val/ with class sub-folders",
            )
        self._index = {n: i for i, n in enumerate(self.names)}

    def find(self, key: str) -> int:
        """The position of image ``key``: a relative path "class/file" or an index."""
        rel = key.replace("\\", "/").strip("/")
        if rel in self._index:
            return self._index[rel]
        if key.isdigit():
            i = int(key)
            if i < len(self.names):
                return i
            raise GistressError(
                f"image index {i} out of range: {self.root} has {len(self.names)} images",
                f"use indices 0..{len(self.names) - 1}",
            )
        near = close_matches(rel, self.names)
        raise GistressError(
            f"image '{key}' not found in {self.root}" + (f"; close: {near}" if near else ""),
            "name images by relative path 'class_folder/file' or by index",
        )

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Image ``i`` and its class index."""
        return open_image(self.root / self.names[i]), self.labels[i]
