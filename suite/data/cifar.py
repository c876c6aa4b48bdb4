"""CIFAR-10 in its python-pickle form (data_batch_1..5, test_batch, batches.meta)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from suite.errors import GistressError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
SUBDIR = "cifar-10-batches-py"


def _batch_files(root: Path) -> list[Path]:
    """The batch files a root stands for: a batch file itself, test_batch, or the training batches."""
    if root.is_file():
        return [root]
    for folder in (root, root / SUBDIR):
        if (folder / "test_batch").is_file():
            return [folder / "test_batch"]
        train = [folder / n for n in TRAIN_BATCHES if (folder / n).is_file()]
        if train:
            return train
    raise GistressError(
        f"no CIFAR-10 batches in {root} (looked for test_batch and data_batch_1..5, also in {SUBDIR}/)",
        "point cifar10:<root> at the extracted cifar-10-python.tar.gz folder or at one batch file",
    )


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="bytes")
    except Exception as err:  # pickle raises many types on garbage input
        raise GistressError(
            f"cannot read CIFAR batch {path}: {err}", "use the python version of CIFAR-10 (pickled batches)"
        ) from err
    if not isinstance(obj, dict):
        raise GistressError(f"CIFAR batch {path} is not a dict", "use the python version of CIFAR-10")
    # the official files use bytes keys; accept str keys too (re-pickled copies)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CifarSource:
    """CIFAR-10 images addressed by index (as a string) within the chosen batch file(s).

    ``root`` is a folder holding the batches (or their ``cifar-10-batches-py/`` parent): its
    ``test_batch`` is used when present, else data_batch_1..5 in order. A path to one batch file
    selects that file.
    """

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.exists():
            raise GistressError(f"CIFAR-10 root {root} not found", "check the path after 'cifar10:'")
        data, labels = [], []
        for path in _batch_files(root):
            batch = _unpickle(path)
            if "data" not in batch or "labels" not in batch:
                hint = (
                    "this looks like CIFAR-100, which is not supported"
                    if "fine_labels" in batch
                    else ("use the python version of CIFAR-10")
                )
                raise GistressError(f"CIFAR batch {path} lacks 'data' or 'labels'", hint)
            arr = np.asarray(batch["data"], dtype=np.uint8)
            if arr.ndim != 2 or arr.shape[1] != 3072 or len(arr) != len(batch["labels"]):
                raise GistressError(
                    f"CIFAR batch {path} has data of shape {arr.shape} and {len(batch['labels'])} labels;"
                    " expected N x 3072 rows and N labels",
                    "use the python version of CIFAR-10 (32x32 RGB rows)",
                )
            data.append(arr)
            labels.extend(int(v) for v in batch["labels"])
        self.data = np.concatenate(data)
        self.labels = labels
        self.names = [str(i) for i in range(len(self.data))]
        # class names are optional; when present they bound the labels (catches mixed-up files)
        self.label_names = _label_names(root)
        if self.label_names and self.labels and max(self.labels) >= len(self.label_names):
            raise GistressError(
                f"CIFAR labels in {root} go up to {max(self.labels)} but batches.meta names "
                f"{len(self.label_names)} classes",
                "use matching batch files and batches.meta",
            )

    def find(self, key: str) -> int:
        """The position of image ``key`` (its index as a string)."""
        try:
            i = int(key)
        except ValueError:
            raise GistressError(
                f"CIFAR image '{key}' is not an index", "name CIFAR images by index, e.g. --images 0 7 42"
            ) from None
        if not 0 <= i < len(self.data):
            raise GistressError(
                f"CIFAR index {i} out of range: data has {len(self.data)} images",
                f"use indices 0..{len(self.data) - 1}",
            )
        return i

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Image ``i`` (32x32 RGB) and its label."""
        # rows are channel-planar: 1024 red, then 1024 green, then 1024 blue values
        hwc = self.data[i].reshape(3, 32, 32).transpose(1, 2, 0)
        return Image.fromarray(np.ascontiguousarray(hwc), "RGB"), self.labels[i]


def _label_names(root: Path) -> list[str] | None:
    """Class names from batches.meta next to the batches, or None when absent."""
    folder = root.parent if root.is_file() else root
    for path in (folder / "batches.meta", folder / SUBDIR / "batches.meta"):
        if path.is_file():
            names = _unpickle(path).get("label_names")
            if names is not None:
                return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return None
