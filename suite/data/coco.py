"""COCO-format detection data: an images folder plus an instances json, validated up front.

Category ids are read in COCO's 91-id space and mapped to YOLO's 80 contiguous classes with
ultralytics' own table (``ultralytics.data.converter.coco91_to_coco80_class``), so class ids
match what a COCO-trained YOLO model predicts. A json with its own category numbering must
therefore use COCO's ids for the objects it labels. Crowd annotations (``iscrowd: 1``) are
skipped, as ultralytics does when it converts COCO.
"""

from __future__ import annotations

import contextlib
import io
import json
from functools import lru_cache
from pathlib import Path
from typing import NoReturn

import numpy as np
from PIL import Image

from suite.data.transforms import open_image
from suite.errors import GistressError, close_matches

# annotation boxes may overshoot the image by rounding; more than this is an error
BOX_TOLERANCE = 1.0


@lru_cache(maxsize=1)
def coco91_to_80() -> dict[int, int]:
    """COCO category id (1..90) → YOLO class (0..79), from ultralytics' table."""
    from ultralytics.data.converter import coco91_to_coco80_class

    return {i + 1: c for i, c in enumerate(coco91_to_coco80_class()) if c is not None}


def _fail(ann_path: Path, problem: str, fix: str) -> NoReturn:
    raise GistressError(f"{ann_path}: {problem}", fix)


def _short(values, n: int = 12) -> str:
    """The first ``n`` values, ', '-joined, with '...' when there are more."""
    values = [str(v) for v in values]
    return ", ".join(values[:n]) + (", ..." if len(values) > n else "")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


class CocoSource:
    """Annotated images of a COCO json, addressed by image id or file name.

    Everything that can be checked without decoding pixels is checked when the source is built:
    json structure, box geometry, category ids. Images without (non-crowd) annotations are kept
    out of the pool, since the detection attack needs boxes; naming one explicitly is an error.
    """

    def __init__(self, images_dir: str | Path, ann_path: str | Path):
        self.images_dir = Path(images_dir)
        self.ann_path = ann_path = Path(ann_path)
        if not self.images_dir.is_dir():
            raise GistressError(
                f"COCO images folder {self.images_dir} not found", "check coco:<images_dir>:<json>"
            )
        if not ann_path.is_file():
            raise GistressError(
                f"COCO annotation file {ann_path} not found", "check coco:<images_dir>:<json>"
            )
        try:
            data = json.loads(ann_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            _fail(
                ann_path,
                f"not a json file ({err})",
                "pass a COCO instances json (e.g. instances_val2017.json)",
            )
        if not isinstance(data, dict):
            _fail(
                ann_path,
                "json is not an object",
                "pass a COCO instances json with images/annotations/categories",
            )
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                _fail(ann_path, f"lacks a '{key}' list", f"add '{key}' as in a COCO instances json")
        self._check(data)
        # pycocotools prints progress on stdout; keep the CLI's output clean
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = data
            self.coco.createIndex()
        self._ann_ids = {
            img_id: self.coco.getAnnIds(imgIds=[img_id], iscrowd=False) for img_id in self.coco.getImgIds()
        }
        self._by_name = {img["file_name"]: img["id"] for img in data["images"]}
        # pool: annotated images in json order; names are file names
        self.ids = [img["id"] for img in data["images"] if self._ann_ids[img["id"]]]
        self.names = [self.coco.imgs[i]["file_name"] for i in self.ids]
        self._pos = {img_id: k for k, img_id in enumerate(self.ids)}
        if not self.ids:
            _fail(ann_path, "no image has annotations", "detection needs boxes: add annotations")

    def _check(self, data: dict) -> None:
        """Validate images, categories and every annotation (raise on the first problem); fill
        missing annotation ids and iscrowd flags."""
        p = self.ann_path
        images = {}
        for img in data["images"]:
            if not isinstance(img, dict) or not all(k in img for k in ("id", "file_name", "width", "height")):
                _fail(
                    p,
                    f"image entry {img!r:.80} lacks id/file_name/width/height",
                    "complete the image entries",
                )
            if (
                not (_number(img["width"]) and _number(img["height"]))
                or min(img["width"], img["height"]) <= 0
            ):
                _fail(
                    p,
                    f"image {img['file_name']} has width/height {img['width']}x{img['height']}",
                    "give positive pixel sizes",
                )
            if img["id"] in images:
                _fail(p, f"image id {img['id']} appears twice", "give every image a unique id")
            images[img["id"]] = img
        cats = {}
        for cat in data["categories"]:
            if not isinstance(cat, dict) or "id" not in cat:
                _fail(p, f"category entry {cat!r:.80} lacks an id", "give each category an id and a name")
            cats[cat["id"]] = cat.get("name", "?")
        mapping = coco91_to_80()
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "bbox", "category_id")):
                _fail(
                    p, f"annotation {ann!r:.80} lacks image_id/bbox/category_id", "complete the annotations"
                )
            aid = ann.get("id", f"#{k}")
            if ann["image_id"] not in images:
                _fail(
                    p,
                    f"annotation {aid} refers to image id {ann['image_id']}, which is not in 'images'",
                    "add the image entry or drop the annotation",
                )
            cid = ann["category_id"]
            if cid not in cats:
                _fail(
                    p,
                    f"annotation {aid} has unknown category id {cid} (not in the json's categories)",
                    f"use one of the json's category ids ({_short(cats)})",
                )
            if cid not in mapping:
                _fail(
                    p,
                    f"annotation {aid} has category id {cid} ({cats[cid]}), which maps to no YOLO class",
                    "use COCO's 91-id numbering (the ids 1..90 that name COCO's 80 classes)",
                )
            bbox = ann["bbox"]
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
                _fail(p, f"annotation {aid} bbox {bbox!r:.60} is not [x, y, w, h] numbers", "fix the bbox")
            x, y, w, h = bbox
            if w <= 0 or h <= 0:
                _fail(
                    p,
                    f"annotation {aid} box {bbox} has zero or negative area",
                    "drop the annotation or give it a positive width and height",
                )
            img = images[ann["image_id"]]
            W, H = img["width"], img["height"]
            t = BOX_TOLERANCE
            if x < -t or y < -t or x + w > W + t or y + h > H + t:
                _fail(
                    p,
                    f"annotation {aid} box {bbox} lies outside image {img['file_name']} ({W}x{H})",
                    "boxes are [x, y, w, h] in original pixels; fix or drop it",
                )

        # pycocotools indexes annotations by id and filters on iscrowd: give hand-made jsons both
        anns = data["annotations"]
        if len({a.get("id") for a in anns}) != len(anns) or any("id" not in a for a in anns):
            for k, ann in enumerate(anns):
                ann["id"] = k + 1
        for ann in anns:
            ann.setdefault("iscrowd", 0)

    def find(self, key: str) -> int:
        """The pool position of image ``key``: a COCO image id or a file name."""
        img_id = self._by_name.get(key)
        if img_id is None and key.lstrip("-").isdigit() and int(key) in self.coco.imgs:
            img_id = int(key)
        elif img_id is None and key in self.coco.imgs:  # some jsons use string ids
            img_id = key
        if img_id is None:
            near = close_matches(key, list(self._by_name))
            raise GistressError(
                f"image '{key}' not found in {self.ann_path}" + (f"; close: {near}" if near else ""),
                "name COCO images by image id or file_name as listed in the json",
            )
        if not self._ann_ids[img_id]:
            raise GistressError(
                f"image '{key}' has no annotations in {self.ann_path}",
                "detection needs boxes: annotate the image or pick another",
            )
        return self._pos[img_id]

    def read(self, i: int) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """Image ``i``, its boxes (n, 4) xyxy float32 in original pixels and classes (n,) int64."""
        info = self.coco.imgs[self.ids[i]]
        img = open_image(self.images_dir / info["file_name"])
        if img.size != (info["width"], info["height"]):
            raise GistressError(
                f"image {info['file_name']} is {img.size[0]}x{img.size[1]} but {self.ann_path} says "
                f"{info['width']}x{info['height']}",
                "fix width/height in the json (boxes must be in the file's own pixels)",
            )
        anns = self.coco.loadAnns(self._ann_ids[self.ids[i]])
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        # within the 1-pixel tolerance: clip so boxes never leave the image
        boxes = boxes.clip(0, [info["width"], info["height"], info["width"], info["height"]]).astype(
            np.float32
        )
        mapping = coco91_to_80()
        classes = np.array([mapping[a["category_id"]] for a in anns], dtype=np.int64)
        return img, boxes, classes
