"""Planning an audit: the battery resolved for one model, validated before anything is written.

``plan_audit`` builds the variant once and loads the images, so a bad variant, option,
checkpoint, image name or device fails with a one-line GistressError before any folder or MLflow
run exists. Each planned level carries its config (all audited images), its SoK assumption
level (``RunConfig.assumption_level``, computed here once per level) and its positive control.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from suite.audit.battery import BATTERY, REALISTIC, Budget, ThreatLevel, budget_for
from suite.audit.positive_control import control_config, reference_for, reference_size
from suite.config import RunConfig, first_error
from suite.errors import GistressError
from suite.keys import deep_merge, nest


@dataclass
class PlannedLevel:
    """A level that will run: its battery number, its config (all audited images) and notes."""

    number: int
    level: ThreatLevel
    config: RunConfig
    assumption_level: int
    notes: list[str] = field(default_factory=list)
    control: RunConfig | None = None  # the positive control: same level on the reference model
    is_control: bool = False          # this entry *is* a positive control

    @property
    def name(self) -> str:
        """The child run's name: ``<number>. <level>``, plus the reference model for a control."""
        base = f"{self.number}. {self.level.key}"
        return f"{base} · positive control ({self.config.variant})" if self.is_control else base

    def control_level(self) -> PlannedLevel | None:
        """The positive control as a plannable level of its own (its own child run)."""
        if self.control is None:
            return None
        return PlannedLevel(self.number, self.level, self.control, self.assumption_level,
                            notes=[f"positive control on {self.control.variant}"], is_control=True)

    def client_configs(self) -> list[RunConfig]:
        """One config per client batch: each image on its own (batch of 1)."""
        data = self.config.model_dump()
        return [RunConfig(**{**data, "images": [img]}) for img in self.config.images]


@dataclass
class AuditPlan:
    """The resolved audit: which levels run with which configs, which are skipped and why."""

    base: RunConfig
    budget: Budget
    images: list[str]
    size: int
    task: str
    has_bn: bool
    levels: list[PlannedLevel]
    skipped: list[tuple[int, ThreatLevel, str]]
    notes: list[str]
    iterations_override: int | None = None
    positive_control: bool = True     # run each level's positive control (--no-positive-control: off)
    reference: str | None = None      # the known-leaky reference model, when the task has one
    overrides: list[str] = field(default_factory=list)  # the user's --set items (tag audit.set)

    def battery_lines(self) -> list[str]:
        """Every battery entry in order, with its config summary or the reason it is skipped."""
        planned = {p.number: p for p in self.levels}
        skipped = {n: why for n, _, why in self.skipped}
        lines = []
        for n, lv in enumerate(BATTERY, start=1):
            if n in planned and planned[n].config.attack.closed_form:
                lines.append(f"{n}. {lv.key}: {lv.grants} [{planned[n].notes[0]}; no positive control: the "
                             "solve's residual and rank are its evidence]")
            elif n in planned:
                a, t = planned[n].config.attack, planned[n].config.threat
                lines.append(f"{n}. {lv.key}: {lv.grants} [bn_mode={t.bn_mode}, update={t.update}"
                             + (f" x{t.local_steps} steps lr {t.local_lr}" if t.update == "fedavg" else "")
                             + f", shares_labels={str(t.shares_labels).lower()}, bn_stats={t.bn_stats}, "
                             f"preset={a.preset}, {a.iterations} iterations x {a.restarts} restart(s), "
                             f"weights={planned[n].config.weights}, control on"
                             + (f", positive control on {planned[n].control.variant}" if planned[n].control else "")
                             + "]")
            else:
                lines.append(f"{n}. {lv.key}: skipped ({skipped.get(n, 'not planned')})")
        return lines


def plan_audit(base: RunConfig, budget: str = "quick", *, iterations: int | None = None,
               positive_control: bool = True) -> AuditPlan:
    """Resolve the battery for ``base`` (variant, weights, data, images, size, seed, device).

    Builds the variant once and loads the images, so a bad variant, option, checkpoint, image
    name or device fails here with a one-line GistressError, before anything is written.
    """
    import variants
    from suite import data
    from suite.execution.runner import resolve_device
    from suite.model.bnstats import has_bn

    b = budget_for(budget)
    if iterations is not None and (isinstance(iterations, bool) or not isinstance(iterations, int)
                                   or iterations < 1):
        raise GistressError(f"--iterations {iterations!r} must be a positive integer", "use e.g. --iterations 8")
    resolve_device(base.device)
    variant = variants.build(base.variant, weights=base.weights, seed=base.seed,
                             trust_checkpoint=base.trust_checkpoint, **base.variant_options)
    model_has_bn = has_bn(variant.model)
    task = variant.task
    notes: list[str] = []
    if base.size is not None:
        size = base.size
        notes.append(f"size {size} px set by --size (the {b.name} budget would use "
                     f"{_budget_size(b, variant.input_size)} px)")
    else:
        size = _budget_size(b, variant.input_size)
    images = list(base.images)
    if not images:
        raise GistressError("no images to audit", "pass --images N or --image NAME")
    if len(set(images)) != len(images):
        raise GistressError(f"image listed twice in {','.join(images)}", "name each image once")
    if b.max_images and len(images) > b.max_images:
        notes.append(f"the {b.name} level audits at most {b.max_images} images: "
                     f"{', '.join(images[b.max_images:])} not attacked (use --level thorough for all)")
        images = images[: b.max_images]
    # loading validates names, labels against num_classes and boxes now rather than per level
    data.load(base.data, task=task, size=size, images=images, num_classes=variant.num_classes, seed=base.seed)
    if iterations is not None:
        notes.append(f"budget overridden with --iterations {iterations}: every level ran {iterations} "
                     f"iterations instead of the {b.name} budget's; not comparable to a standard "
                     f"{b.name} audit")

    levels: list[PlannedLevel] = []
    skipped: list[tuple[int, ThreatLevel, str]] = []
    for number, lv in enumerate(BATTERY, start=1):
        if lv.bn_only and not model_has_bn:
            skipped.append((number, lv, "no BatchNorm layers"))
            continue
        if lv.classification_only and task != "classification":
            skipped.append((number, lv, "detection: boxes and classes are always shared"))
            continue
        if lv.closed_form:
            method, why = _closed_form_fit(variant, size, task)
            if method is None:
                skipped.append((number, lv, f"not applicable: {why}"))
                continue
            lv = ThreatLevel(**{**lv.__dict__, "preset": method})
        pl = _plan_level(number, lv, base, b, images, size, model_has_bn, iterations, task)
        if lv.closed_form:
            pl.notes.insert(0, f"{lv.preset} applies: {why}")
            levels.append(pl)  # its residual is its evidence: no positive control
            continue
        if positive_control:
            pl.control = control_config(pl.config, task, variant.num_classes)
        levels.append(pl)
    reference = reference_for(task)
    if positive_control and reference:
        notes.append(f"positive controls: every level also ran, at the same budget and on the same images "
                     f"(resized to {reference_size(task)} px), on {reference}, a model known to leak; a level that did not leak "
                     "reads 'no leak at this budget' only where its positive control leaked, else "
                     "'inconclusive'")
    elif positive_control:
        notes.append(f"positive controls: no known-leaky reference model exists for {task} yet, so a level "
                     "that did not leak is reported 'inconclusive', not 'no leak'")
    else:
        notes.append("positive controls switched off (--no-positive-control): a level that did not leak "
                     "reads 'no leak (sensitivity not checked)'")
    if task == "detection":
        notes.append("detection: boxes and classes are shared at every level (the detection attack "
                     "needs them; recorded as the grant labels=boxes+classes)")
    if not model_has_bn:
        notes.append("no BatchNorm layers: the BN levels (2, 3) are skipped and the strongest level "
                     "keeps train mode with no BN statistics")
    if model_has_bn and base.weights == "random":
        notes.append("weights=random: the inference-mode levels (3, 6) use BN statistics calibrated on "
                     "data (weights=calibrated) because eval-mode BN on random 0/1 statistics is "
                     "meaningless; a random model is not the checkpoint your clients train, so audit "
                     "that checkpoint with --weights file:<path>")
    return AuditPlan(base=base, budget=b, images=images, size=size, task=task, has_bn=model_has_bn, levels=levels,
                     skipped=skipped, notes=notes, iterations_override=iterations,
                     positive_control=positive_control, reference=reference_for(task) if positive_control else None)


def _closed_form_fit(variant, size: int, task: str) -> tuple[str | None, str]:
    """The closed form that applies to an audited client batch of one image, and why; (None, why
    not) where neither does."""
    from suite.attack.closed_form import fit

    if task != "classification":
        return None, "the closed forms read a classifier's first layer; a detector's stem is a strided convolution"
    found = fit(variant, (size, size), REALISTIC["bn_mode"])
    if found.layer.kind == "other":
        return None, (f"neither closed form fits the first layer ({found.layer.describe}): APRIL needs a patch "
                      "embedding followed by a learnable position embedding, the linear solve a dense first "
                      "layer with a bias")
    return (found.method, found.reason) if found.applies else (None, found.reason)


def _budget_size(b: Budget, input_size: int) -> int:
    return min(input_size, b.size_cap) if b.size_cap else input_size


def _plan_level(number: int, lv: ThreatLevel, base: RunConfig, b: Budget, images: list[str], size: int,
                has_bn: bool, iterations: int | None, task: str) -> PlannedLevel:
    threat = {**REALISTIC, **lv.threat}
    notes = []
    if lv.strongest and not has_bn:
        threat = dict(REALISTIC)  # eval mode would only switch dropout off; no BN stats exist
        notes.append("no BatchNorm: train mode, no BN statistics")
    iters = iterations or {"gia_bn": b.gia_bn_iterations, "dlg": b.dlg_iterations}.get(lv.preset, b.ig_iterations)
    restarts = b.strongest_restarts if lv.strongest else 1
    attack = dict(preset=lv.preset, iterations=iters, restarts=restarts, control=not lv.closed_form)
    weights = base.weights
    if lv.eval_mode and has_bn and weights == "random":
        weights = "calibrated"
        notes.append("random weights: BN statistics calibrated on data")
    cfg = RunConfig(**{**base.model_dump(), "images": images, "size": size, "weights": weights,
                       "threat": threat, "attack": attack})
    level = cfg.assumption_level(task, has_bn=has_bn)
    return PlannedLevel(number=number, level=lv, config=cfg, assumption_level=level, notes=notes)


def fixed_keys() -> set[str]:
    """The dotted keys the battery's levels set themselves: every threat-model key a level grants
    (the realistic client's included), the attack preset and the prior-only control. ``--set`` on
    one of them is refused: it would change what the level measures."""
    threat = set(REALISTIC).union(*(lv.threat for lv in BATTERY))
    return {f"threat.{k}" for k in threat} | {"attack.preset", "attack.control", "attack.method"}


def apply_to_levels(plan, level_keys: dict) -> None:
    """Apply dotted ``threat.*`` / ``attack.*`` overrides to every planned level and its positive
    control, re-validating each config and recomputing the level's assumption level."""
    over = nest(level_keys)
    for pl in plan.levels:
        try:
            pl.config = RunConfig(**deep_merge(pl.config.model_dump(), over))
            if pl.control is not None:
                pl.control = RunConfig(**deep_merge(pl.control.model_dump(), over))
        except ValidationError as exc:
            raise GistressError(f"level {pl.number} ({pl.level.key}): {first_error(exc)}",
                                "change or drop that --set") from None
        pl.assumption_level = pl.config.assumption_level(plan.task, has_bn=plan.has_bn)
