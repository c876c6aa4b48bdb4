"""The detection task loss shared by the client and the attacker (ultralytics' own v8DetectionLoss).

One attack engine serves classification and detection; the task loss is the only difference. For
detection it is exactly what ultralytics trains on: ``model.loss(batch)`` returns
``(loss_vector * batch_size, items)`` with ``loss_vector = (box*7.5, cls*0.5, dfl*1.5)`` and the trainer
backpropagates ``loss.sum()``. ``detection_loss`` returns that same scalar, so a client's gradient is
the gradient a real ultralytics training step would compute.

Two properties matter for gradient inversion:

- the task-aligned assigner runs on detached predictions, so the loss is only piecewise smooth in the
  image: the assignment jumps as predictions move. ``make_criterion(model, freeze_assignment=True)``
  records the first assignment and reuses it, which makes the loss smooth for tests and analysis;
- in BN eval mode the Detect head would decode boxes for inference; the loss needs its raw
  training-format outputs, so ``detection_loss`` flips only the head's own ``training`` flag.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

import suite  # noqa: F401  (YOLO_OFFLINE before ultralytics is imported)
from suite.data.batch import Batch
from suite.errors import GistressError
from suite.model.batchnorm import frozen_bn_stats, modes_restored, named_bn_layers

BnMode = Literal["train", "eval"]
TARGET_KEYS = ("batch_idx", "cls", "bboxes")


# ----------------------------------------------------------------------------- targets


def validate_targets(batch: Batch, nc: int) -> None:
    """Check a detection batch's boxes and classes; raise GistressError naming the image and the fix.

    Rejects: no boxes at all, an image without boxes, boxes outside the image, zero-area (or inverted)
    boxes, non-finite coordinates, and class ids outside 0..nc-1.
    """
    if batch.boxes is None or batch.classes is None:
        raise GistressError("this batch has no boxes (a detection variant needs boxes and classes)",
                            "load a detection data set (COCO-style annotations) for a YOLO variant")
    n_img = len(batch)
    if len(batch.boxes) != n_img or len(batch.classes) != n_img:
        raise GistressError(f"batch has {n_img} images but {len(batch.boxes)} box lists and "
                            f"{len(batch.classes)} class lists", "give one box list and one class list per image")
    h, w = batch.size
    tol = 1e-3  # pixels: letterbox arithmetic may land a hair past the edge
    for i, (bx, cl) in enumerate(zip(batch.boxes, batch.classes)):
        name = batch.ids[i] if i < len(batch.ids) else str(i)
        if bx.ndim != 2 or bx.shape[-1] != 4:
            raise GistressError(f"image {name}: boxes must have shape (n, 4) xyxy, got {tuple(bx.shape)}",
                                "store boxes as an (n, 4) tensor of x1, y1, x2, y2 pixels")
        if len(bx) == 0:
            raise GistressError(f"image {name} has no boxes",
                                "drop images without annotations from detection batches, or annotate them")
        if cl.numel() != len(bx):
            raise GistressError(f"image {name} has {len(bx)} boxes but {cl.numel()} class ids",
                                "give exactly one class id per box")
        bx = bx.detach().double().cpu()
        bad = ~torch.isfinite(bx).all(1)
        if bad.any():
            k = int(bad.nonzero()[0])
            raise GistressError(f"image {name}: box {k} has non-finite coordinates {bx[k].tolist()}",
                                "fix or drop that annotation")
        outside = (bx[:, 0] < -tol) | (bx[:, 1] < -tol) | (bx[:, 2] > w + tol) | (bx[:, 3] > h + tol)
        if outside.any():
            k = int(outside.nonzero()[0])
            raise GistressError(
                f"image {name}: box {k} {[round(v, 2) for v in bx[k].tolist()]} lies outside the {w}x{h} image",
                "clip boxes to the image after resizing/letterboxing (xyxy pixels of Batch.images)",
            )
        flat = (bx[:, 2] <= bx[:, 0]) | (bx[:, 3] <= bx[:, 1])
        if flat.any():
            k = int(flat.nonzero()[0])
            raise GistressError(
                f"image {name}: box {k} {[round(v, 2) for v in bx[k].tolist()]} has zero area (need x2 > x1, y2 > y1)",
                "drop degenerate boxes, and store boxes as xyxy (not xywh)",
            )
        cl = cl.detach().cpu().long().view(-1)
        out_of_range = (cl < 0) | (cl >= nc)
        if out_of_range.any():
            k = int(out_of_range.nonzero()[0])
            raise GistressError(
                f"image {name}: box {k} has class id {int(cl[k])}, outside 0..{nc - 1} (the variant has nc={nc})",
                f"remap class ids to contiguous 0..nc-1, or build the variant with nc={int(cl.max()) + 1}",
            )


def targets_for(batch: Batch, nc: int) -> dict[str, torch.Tensor]:
    """Validated ultralytics training targets (batch_idx, cls, bboxes xywhn) for ``batch``."""
    validate_targets(batch, nc)
    return batch.yolo_targets()


def _check_target_dict(targets: dict, batch_size: int, nc: int) -> None:
    """Cheap structural checks so that bad targets fail here, not deep inside the assigner."""
    if not isinstance(targets, dict) or any(k not in targets for k in TARGET_KEYS):
        raise GistressError(f"detection targets must be a dict with keys {', '.join(TARGET_KEYS)}",
                            "pass batch.yolo_targets() (or suite.model.detection.targets_for(batch, nc))")
    cls, idx = targets["cls"], targets["batch_idx"]
    if cls.numel() == 0:
        raise GistressError("detection targets hold no boxes", "every image in a detection batch needs boxes")
    if int(cls.min()) < 0 or int(cls.max()) >= nc:
        raise GistressError(f"target class ids span {int(cls.min())}..{int(cls.max())}, the model has nc={nc}",
                            "remap class ids to 0..nc-1 or build the variant with a matching nc")
    if int(idx.max()) >= batch_size:
        raise GistressError(f"targets refer to image {int(idx.max())} but the batch has {batch_size} images",
                            "build targets from the same Batch as the images")


# ----------------------------------------------------------------------------- criterion


class FrozenAssigner:
    """Wraps ultralytics' TaskAlignedAssigner: the first call assigns, later calls reuse that assignment.

    With the assignment fixed, the detection loss is a smooth function of the image (the assigner's
    jumps are what make the live loss piecewise smooth). The recorded assignment belongs to one target
    set and one image size; using it for another is an error. ``reset()`` forgets it.
    """

    def __init__(self, assigner: nn.Module):
        self.assigner = assigner
        self.recorded: tuple | None = None
        self._key: tuple | None = None

    def reset(self) -> None:
        """Forget the recorded assignment; the next call assigns afresh."""
        self.recorded, self._key = None, None

    def __call__(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra):
        """Return the recorded assigner outputs (recording them on the first call)."""
        key = (tuple(pd_scores.shape), gt_labels.detach().cpu().clone(), gt_bboxes.detach().cpu().clone())
        if self.recorded is None:
            out = self.assigner(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt, **extra)
            self.recorded = tuple(t.detach().clone() if torch.is_tensor(t) else t for t in out)
            self._key = key
        elif key[0] != self._key[0] or not (torch.equal(key[1], self._key[1]) and torch.equal(key[2], self._key[2])):
            raise GistressError("the frozen assignment was recorded for other targets or another image size",
                                "make a new criterion with make_criterion(model, freeze_assignment=True)")
        # clones: the loss must never be able to modify the recording in place
        return tuple(t.clone() if torch.is_tensor(t) else t for t in self.recorded)


def _ensure_args(model: nn.Module) -> None:
    """v8DetectionLoss reads its gains from ``model.args``; accept a dict (as checkpoints store it)."""
    args = getattr(model, "args", None)
    if args is None:
        raise GistressError("this model has no ultralytics hyper-parameters (model.args), so the loss is undefined",
                            "build it with variants.build('yolov8n') or set model.args = ultralytics.cfg.get_cfg()")
    if isinstance(args, dict):
        from ultralytics.cfg import DEFAULT_CFG_DICT
        from ultralytics.utils import IterableSimpleNamespace

        model.args = IterableSimpleNamespace(**{**DEFAULT_CFG_DICT, **args})


def make_criterion(model: nn.Module, freeze_assignment: bool = False):
    """ultralytics' own loss object for ``model`` (v8DetectionLoss for YOLOv8), optionally with a frozen assignment.

    With ``freeze_assignment=True`` the first call records the task-aligned assignment and later calls
    reuse it (``criterion.assigner.reset()`` forgets it).
    """
    if not hasattr(model, "init_criterion"):
        raise GistressError(f"{type(model).__name__} is not an ultralytics detection model",
                            "use a YOLO variant (yolov8n, yolov8n-basicblock, yolov8n-preact)")
    _ensure_args(model)
    criterion = model.init_criterion()
    if freeze_assignment:
        if not hasattr(criterion, "assigner"):
            raise GistressError(f"{type(criterion).__name__} has no single assigner to freeze",
                                "freeze_assignment supports YOLOv8-style heads (v8DetectionLoss)")
        criterion.assigner = FrozenAssigner(criterion.assigner)
    return criterion


# ----------------------------------------------------------------------------- BN state


def uncalibrated_bn_layers(model: nn.Module) -> list[str]:
    """Names of BN layers whose running statistics are still at their initial values (mean 0, var 1)."""
    names = []
    for name, m in named_bn_layers(model):
        if m.running_mean is None or m.running_var is None:
            continue
        if bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()):
            names.append(name)
    return names


def eval_mode_requires_calibration(variant_or_model) -> bool:
    """True if eval-mode BN would use untouched running stats (0/1), i.e. the model needs BN calibration.

    With fresh statistics every eval-mode BN only rescales (by 1/sqrt(1 + eps)): the network runs
    unnormalized, which is no client's trained model but is what Geiping et al.'s code attacks on an
    untrained net (a random CIFAR ResNet18 leaks at 24 dB that way; docs/findings.md). The audit
    calibrates BN on data instead; a run records it in its ``bn_statistics`` tag.
    Accepts a Variant (anything with the module as ``.model``) or a module.
    """
    model = variant_or_model if isinstance(variant_or_model, nn.Module) else variant_or_model.model
    return bool(uncalibrated_bn_layers(model))


# ----------------------------------------------------------------------------- the loss


def set_bn_mode(model: nn.Module, bn_mode: BnMode) -> None:
    """Put a YOLO DetectionModel in the client's BN mode, keeping the head's training-format output.

    ``"train"``: ``model.train()`` (batch statistics). ``"eval"``: ``model.eval()`` (running statistics)
    but the Detect head's own ``training`` flag stays True: in eval mode Detect would decode boxes for
    inference, while the loss needs its raw (boxes, scores, feats) dict. Only the head's flag changes,
    not its children's, so its Conv-BN layers are in eval mode. Persistent: ``model.eval()`` undoes it.
    """
    if bn_mode not in ("train", "eval"):
        raise GistressError(f"unknown bn_mode '{bn_mode}'", "use bn_mode 'train' or 'eval'")
    model.train(bn_mode == "train")
    model.model[-1].training = True


def detection_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: dict[str, torch.Tensor],
    *,
    bn_mode: BnMode = "train",
    criterion=None,
    update_bn_stats: bool = True,
) -> torch.Tensor:
    """The scalar ultralytics trains on: ``model.loss({"img": images, **targets})[0].sum()``.

    ``images``: (B, 3, H, W) in [0, 1] (H, W multiples of 32). ``targets``: ``Batch.yolo_targets()``.
    ``bn_mode="train"`` uses batch statistics and, like a real training step, updates the running
    statistics unless ``update_bn_stats=False``; ``"eval"`` uses the running statistics (never
    updated). ``criterion``: from ``make_criterion`` (e.g. with a frozen assignment); a fresh one if None.
    The model's train/eval flags are restored afterwards. The result keeps its graph, so
    ``torch.autograd.grad(loss, params, create_graph=True)`` supports a second backward to the image.
    """
    if bn_mode not in ("train", "eval"):
        raise GistressError(f"unknown bn_mode '{bn_mode}'", "use bn_mode 'train' or 'eval'")
    if images.ndim != 4 or images.shape[1] != 3:
        raise GistressError(f"images must be (B, 3, H, W), got {tuple(images.shape)}",
                            "pass a batch of RGB images")
    stride = int(getattr(model, "stride", torch.tensor([32])).max())
    if images.shape[-1] % stride or images.shape[-2] % stride:
        raise GistressError(f"image size {tuple(images.shape[-2:])} is not a multiple of the model stride {stride}",
                            f"resize or letterbox images to a multiple of {stride} (e.g. 64, 320, 640)")
    head = model.model[-1]
    _check_target_dict(targets, images.shape[0], int(head.nc))
    # ultralytics pads targets into a float32 buffer whatever the model dtype (float64 in gradient checks)
    targets = {k: targets[k].to(device=images.device, dtype=torch.float32) for k in TARGET_KEYS}
    criterion = make_criterion(model) if criterion is None else criterion

    freeze = frozen_bn_stats(model) if (bn_mode == "eval" or not update_bn_stats) else contextlib.nullcontext()
    with modes_restored(model):
        set_bn_mode(model, bn_mode)  # eval BN still gets the head's training-format outputs
        with freeze:
            preds = model(images)
        loss_vec, _items = criterion(preds, targets)  # (box, cls, dfl) * gains * batch size
    return loss_vec.sum()
