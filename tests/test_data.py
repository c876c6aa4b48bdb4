"""Data sources through the real loaders: tiny CIFAR / ImageFolder / COCO trees in tmp_path, samples."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from suite.data import DETECTION_SAMPLES, SAMPLE_NAMES, Batch, load
from suite.errors import GistressError

# ---------------------------------------------------------------- fixtures


def _rows(n: int) -> np.ndarray:
    """n CIFAR rows whose pixels encode (image, channel) so a mix-up shows."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar_root(tmp_path):
    """A cifar-10-batches-py folder with a 5-image test_batch and batches.meta."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"batch_label": b"testing batch 1 of 1", b"data": _rows(5), b"labels": [3, 7, 0, 9, 1]}
    batch[b"filenames"] = [f"img{i}.png".encode() for i in range(5)]
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}))
    return tmp_path / "cifar"


def _tricolor(w: int, h: int) -> Image.Image:
    """Red top quarter, green middle half, blue bottom quarter (a center crop keeps only green)."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 4, :, 0] = 255
    arr[h // 4 : 3 * h // 4, :, 1] = 255
    arr[3 * h // 4 :, :, 2] = 255
    return Image.fromarray(arr)


@pytest.fixture
def folder_root(tmp_path):
    """Two classes; files in each sorted by name; one non-image file to be ignored."""
    root = tmp_path / "val"
    for cls, n in (("n0001", 2), ("n0002", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            _tricolor(40, 120).save(root / cls / f"img{i}.png")
    (root / "n0001" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def coco_tree(tmp_path):
    """images/ with a wide and a tall PNG, plus a valid instances json. Returns (dir, json, data)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (100, 50), (200, 10, 10)).save(images / "wide.png")
    Image.new("RGB", (50, 100), (10, 200, 10)).save(images / "tall.png")
    Image.new("RGB", (30, 30), (0, 0, 0)).save(images / "empty.png")
    data = {
        "images": [
            {"id": 11, "file_name": "wide.png", "width": 100, "height": 50},
            {"id": 12, "file_name": "tall.png", "width": 50, "height": 100},
            {"id": 13, "file_name": "empty.png", "width": 30, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 1, "bbox": [10, 5, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 32, "bbox": [0, 0, 100, 50], "iscrowd": 0},
            {"id": 3, "image_id": 12, "category_id": 6, "bbox": [5, 10, 40, 80], "iscrowd": 0},
            {"id": 4, "image_id": 12, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 6, "name": "bus"}, {"id": 32, "name": "tie"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return images, ann, data


def _coco(images, ann):
    return f"coco:{images}:{ann}"


def _bad_coco(tmp_path, images, data, edit):
    """Write a copy of ``data`` changed by ``edit`` and return its source string."""
    data = json.loads(json.dumps(data))
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return _coco(images, path)


def _error(fn, *words):
    """Run fn, expect GistressError, check every word appears in its one-line text."""
    with pytest.raises(GistressError) as info:
        fn()
    line = info.value.one_line()
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_pixels_labels_and_ids(cifar_root):
    b = load(f"cifar10:{cifar_root}", task="classification", size=32, count=3)
    assert isinstance(b, Batch)
    assert b.images.shape == (3, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.labels.tolist() == [3, 7, 0] and b.labels.dtype == torch.int64
    assert b.ids == ["0", "1", "2"]
    # row layout is channel-planar: image 1, green channel = values 1024..2047
    want = torch.from_numpy(_rows(5)[1, 1024:2048].reshape(32, 32)).float() / 255
    assert torch.allclose(b.images[1, 1], want)


def test_cifar_by_index_and_seeded_pick(cifar_root):
    b = load(f"cifar10:{cifar_root}/cifar-10-batches-py", task="classification", size=16, images=["4", "1"])
    assert b.ids == ["4", "1"] and b.labels.tolist() == [1, 7]
    assert b.images.shape == (2, 3, 16, 16)
    first = load(f"cifar10:{cifar_root}", task="classification", size=32, count=5, seed=0)
    picked = load(f"cifar10:{cifar_root}", task="classification", size=32, count=5, seed=3)
    again = load(f"cifar10:{cifar_root}", task="classification", size=32, count=5, seed=3)
    assert first.ids == ["0", "1", "2", "3", "4"]
    assert sorted(picked.ids) == first.ids and picked.ids == again.ids


def test_cifar_errors(cifar_root, tmp_path):
    src = f"cifar10:{cifar_root}"
    _error(lambda: load(src, task="classification", size=224), "32x32", "smaller than --size 224", "≤ 32")
    _error(lambda: load(src, task="classification", size=32, count=8), "batch of 8 asked, data has 5")
    _error(
        lambda: load(src, task="classification", size=32, images=["1"], num_classes=5),
        "label 7 out of range for 5 classes",
    )
    _error(lambda: load(src, task="classification", size=32, images=["9"]), "index 9 out of range")
    _error(lambda: load(src, task="detection", size=32), "classification only")
    missing = tmp_path / "nope"
    _error(lambda: load(f"cifar10:{missing}", task="classification", size=32), str(missing), "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _error(lambda: load(f"cifar10:{empty}", task="classification", size=32), "no CIFAR-10 batches")


# ---------------------------------------------------------------- ImageFolder


def test_imagefolder_labels_order_and_center_crop(folder_root):
    b = load(f"imagefolder:{folder_root}", task="classification", size=20, count=5)
    assert b.ids == ["n0001/img0.png", "n0001/img1.png", "n0002/img0.png", "n0002/img1.png", "n0002/img2.png"]
    assert b.labels.tolist() == [0, 0, 1, 1, 1]
    # 40x120 → 20x60; the center 20 rows (20..40) lie well inside the green band (15..45)
    assert b.images.shape == (5, 3, 20, 20)
    assert torch.allclose(b.images[:, 1], torch.ones(5, 20, 20))
    assert b.images[:, 0].max() == 0 and b.images[:, 2].max() == 0


def test_imagefolder_select_by_path_and_index(folder_root):
    b = load(f"imagefolder:{folder_root}", task="classification", size=40, images=["n0002/img1.png", "1"])
    assert b.ids == ["n0002/img1.png", "n0001/img1.png"] and b.labels.tolist() == [1, 0]
    line = _error(
        lambda: load(f"imagefolder:{folder_root}", task="classification", size=40, images=["n0002/img9.png"]),
        "not found",
    )
    assert "n0002/img" in line  # close matches offered
    # count=2 stays in class 0; the third image has label 1
    assert load(f"imagefolder:{folder_root}", task="classification", size=40, count=2, num_classes=1)
    _error(
        lambda: load(f"imagefolder:{folder_root}", task="classification", size=40, count=3, num_classes=1),
        "label 1 out of range for 1 classes",
    )


def test_imagefolder_errors(folder_root, tmp_path):
    missing = tmp_path / "missing_root"
    _error(lambda: load(f"imagefolder:{missing}", task="classification", size=8), str(missing))
    _error(
        lambda: load(f"imagefolder:{folder_root}", task="classification", size=8, count=6), "batch of 6 asked"
    )
    _error(lambda: load(f"imagefolder:{folder_root}", task="classification", size=41), "40x120", "--size 41")


def test_corrupt_and_truncated_images(folder_root, monkeypatch):
    (folder_root / "n0001" / "broken.jpg").write_bytes(np.random.default_rng(1).bytes(2000))
    src = f"imagefolder:{folder_root}"
    _error(lambda: load(src, task="classification", size=8, images=["n0001/broken.jpg"]), "broken.jpg")

    # a real photograph as JPEG, cut in half
    import skimage.data

    full = folder_root / "n0002" / "full.jpg"
    Image.fromarray(skimage.data.astronaut()).save(full, quality=90)
    half = folder_root / "n0002" / "half.jpg"
    half.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert load(src, task="classification", size=64, images=["n0002/full.jpg"]).images.shape == (1, 3, 64, 64)
    _error(
        lambda: load(src, task="classification", size=64, images=["n0002/half.jpg"]), "half.jpg", "truncated"
    )
    # PIL would pad a truncated file with gray if some library switched this on; we still refuse
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    _error(lambda: load(src, task="classification", size=64, images=["n0002/half.jpg"]), "half.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the read


# ---------------------------------------------------------------- COCO


def test_coco_letterbox_boxes_and_classes(coco_tree):
    images, ann, _ = coco_tree
    b = load(_coco(images, ann), task="detection", size=64, count=2)
    # the unannotated image is kept out of the pool; crowd boxes are skipped
    assert b.ids == ["wide.png", "tall.png"] and b.labels is None
    # wide 100x50 → 64x32, padded 16 above and below
    assert b.content.tolist() == [[0, 16, 64, 48], [16, 0, 48, 64]]
    assert torch.allclose(b.boxes[0], torch.tensor([[6.4, 19.2, 19.2, 25.6], [0, 16, 64, 48]]), atol=1e-4)
    assert torch.allclose(b.boxes[1], torch.tensor([[19.2, 6.4, 44.8, 57.6]]), atol=1e-4)
    # COCO ids 1 (person), 32 (tie), 6 (bus) → YOLO classes 0, 27, 5
    assert b.classes[0].tolist() == [0, 27] and b.classes[1].tolist() == [5]
    assert b.classes[0].dtype == torch.int64 and b.boxes[0].dtype == torch.float32
    pad = b.images[0, :, :16, :]
    assert torch.allclose(pad, torch.full_like(pad, 114 / 255))
    assert torch.allclose(b.images[0, :, 32, 32], torch.tensor([200, 10, 10]) / 255, atol=1 / 255)
    by_name = load(_coco(images, ann), task="detection", size=64, images=["tall.png", "11"])
    assert by_name.ids == ["tall.png", "wide.png"]
    t = b.yolo_targets()  # the Batch contract accepts what we produce
    assert t["bboxes"].shape == (3, 4)


def test_coco_selection_errors(coco_tree):
    images, ann, _ = coco_tree
    src = _coco(images, ann)
    _error(lambda: load(src, task="detection", size=64, images=["13"]), "'13' has no annotations", str(ann))
    _error(lambda: load(src, task="detection", size=64, images=["99"]), "'99' not found", str(ann))
    _error(lambda: load(src, task="detection", size=64, count=3), "batch of 3 asked, data has 2")
    _error(lambda: load(src, task="classification", size=64), "detection only")
    _error(lambda: load(src, task="detection", size=64, num_classes=5), "label 27 out of range for 5 classes")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d.pop("annotations"), ["lacks", "'annotations'"]),
        (lambda d: d.pop("images"), ["lacks", "'images'"]),
        (lambda d: d["annotations"][0].update(bbox=[90, 5, 20, 10]), ["outside image wide.png", "100x50"]),
        (lambda d: d["annotations"][0].update(bbox=[-3, 5, 20, 10]), ["outside image"]),
        (lambda d: d["annotations"][0].update(bbox=[10, 5, 0, 10]), ["zero or negative area"]),
        (lambda d: d["annotations"][0].update(bbox=[10, 5, 20, -1]), ["zero or negative area"]),
        (lambda d: d["annotations"][0].update(category_id=77), ["unknown category id 77"]),
        (
            lambda d: (
                d["categories"].append({"id": 12, "name": "street sign"}),
                d["annotations"][0].update(category_id=12),
            ),
            ["category id 12", "no YOLO class"],
        ),
        (lambda d: d["annotations"][0].update(image_id=404), ["image id 404", "not in 'images'"]),
        (lambda d: d["images"][0].update(width=120), ["wide.png is 100x50", "says 120x50"]),
        (lambda d: d["annotations"].clear(), ["no image has annotations"]),
    ],
)
def test_coco_json_validation(coco_tree, tmp_path, edit, words):
    images, _, data = coco_tree
    src = _bad_coco(tmp_path, images, data, edit)
    line = _error(lambda: load(src, task="detection", size=64, count=1), *words)
    assert "bad.json" in line  # the message names the json


def test_coco_box_within_tolerance_is_clipped(coco_tree, tmp_path):
    images, _, data = coco_tree
    src = _bad_coco(tmp_path, images, data, lambda d: d["annotations"][1].update(bbox=[-0.5, 0, 100.8, 50.5]))
    b = load(src, task="detection", size=100, images=["wide.png"])
    assert b.boxes[0][1].tolist() == [0.0, 25.0, 100.0, 75.0]


def test_coco_hand_made_json_without_ids_or_iscrowd(coco_tree, tmp_path):
    images, _, data = coco_tree

    def strip(d):
        for ann in d["annotations"]:
            ann.pop("id")
            ann.pop("iscrowd")

    b = load(_bad_coco(tmp_path, images, data, strip), task="detection", size=64, images=["tall.png"])
    assert len(b.boxes[0]) == 2  # without iscrowd the former crowd box counts as a normal box


def test_coco_file_errors(coco_tree, tmp_path):
    images, ann, data = coco_tree
    not_json = tmp_path / "notes.json"
    not_json.write_text("images: [1, 2]\n")
    _error(lambda: load(_coco(images, not_json), task="detection", size=64), "notes.json", "not a json")
    _error(
        lambda: load(_coco(images, tmp_path / "nope.json"), task="detection", size=64),
        "nope.json",
        "not found",
    )
    _error(lambda: load(_coco(tmp_path / "noimg", ann), task="detection", size=64), "noimg", "not found")
    _error(lambda: load(f"coco:{ann}", task="detection", size=64), "coco:<images_dir>:<annotations.json>")
    (images / "wide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _error(lambda: load(_coco(images, ann), task="detection", size=64, images=["wide.png"]), "wide.png")


# ---------------------------------------------------------------- samples


def test_sample_names():
    assert SAMPLE_NAMES[0] == "astronaut" and {"chelsea", "coffee", "rocket", "bus", "zidane"} <= set(
        SAMPLE_NAMES
    )
    assert DETECTION_SAMPLES == ("bus", "zidane")


@pytest.mark.parametrize("size", [32, 64])
def test_astronaut_classification(size):
    b = load("samples", task="classification", size=size, images=["astronaut"])
    assert b.images.shape == (1, 3, size, size) and b.images.dtype == torch.float32
    assert 0 <= b.images.min() and b.images.max() <= 1 and b.images.std() > 0.1
    assert b.labels.tolist() == [0] and b.ids == ["astronaut"]
    assert b.content.tolist() == [[0, 0, size, size]]


def test_sample_labels_are_position_modulo_classes():
    b = load(
        "samples", task="classification", size=32, images=["chelsea", "zidane", "astronaut"], num_classes=4
    )
    pos = [SAMPLE_NAMES.index(n) for n in ("chelsea", "zidane", "astronaut")]
    assert b.labels.tolist() == [p % 4 for p in pos]
    assert load("samples", task="classification", size=32).ids == ["astronaut"]  # default: one item
    assert load("samples", task="classification", size=32, count=len(SAMPLE_NAMES)).ids == list(SAMPLE_NAMES)


@pytest.mark.parametrize("name, n_boxes, classes", [("bus", 5, {0, 5}), ("zidane", 4, {0, 27})])
def test_detection_samples(name, n_boxes, classes):
    b = load("samples", task="detection", size=320, images=[name])
    assert b.images.shape == (1, 3, 320, 320)
    boxes, (x0, y0, x1, y1) = b.boxes[0], b.content[0].tolist()
    assert boxes.shape == (n_boxes, 4) and set(b.classes[0].tolist()) == classes
    assert (boxes[:, 0] >= x0).all() and (boxes[:, 1] >= y0).all()
    assert (boxes[:, 2] <= x1).all() and (boxes[:, 3] <= y1).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()


def test_letterbox_content_region_for_wide_and_tall_samples():
    b = load("samples", task="detection", size=320, count=2)
    assert b.ids == ["bus", "zidane"]
    # bus 810x1080 → 240x320 centered (40 px each side); zidane 1280x720 → 320x180 (70 above/below)
    assert b.content.tolist() == [[40, 0, 280, 320], [0, 70, 320, 250]]
    assert torch.allclose(b.images[1, :, :70], torch.full((3, 70, 320), 114 / 255))
    assert torch.allclose(b.images[0, :, :, :40], torch.full((3, 320, 40), 114 / 255))
    assert not torch.allclose(b.images[1, :, 70:72], torch.full((3, 2, 320), 114 / 255))


def test_sample_errors():
    _error(
        lambda: load("samples", task="classification", size=32, images=["astronot"]), "astronot", "astronaut"
    )
    line = _error(lambda: load("samples", task="classification", size=32, images=["xyzzy"]), "unknown sample")
    assert "chelsea" in line  # the list of samples is in the hint
    _error(
        lambda: load("samples", task="detection", size=320, images=["astronaut"]), "no boxes", "bus, zidane"
    )
    _error(lambda: load("samples", task="classification", size=600, images=["chelsea"]), "451x300", "≤ 300")
    _error(lambda: load("samples", task="detection", size=320, count=3), "batch of 3 asked, data has 2")
    _error(
        lambda: load("sample", task="classification", size=32), "unknown data source", "samples", "cifar10:"
    )
    _error(lambda: load("hdf5:/x", task="classification", size=32), "hdf5", "imagefolder:<root>")
    _error(lambda: load("samples", task="segmentation", size=32), "unknown task")
    _error(lambda: load("samples", task="classification", size=0), "size 0")
    _error(lambda: load("samples", task="classification", size=32, count=0), "count 0")
