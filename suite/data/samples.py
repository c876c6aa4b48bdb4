"""Bundled samples: real photographs shipped inside installed packages, usable offline by name.

Classification labels of samples are arbitrary but fixed: a sample's label is its position in
``SAMPLE_NAMES`` modulo ``num_classes`` (its position itself when no class count is given). They
exist so that label-dependent code paths run; they say nothing about what the photo shows.

Only ``bus`` and ``zidane`` have boxes (hand-made, in ``datasets/samples_coco.json``), so only
they serve ``task="detection"``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from suite.data.transforms import open_image
from suite.errors import GistressError, close_matches


def _skimage(name: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        import skimage.data

        arr = getattr(skimage.data, name)()
        if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity); keep the left view
            arr = arr[0]
        return Image.fromarray(arr).convert("RGB")

    return load


def ultralytics_assets() -> Path:
    """The folder of photographs bundled with ultralytics (bus.jpg, zidane.jpg)."""
    from ultralytics.utils import ASSETS

    return Path(ASSETS)


def _asset(file_name: str) -> Callable[[], Image.Image]:
    return lambda: open_image(ultralytics_assets() / file_name)


# Order is part of the contract: it fixes the classification labels. Append, never reorder.
# All are RGB photographs present in the installed wheels (scikit-image's optional, downloaded
# images such as 'eagle' or 'lily' are left out; 'logo' and 'colorwheel' are drawings).
_LOADERS: dict[str, Callable[[], Image.Image]] = {
    "astronaut": _skimage("astronaut"),  # 512x512
    "chelsea": _skimage("chelsea"),  # 451x300, a cat
    "coffee": _skimage("coffee"),  # 600x400
    "rocket": _skimage("rocket"),  # 640x427
    "motorcycle": _skimage("stereo_motorcycle"),  # 741x500, left view of the stereo pair
    "hubble_deep_field": _skimage("hubble_deep_field"),  # 1000x872
    "immunohistochemistry": _skimage("immunohistochemistry"),  # 512x512, microscopy
    "retina": _skimage("retina"),  # 1411x1411, fundus photograph
    "bus": _asset("bus.jpg"),  # 810x1080
    "zidane": _asset("zidane.jpg"),  # 1280x720
}
SAMPLE_NAMES: tuple[str, ...] = tuple(_LOADERS)
DETECTION_SAMPLES: tuple[str, ...] = ("bus", "zidane")


def annotations_path() -> Path:
    """datasets/samples_coco.json in the source tree (boxes for bus and zidane)."""
    return Path(__file__).resolve().parents[2] / "datasets" / "samples_coco.json"


def check_sample(name: str, task: str = "classification") -> str:
    """Return ``name`` if it is a sample usable for ``task``; else raise with close matches."""
    if name not in _LOADERS:
        near = close_matches(name, SAMPLE_NAMES)
        raise GistressError(
            f"unknown sample '{name}'" + (f"; did you mean {near}?" if near else ""),
            f"samples are: {', '.join(SAMPLE_NAMES)}",
        )
    if task == "detection" and name not in DETECTION_SAMPLES:
        raise GistressError(
            f"sample '{name}' has no boxes, so it cannot be used for detection",
            f"detection samples are: {', '.join(DETECTION_SAMPLES)}",
        )
    return name


def sample_image(name: str) -> Image.Image:
    """The full-resolution RGB photograph of sample ``name``."""
    return _LOADERS[check_sample(name)]()


class SampleSource:
    """Samples for classification: images with their fixed, arbitrary labels."""

    def __init__(self, num_classes: int | None = None):
        self.names = list(SAMPLE_NAMES)
        self.num_classes = num_classes

    def find(self, key: str) -> int:
        """The position of sample ``key``."""
        return self.names.index(check_sample(key))

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i`` and its label (position modulo num_classes)."""
        label = i % self.num_classes if self.num_classes else i
        return sample_image(self.names[i]), label


class SampleDetectionSource:
    """bus and zidane with their hand-made COCO boxes, validated like any COCO json."""

    def __init__(self):
        from suite.data.coco import CocoSource

        path = annotations_path()
        if not path.is_file():
            raise GistressError(
                f"sample annotations {path} not found",
                "run from a source checkout of gistress (the file lives in datasets/)",
            )
        self.coco = CocoSource(ultralytics_assets(), path)
        self.names = [Path(n).stem for n in self.coco.names]

    def find(self, key: str) -> int:
        """The position of detection sample ``key`` (bus or zidane)."""
        return self.names.index(check_sample(key, "detection"))

    def read(self, i: int):
        """Sample ``i`` with boxes (n, 4) xyxy in original pixels and YOLO classes (n,)."""
        return self.coco.read(i)
