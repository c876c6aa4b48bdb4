"""Positive controls for audits: is the attack, at this budget, able to catch a model that leaks?

A "no leak" verdict means something only when the same threat level, attack and budget are
shown to recover images from a model known to leak. For classifiers that reference is the DLG
sigmoid LeNet (Zhu et al. 2019), the textbook leaky network (DLG recovers it above 30 dB), fed
the audited images resized to its 32x32 input. Detection has no reference model here yet: no
detector configuration has been shown to leak at CPU budgets (docs/audit.md), so a detection
level that does not leak stays inconclusive rather than claiming "no leak".
"""

from __future__ import annotations

from suite.config import RunConfig

REFERENCE = {"classification": dict(variant="lenet", variant_options={}, weights="random", size=32)}

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


def control_config(level_config: RunConfig, task: str, num_classes: int) -> RunConfig | None:
    """The positive control of one audit level: the same threat model, attack, budget, images
    and seed on the task's reference model (with the audited model's classes, so the labels fit);
    None when the task has no reference."""
    ref = REFERENCE.get(task)
    if ref is None:
        return None
    data = level_config.model_dump()
    data.update(ref, trust_checkpoint=False)
    data["variant_options"] = {"num_classes": num_classes}
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
