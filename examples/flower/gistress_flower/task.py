"""What both apps share: the model and each client's data (bundled sample images)."""

from __future__ import annotations

import variants
from suite import data


def build_model(run_config):
    """The variant named by the run config (``model``), seeded: both sides build the same one."""
    return variants.build(str(run_config["model"]), seed=0)


def load_partition(variant, partition_id: int, batch_size: int, size: int):
    """Client ``partition_id``'s images: ``batch_size`` bundled samples, a different slice per client."""
    ids = data.list_ids("samples", task=variant.task)
    start = (partition_id * batch_size) % len(ids)
    chosen = [ids[(start + i) % len(ids)] for i in range(batch_size)]
    return data.load("samples", task=variant.task, size=size, images=chosen, num_classes=variant.num_classes)
