"""The Batch record: what the client trains on and what scoring compares against."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """Images in [0, 1] with their annotations.

    images:  (B, 3, H, W) float32 in [0, 1].
    labels:  (B,) int64 class ids (classification), or None.
    boxes:   per image a (n_i, 4) float32 tensor of xyxy boxes in pixels of ``images`` (after the
             letterbox), or None (classification).
    classes: per image a (n_i,) int64 tensor of contiguous class ids (0..nc-1), or None.
    content: (B, 4) int64 xyxy pixel region holding real image content (the letterbox padding is
             outside it); defaults to the full image. Scores compare this region only.
    ids:     a name per image (sample name, file name or COCO image id).
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    boxes: list[torch.Tensor] | None = None
    classes: list[torch.Tensor] | None = None
    content: torch.Tensor | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        b, _, h, w = self.images.shape
        if self.content is None:
            self.content = torch.tensor([[0, 0, w, h]] * b, dtype=torch.int64)
        if not self.ids:
            self.ids = [str(i) for i in range(b)]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def to(self, device) -> Batch:
        """A copy on ``device`` (box lists included)."""
        mv = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
        return Batch(
            images=self.images.to(device),
            labels=None if self.labels is None else self.labels.to(device),
            boxes=mv(self.boxes),
            classes=mv(self.classes),
            content=self.content,
            ids=list(self.ids),
        )

    def yolo_targets(self) -> dict[str, torch.Tensor]:
        """The ultralytics training-batch fields: batch_idx (N,), cls (N, 1), bboxes (N, 4) xywhn."""
        if self.boxes is None or self.classes is None:
            raise ValueError("this batch has no boxes")
        h, w = self.size
        idx, cls, xywhn = [], [], []
        for i, (bx, cl) in enumerate(zip(self.boxes, self.classes)):
            bx = bx.float()
            cx = (bx[:, 0] + bx[:, 2]) / 2 / w
            cy = (bx[:, 1] + bx[:, 3]) / 2 / h
            bw = (bx[:, 2] - bx[:, 0]) / w
            bh = (bx[:, 3] - bx[:, 1]) / h
            xywhn.append(torch.stack([cx, cy, bw, bh], dim=1))
            cls.append(cl.float().view(-1, 1))
            idx.append(torch.full((len(bx),), float(i)))
        dev = self.images.device
        return {
            "batch_idx": torch.cat(idx).to(dev),
            "cls": torch.cat(cls).to(dev),
            "bboxes": torch.cat(xywhn).to(dev),
        }
