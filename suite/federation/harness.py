"""The evaluation harness's side channel: what each client trained on, kept outside Flower.

In the example federation every process runs on one machine, so the ClientApp writes its batch
(and, for the bit-for-bit test, the weight delta it computed) to a harness folder named by the
``GISTRESS_FLOWER_HARNESS`` environment variable. The server's audit reads a batch back only to
score a reconstruction after the attack; the attacker never sees it. Nothing here travels
through Flower, and a real deployment has no such folder (its audit logs no PSNR).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from suite.data.batch import Batch

ENV = "GISTRESS_FLOWER_HARNESS"


def harness_dir() -> Path | None:
    """The harness folder, or None when the federation runs without one."""
    value = os.environ.get(ENV)
    return Path(value) if value else None


def record_path(root: Path, server_round: int, node_id: int) -> Path:
    """Where one client's round is recorded."""
    return Path(root) / f"round{int(server_round)}-node{int(node_id)}.pt"


def record_round(server_round: int, node_id: int, batch: Batch, delta: dict[str, torch.Tensor]) -> Path | None:
    """ClientApp side: keep the batch and the delta θ_received − θ_trained this client sent
    (no-op without a harness folder)."""
    root = harness_dir()
    if root is None:
        return None
    root.mkdir(parents=True, exist_ok=True)
    path = record_path(root, server_round, node_id)
    torch.save({"images": batch.images, "labels": batch.labels, "boxes": batch.boxes,
                "classes": batch.classes, "content": batch.content, "ids": batch.ids,
                "delta": {k: v.detach().cpu().clone() for k, v in delta.items()}}, path)
    return path


def load_record(server_round: int, node_id: int, root: Path | None = None) -> dict | None:
    """The recorded round (batch fields and ``delta``), or None."""
    root = root or harness_dir()
    if root is None:
        return None
    path = record_path(root, server_round, node_id)
    return torch.load(path, weights_only=False) if path.exists() else None


def ground_truth(server_round: int, node_id: int) -> Batch | None:
    """Evaluation side: the Batch the client trained on in ``server_round``, or None (use as
    ``FederationAudit(ground_truth=...)``: it is read only to score, after the attack)."""
    rec = load_record(server_round, node_id)
    if rec is None:
        return None
    return Batch(images=rec["images"], labels=rec["labels"], boxes=rec["boxes"], classes=rec["classes"],
                 content=rec["content"], ids=list(rec["ids"]))
