"""Positive controls for audits: is the attack, at this budget, able to catch a model that leaks?

A "no leak" verdict means something only when the same threat level, attack and budget are
shown to recover images from a model known to leak, at the audited model's scale. ``REFERENCE``
lists, per task, the known-leaky reference models, each with the input size it was measured at
and the attacks (presets) measured to recover it there within the quick budget's cap
(``python -m bench references``; numbers in docs/audit.md). A level's positive control is the
reference that covers its preset at the size nearest the audited one (ties: the larger size,
then list order), fed the audited images resized to that size. Where the sizes still differ the
report says so ("positive control at 32 px, audited model at 128 px").

Classification: DLG's sigmoid LeNet (Zhu et al. 2019) for DLG at 32 px; the "2NN" MLP of
McMahan et al. (2017, ReLU, dense first layer) for ``ig`` and ``gia_bn`` at 32 and at 224 px,
because those presets do not recover the sigmoid LeNet by the leak rule even at 1,600 iterations.
No reference leaks under DLG at 224 px within a CPU budget yet, and the 224 px MLP's FedAvg level
is too slow for a control (over 12 minutes per image at 100 iterations), so those controls stay at
32 px and the report says the scales differ.

Detection: ``yolo-ref`` (variants/yolo.py), a DLG-style backbone (three tanh 5x5 convolutions
of 256 channels, no BN, U(-0.07, 0.07), random weights from the audit's seed) feeding
ultralytics' real Detect head and v8DetectionLoss, fed the audited images letterboxed to 32 px
(boxes scaled with them). ``ig`` and ``gia_bn`` invert its one-step update at 100 iterations
(levels 1, 2, 3, 6); its 4-step FedAvg delta (level 5) is not inverted at 100 (10.9 dB) but is at
800 (``bus``: 17.6 dB against a 6.3 dB control, content gain +3.4 dB against +0.2, 337 s with the
control at one thread), so level 5's search finds its budget on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from suite.config import RunConfig

ALL_PRESETS = ("ig", "gia_bn", "dlg")


@dataclass(frozen=True)
class Reference:
    """A model known to leak at ``size`` px under the attacks in ``presets`` and the client updates
    in ``updates`` (random weights by default); ``variant_options`` build it at that size."""

    variant: str
    size: int
    presets: tuple[str, ...] = ALL_PRESETS
    variant_options: dict = field(default_factory=dict)
    weights: str = "random"
    updates: tuple[str, ...] = ("gradient", "fedavg")

    @property
    def label(self) -> str:
        """``<variant> at <size> px``: how the report names it."""
        return f"{self.variant} at {self.size} px"

    def covers(self, preset: str, update: str = "gradient") -> bool:
        """Whether this reference was measured to leak, affordably, under ``preset`` and ``update``."""
        return preset in self.presets and update in self.updates


# task -> the known-leaky references, each with its size; order breaks ties at equal distance
REFERENCE: dict[str, tuple[Reference, ...]] = {
    "classification": (
        Reference("lenet", 32, presets=("dlg",)),
        # DLG stalls on it for smooth images (chelsea: 8.6 dB at every budget up to 1,600): DLG uses LeNet
        Reference("mlp", 32, presets=("ig", "gia_bn")),
        # DLG does not recover it at 224 px in 100 L-BFGS steps (6.0 dB, 2 min per image), and FedAvg's
        # unrolled steps take over 12 min per image at 100 iterations: those controls stay at 32 px
        Reference("mlp", 224, presets=("ig", "gia_bn"), variant_options={"input_size": 224}, updates=("gradient",)),
    ),
    "detection": (Reference("yolo-ref", 32, presets=("ig", "gia_bn")),),
}
# the variant option that carries the audited model's number of classes, per task
CLASSES_OPTION = {"classification": "num_classes", "detection": "nc"}

# a level's verdict, in the words the tables and the conclusion use
LEAK = "leak"
NO_LEAK = "no leak at this budget"
INCONCLUSIVE = "inconclusive"
UNCHECKED = "no leak (sensitivity not checked)"
EXACT_NOT_LEAKED = "no leak (closed form: {evidence})"


def reference_for(task: str, size: int, preset: str, update: str = "gradient") -> Reference | None:
    """The known-leaky reference for ``task``'s attack ``preset`` on a client sending ``update``, at
    the size nearest ``size`` (ties: the larger size, then list order); None when none exists."""
    found = [(i, r) for i, r in enumerate(REFERENCE.get(task, ())) if r.covers(preset, update)]
    if not found:
        return None
    return min(found, key=lambda ir: (abs(ir[1].size - size), -ir[1].size, ir[0]))[1]


def control_config(level_config: RunConfig, task: str, num_classes: int, size: int) -> RunConfig | None:
    """The positive control of one audit level on a model audited at ``size`` px: the same threat
    model, attack, budget, images and seed on the task's reference for that attack and size (with
    the audited model's classes, so the labels fit); None when no reference exists."""
    ref = reference_for(task, size, level_config.attack.preset or "ig", level_config.threat.update)
    if ref is None:
        return None
    data = level_config.model_dump()
    data.update(variant=ref.variant, weights=ref.weights, size=ref.size, trust_checkpoint=False,
                variant_options={**ref.variant_options, CLASSES_OPTION[task]: num_classes})
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
