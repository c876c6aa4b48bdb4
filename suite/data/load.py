"""``load()``: one entry point from a source string to a ``Batch``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from suite.data.batch import Batch
from suite.data.transforms import center_crop, letterbox
from suite.errors import GistressError, close_matches

TASKS = ("classification", "detection")
SCHEMES = {
    "samples": "samples",
    "cifar10": "cifar10:<root>",
    "imagefolder": "imagefolder:<root>",
    "coco": "coco:<images_dir>:<annotations.json>",
}


def load(
    source: str,
    *,
    task: str,
    size: int,
    images: list[str] | None = None,
    count: int | None = None,
    num_classes: int | None = None,
    seed: int = 0,
) -> Batch:
    """Load a batch of images (with labels or boxes) from ``source``.

    source:      ``samples``, ``cifar10:<root>``, ``imagefolder:<root>`` or
                 ``coco:<images_dir>:<annotations.json>`` (detection only).
    task:        ``classification`` (center crop, labels) or ``detection`` (letterbox, boxes).
    size:        side of the square input in pixels.
    images:      items by name: sample name, CIFAR index, ImageFolder relative path or index,
                 COCO image id or file name. Takes precedence over ``count``.
    count:       else this many items: the first ones when ``seed`` is 0, a seeded random pick
                 otherwise. Default one item.
    num_classes: labels (or detection classes) must be below it; samples' labels wrap at it.
    seed:        see ``count``.

    Every bad input raises ``GistressError`` with the problem and the fix.
    """
    if task not in TASKS:
        raise GistressError(f"unknown task '{task}'", f"use one of: {', '.join(TASKS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise GistressError(f"size {size!r} is not a positive integer", "pass --size like 32, 224 or 640")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise GistressError(f"num_classes {num_classes!r} is not a positive integer", "pass e.g. 10 or 1000")
    src = _open_source(source, task, num_classes)
    picks = _select(src, images, count, seed)
    if task == "classification":
        return _classification_batch(src, picks, size, num_classes)
    return _detection_batch(src, picks, size, num_classes)


def _open_source(source: str, task: str, num_classes: int | None):
    """Parse the source string and build its reader (nothing is decoded yet)."""
    scheme, _, rest = source.partition(":")
    if scheme not in SCHEMES:
        near = close_matches(scheme, SCHEMES)
        raise GistressError(
            f"unknown data source '{source}'" + (f"; did you mean {near}?" if near else ""),
            f"use one of: {', '.join(SCHEMES.values())}",
        )
    if scheme != "samples" and not rest:
        raise GistressError(f"data source '{source}' lacks a path", f"write it as {SCHEMES[scheme]}")
    if scheme == "coco" and task != "detection":
        raise GistressError(
            "the coco source is for detection only",
            "pass --task detection, or use imagefolder:/cifar10: for classification",
        )
    if scheme in ("cifar10", "imagefolder") and task != "classification":
        raise GistressError(
            f"the {scheme} source has no boxes, so it serves classification only",
            "use coco:<images_dir>:<json> or the samples bus/zidane for detection",
        )
    if scheme == "samples":
        from suite.data.samples import SampleDetectionSource, SampleSource

        if rest:
            raise GistressError(
                f"data source '{source}': samples takes no path",
                "write 'samples' and name the photos with --images",
            )
        return SampleSource(num_classes) if task == "classification" else SampleDetectionSource()
    if scheme == "cifar10":
        from suite.data.cifar import CifarSource

        return CifarSource(rest)
    if scheme == "imagefolder":
        from suite.data.imagefolder import ImageFolderSource

        return ImageFolderSource(rest)
    from suite.data.coco import CocoSource

    # split at the last ':' so an images folder may itself contain one (e.g. a drive letter)
    images_dir, sep, ann = rest.rpartition(":")
    if not sep or not images_dir or not ann:
        raise GistressError(
            f"data source '{source}' is not coco:<images_dir>:<annotations.json>",
            "give both the images folder and the json, separated by ':'",
        )
    return CocoSource(Path(images_dir), Path(ann))


def _select(src, images: list[str] | None, count: int | None, seed: int) -> list[int]:
    """Positions of the chosen items in ``src.names``."""
    n = len(src.names)
    if images is not None:
        if isinstance(images, str):
            images = [images]
        if not images:
            raise GistressError("empty image list", "name at least one image, or pass a count instead")
        if count is not None and count != len(images):
            raise GistressError(
                f"{len(images)} images named but count is {count}", "pass either the image names or a count"
            )
        return [src.find(str(key)) for key in images]
    count = 1 if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise GistressError(f"count {count!r} is not a positive integer", "pass a batch size like 1, 4 or 8")
    if count > n:
        raise GistressError(f"batch of {count} asked, data has {n}", f"pass a count ≤ {n}")
    if seed == 0:
        return list(range(count))
    # a seeded pick without replacement: reproducible, independent of torch's global state
    return [int(i) for i in np.random.default_rng(seed).permutation(n)[:count]]


def _check_label(label: int, num_classes: int | None, name: str) -> None:
    if num_classes is not None and not 0 <= label < num_classes:
        raise GistressError(
            f"label {label} out of range for {num_classes} classes (image {name})",
            f"pass --num-classes ≥ {label + 1} or pick other images",
        )


def _classification_batch(src, picks: list[int], size: int, num_classes: int | None) -> Batch:
    imgs, labels = [], []
    for i in picks:
        name = src.names[i]
        img, label = src.read(i)
        _check_label(label, num_classes, name)
        imgs.append(center_crop(img, size, name))
        labels.append(label)
    return Batch(
        images=torch.stack(imgs),
        labels=torch.tensor(labels, dtype=torch.int64),
        ids=[src.names[i] for i in picks],
    )


def _detection_batch(src, picks: list[int], size: int, num_classes: int | None) -> Batch:
    imgs, boxes, classes, content = [], [], [], []
    for i in picks:
        name = src.names[i]
        img, bx, cl = src.read(i)
        for c in cl.tolist():
            _check_label(c, num_classes, name)
        t, bx, region = letterbox(img, size, bx)
        imgs.append(t)
        boxes.append(torch.from_numpy(bx))
        classes.append(torch.from_numpy(cl))
        content.append(region)
    return Batch(
        images=torch.stack(imgs),
        boxes=boxes,
        classes=classes,
        content=torch.tensor(content, dtype=torch.int64),
        ids=[src.names[i] for i in picks],
    )


def list_ids(source: str, *, task: str) -> list[str]:
    """The names of every item ``source`` offers for ``task`` (in the order ``count`` picks them)."""
    if task not in TASKS:
        raise GistressError(f"unknown task '{task}'", f"use one of: {', '.join(TASKS)}")
    return [str(n) for n in _open_source(source, task, None).names]
