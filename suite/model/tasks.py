"""Task losses: the only thing that differs between classification and detection attacks.

A task loss maps the model's predictions to the scalar the client differentiates. ``set_mode``
puts a model in the client's BN mode (for detection in eval mode the Detect head still returns
its training-format outputs so that the loss is defined).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def set_mode(model: nn.Module, task: str, bn_mode: str) -> None:
    """Train mode (batch statistics) or eval mode (running statistics) as the client runs it."""
    if task == "detection":
        from suite.model.detection import set_bn_mode

        set_bn_mode(model, bn_mode)
        return
    model.train(bn_mode == "train")


class ClassificationLoss:
    """Cross-entropy averaged over the batch, with hard labels or (DLG) soft label logits."""

    def __init__(self, labels: torch.Tensor | None = None, soft_logits: torch.Tensor | None = None):
        if labels is None and soft_logits is None:
            raise ValueError("ClassificationLoss needs labels or soft label logits")
        self.labels = labels
        self.soft_logits = soft_logits

    def __call__(self, preds: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        if self.soft_logits is not None:
            soft = self.soft_logits if index is None else self.soft_logits[index]
            return torch.mean(torch.sum(-F.softmax(soft, -1) * F.log_softmax(preds, -1), -1))
        labels = self.labels if index is None else self.labels[index]
        return F.cross_entropy(preds, labels)


class DetectionLoss:
    """The ultralytics YOLOv8 detection loss (box / cls / DFL, task-aligned assigner)."""

    def __init__(self, model: nn.Module, targets: dict[str, torch.Tensor]):
        from suite.model.detection import make_criterion

        self.criterion = make_criterion(model)
        self.targets = targets

    def __call__(self, preds, index: torch.Tensor | None = None) -> torch.Tensor:
        targets = self.targets if index is None else _select_targets(self.targets, index)
        loss, _ = self.criterion(preds, targets)
        return loss.sum()


def _select_targets(targets: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Targets of a mini-batch (the images ``index``), re-indexed from 0."""
    keep = torch.zeros_like(targets["batch_idx"], dtype=torch.bool)
    remap = {}
    for new, old in enumerate(index.tolist()):
        keep |= targets["batch_idx"] == old
        remap[old] = new
    bidx = targets["batch_idx"][keep].clone()
    for old, new in remap.items():
        bidx[targets["batch_idx"][keep] == old] = new
    return {"batch_idx": bidx, "cls": targets["cls"][keep], "bboxes": targets["bboxes"][keep]}
