"""Planning an audit: the battery resolved for one model, validated before anything is written.

``plan_audit`` builds the variant once and loads the images, so a bad variant, option,
checkpoint, image name or device fails with a one-line GistressError before any folder or MLflow
run exists. Each planned level carries its config (all audited images), its SoK assumption
level (``RunConfig.assumption_level``, computed here once per level), its positive control (the
reference model for its attack at the size nearest the audited one) and its budget schedule: the
iterations the control tries in order (``Budget.schedule``; one entry where the budget is fixed).
Running the schedule (control first, then the audited model at the budget it set) is ``run.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import ValidationError

from suite.audit.battery import BATTERY, PRIOR_WEIGHTS, REALISTIC, Budget, ThreatLevel, budget_for
from suite.audit.positive_control import Reference, control_config, reference_for
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
    budgets: tuple[int, ...] = ()     # the iterations the control tries in order (empty: the config's)
    reference: Reference | None = None  # the reference model the control runs on

    @property
    def name(self) -> str:
        """The child run's name: ``<number>. <level>``, plus the reference model and budget for a control."""
        base = f"{self.number}. {self.level.key}"
        if self.is_control:
            return f"{base} · positive control ({self.config.variant}, {self.config.attack.iterations} it)"
        return base

    @property
    def searched(self) -> bool:
        """Whether the budget is set by the positive control (more than one budget to try)."""
        return len(self.budgets) > 1

    def at(self, iterations: int) -> PlannedLevel:
        """This level with its budget set to ``iterations`` (the control's config too)."""
        return PlannedLevel(self.number, self.level, _with_iterations(self.config, iterations), self.assumption_level,
                            notes=list(self.notes), control=None if self.control is None else
                            _with_iterations(self.control, iterations), is_control=self.is_control,
                            budgets=(iterations,), reference=self.reference)

    def control_level(self, iterations: int | None = None) -> PlannedLevel | None:
        """The positive control as a plannable level of its own (its own child run), at
        ``iterations`` (default: its planned budget)."""
        if self.control is None:
            return None
        cfg = self.control if iterations is None else _with_iterations(self.control, iterations)
        return PlannedLevel(self.number, self.level, cfg, self.assumption_level,
                            notes=[f"positive control on {cfg.variant} at {cfg.size} px"], is_control=True,
                            budgets=(cfg.attack.iterations,), reference=self.reference)

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
    reference: str | None = None      # the known-leaky reference model(s), named, when the task has one
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
                             f"preset={a.preset}, {_budget_words(planned[n])} x {a.restarts} restart(s)"
                             + (f" at TV weights {' and '.join(f'{w:g}' for w in a.tv_choices)} (lowest matching "
                                "loss kept)" if a.tv_choices else "") + ", "
                             f"weights={planned[n].config.weights}, control on"
                             + (f", positive control on {planned[n].reference.label}" if planned[n].control else "")
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
                     f"iterations instead of the {b.name} budget's (fixed: no search by the positive "
                     f"control); not comparable to a standard {b.name} audit")

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
            pl.control = control_config(pl.config, task, variant.num_classes, size)
            pl.reference = (reference_for(task, size, lv.preset, pl.config.threat.update)
                            if pl.control is not None else None)
        # the budget is searched only where a control can set it and no --iterations fixes it
        if pl.control is not None and iterations is None:
            pl.budgets = b.schedule(lv.preset)
        levels.append(pl)
    refs: list[Reference] = []
    for p in levels:
        if p.reference is not None and p.reference not in refs:
            refs.append(p.reference)
    reference = ", ".join(r.variant for r in refs) or None
    if positive_control and refs:
        used = "; ".join(f"{r.label} for preset(s) {', '.join(sorted({p.level.preset for p in levels if p.reference == r}))}"
                         for r in refs)
        notes.append(f"positive controls: every level also ran, at the same budget and on the same images "
                     f"(resized to the reference's size), on a model known to leak ({used}); a level that did "
                     "not leak reads 'no leak at this budget' only where its positive control leaked, else "
                     "'inconclusive'")
        differ = [p for p in levels if p.reference is not None and p.reference.size != size]
        if differ:
            at = sorted({p.reference.size for p in differ})
            notes.append(f"positive control at {', '.join(str(z) for z in at)} px, audited model at {size} px "
                         f"(level(s) {', '.join(str(p.number) for p in differ)}): no known-leaky reference has "
                         "been measured at this size for that attack and update, so the nearest one stands in")
        if any(p.searched for p in levels):
            notes.append(f"budgets set by sensitivity ({b.name}): per level the positive control ran at "
                         f"{b.ig_iterations:,} iterations, then doubled up to the cap until it leaked, and the "
                         "audited model ran at the first budget its control leaked at (at the cap if it never "
                         "did: that level stays inconclusive); each row's budget column says which")
        elif b.cap_for("ig") is None:
            notes.append(f"the {b.name} budget is fixed (paper scale); each positive control ran once at it")
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
                     "data (weights=calibrated) because eval-mode BN on random 0/1 statistics only "
                     "rescales, leaving a network no client trains; a random model is not the checkpoint your clients train, so audit "
                     "that checkpoint with --weights file:<path>")
    return AuditPlan(base=base, budget=b, images=images, size=size, task=task, has_bn=model_has_bn, levels=levels,
                     skipped=skipped, notes=notes, iterations_override=iterations,
                     positive_control=positive_control, reference=reference if positive_control else None)


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
    iters = iterations or b.iterations_for(lv.preset)
    restarts = b.strongest_restarts if lv.strongest else 1
    attack = dict(preset=lv.preset, iterations=iters, restarts=restarts, control=not lv.closed_form)
    if lv.preset in PRIOR_WEIGHTS:
        attack["tv_choices"] = list(PRIOR_WEIGHTS[lv.preset])
    weights = base.weights
    if lv.eval_mode and has_bn and weights == "random":
        weights = "calibrated"
        notes.append("random weights: BN statistics calibrated on data")
    cfg = RunConfig(**{**base.model_dump(), "images": images, "size": size, "weights": weights,
                       "threat": threat, "attack": attack})
    level = cfg.assumption_level(task, has_bn=has_bn)
    return PlannedLevel(number=number, level=lv, config=cfg, assumption_level=level, notes=notes)


def _with_iterations(cfg: RunConfig, iterations: int) -> RunConfig:
    """``cfg`` with ``attack.iterations`` set (re-validated, as every config here is)."""
    data = cfg.model_dump()
    return RunConfig(**{**data, "attack": {**data["attack"], "iterations": iterations}})


def _budget_words(pl: PlannedLevel) -> str:
    """A level's budget in the battery lines: fixed, or the control's search from base to cap."""
    if pl.searched:
        return (f"{pl.budgets[0]}-{pl.budgets[-1]:,} iterations (doubling until the positive control "
                "leaks; the level runs at that budget)")
    return f"{pl.config.attack.iterations} iterations"


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
    if "tv" in over.get("attack", {}) and "tv_choices" not in over["attack"]:
        over["attack"]["tv_choices"] = None  # the user's one weight replaces the level's choices
    for pl in plan.levels:
        try:
            pl.config = RunConfig(**deep_merge(pl.config.model_dump(), over))
            if pl.control is not None:
                pl.control = RunConfig(**deep_merge(pl.control.model_dump(), over))
        except ValidationError as exc:
            raise GistressError(f"level {pl.number} ({pl.level.key}): {first_error(exc)}",
                                "change or drop that --set") from None
        pl.assumption_level = pl.config.assumption_level(plan.task, has_bn=plan.has_bn)
