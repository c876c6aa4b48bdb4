"""Positive controls for audits: is the attack, at this budget, able to catch a model that leaks?

A "no leak" verdict means something only when the same threat level, attack and budget are
shown to recover images from a model known to leak. For classifiers that reference is the DLG
sigmoid LeNet (Zhu et al. 2019), the textbook leaky network (DLG recovers it above 30 dB), fed
the audited images resized to its 32x32 input. For detectors it is ``yolo-ref``
(variants/yolo.py): a DLG-style backbone (three tanh 5x5 convolutions of 256 channels, no BN,
U(-0.07, 0.07), random weights from the audit's seed) feeding ultralytics' real Detect head and
v8DetectionLoss, fed the audited images letterboxed to 32 px (boxes scaled with them). The
``ig`` and ``gia_bn`` presets invert its one-step update at the quick budget's 100 iterations
(levels 1, 2, 3, 6), not its 4-step FedAvg delta (level 5); docs/audit.md, "Positive controls",
has the numbers and the table of what was tried.
"""

from __future__ import annotations

from suite.config import RunConfig

REFERENCE = {
    "classification": dict(variant="lenet", variant_options={}, weights="random", size=32),
    "detection": dict(variant="yolo-ref", variant_options={}, weights="random", size=32),
}
# the variant option that carries the audited model's number of classes, per task
CLASSES_OPTION = {"classification": "num_classes", "detection": "nc"}

# a level's verdict, in the words the tables and the conclusion use
LEAK = "leak"
NO_LEAK = "no leak at this budget"
INCONCLUSIVE = "inconclusive"
UNCHECKED = "no leak (sensitivity not checked)"
EXACT_NOT_LEAKED = "no leak (closed form: {evidence})"


def reference_for(task: str) -> str | None:
    """The known-leaky reference variant for ``task`` (None: no reference exists)."""
    ref = REFERENCE.get(task)
    return ref["variant"] if ref else None


def reference_size(task: str) -> int | None:
    """The input size the audited images are resized (classification) or letterboxed (detection)
    to for ``task``'s reference model (None: no reference exists)."""
    ref = REFERENCE.get(task)
    return ref["size"] if ref else None


def control_config(level_config: RunConfig, task: str, num_classes: int) -> RunConfig | None:
    """The positive control of one audit level: the same threat model, attack, budget, images
    and seed on the task's reference model, at the reference's input size (the data loader resizes
    the images and, for detection, letterboxes them and scales their boxes to that size), with the
    audited model's classes so the labels fit; None when the task has no reference."""
    ref = REFERENCE.get(task)
    if ref is None:
        return None
    data = level_config.model_dump()
    data.update(ref, trust_checkpoint=False)
    data["variant_options"] = {**ref["variant_options"], CLASSES_OPTION[task]: num_classes}
    return RunConfig(**data)


def level_verdict(leaked: bool | None, control_leaked: bool | None, control_planned: bool,
                  closed_form_evidence: str | None = None) -> str | None:
    """``leak``; ``no leak at this budget`` only when the positive control leaked; otherwise
    ``inconclusive`` (control ran and missed, failed, or no reference exists) or, when the user
    switched controls off, ``no leak (sensitivity not checked)``. A closed-form level needs no
    control: its quiet verdict carries the solve's own evidence (``closed_form_evidence``: residual
    and rank). None: the level did not finish."""
    if leaked is None:
        return None
    if leaked:
        return LEAK
    if closed_form_evidence is not None:
        return EXACT_NOT_LEAKED.format(evidence=closed_form_evidence)
    if not control_planned:
        return UNCHECKED
    return NO_LEAK if control_leaked else INCONCLUSIVE
