"""Leakage audit of one model: a fixed battery of threat levels, one MLflow parent run, a verdict.

The question it answers: "if my clients train this checkpoint on their data, can the server see
their images?" The battery is fixed and ordered from the realistic client to the upper bound, so
two audits of different models (or of the same model at two checkpoints) are comparable:

1. ``realistic``        train-mode BN, one FedSGD gradient, labels shared (detection: boxes and
                        classes, which the detection attack needs), no BN statistics shared.
2. ``bn_running``       1 + the BN running-statistics update (``threat.bn_stats=running``); the
                        recovered batch statistics enter through preset ``gia_bn``'s BN prior (the
                        engine uses shared statistics only as a prior, so ``ig`` would ignore them).
3. ``bn_eval``          1 with inference-mode BN (``bn_mode=eval``): an upper bound. Random weights
                        are replaced by data-calibrated BN statistics (eval mode on 0/1 running
                        statistics is meaningless).
4. ``labels_inferred``  1 with labels not shared: inferred from the gradient (classification only).
5. ``fedavg``           FedAvg, 4 local SGD steps at lr 0.01, the server knows those values.
6. ``strongest``        preset ``gia_bn`` with restarts, exact BN batch statistics, inference-mode
                        BN: the upper bound.

Levels 1, 3, 4, 5 use the ``ig`` preset (cosine matching + total variation), 2 and 6 ``gia_bn``. Every level runs the
prior-only control (same start and budget, gradient term off), so the gradient's own gain is known.
Models without BatchNorm skip levels 2 and 3 (and level 6 keeps train mode); detection skips 4.

Client batches: each audited image is attacked as its own client batch of 1, the setting most
favourable to the attacker and the usual audit choice. Per level, BRR is the fraction of images
whose reconstruction (the restart the attacker picks by matching loss) leaked, and WSRR is the
fraction of all independent attack attempts (image x restart) in which the image leaked. A sample
leaked if PSNR >= 18 dB and LPIPS <= 0.1 (PSNR alone when the LPIPS backbone is missing).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.audit.positive_control import INCONCLUSIVE, NO_LEAK, control_config, level_verdict, reference_for
from suite.config import RunConfig
from suite.errors import GistressError, close_matches
from suite.results import jsonable

# The realistic client every level starts from.
REALISTIC = dict(bn_mode="train", update="gradient", shares_labels=True, bn_stats="none",
                 attacker_knows_training=True)
KIND = "audit"
LEVEL_KIND = "audit_level"
CONTROL_KIND = "audit_positive_control"


@dataclass(frozen=True)
class ThreatLevel:
    """One entry of the battery: the threat-model change and the words the report uses."""

    key: str
    title: str                      # short name for the table
    grants: str                     # what the server gets, in plain words
    needs: str                      # "leaks only with <needs>"
    threat: dict
    preset: str = "ig"
    bn_only: bool = False           # meaningless without BatchNorm layers
    classification_only: bool = False
    eval_mode: bool = False         # needs non-random BN statistics
    strongest: bool = False


BATTERY: tuple[ThreatLevel, ...] = (
    ThreatLevel(
        "realistic", "realistic",
        "train-mode BN, one FedSGD gradient, labels shared (detection: boxes and classes), "
        "no BN statistics shared",
        "a realistic client (train-mode BN, one FedSGD gradient, labels shared)", {}),
    ThreatLevel(
        "bn_running", "+ BN running stats",
        "level 1 plus the client's BN running-statistics update: the server recovers the batch "
        "statistics from it and attacks with preset gia_bn, whose BN-statistics prior uses them",
        "the BN running-statistics update shared", {"bn_stats": "running"}, preset="gia_bn", bn_only=True),
    ThreatLevel(
        "bn_eval", "inference-mode BN",
        "level 1 with the client's BN in inference mode (running statistics): an upper bound",
        "inference-mode BN (an upper bound)", {"bn_mode": "eval"}, bn_only=True, eval_mode=True),
    ThreatLevel(
        "labels_inferred", "labels inferred",
        "level 1 without labels: the server infers them from the gradient",
        "labels inferred from the gradient", {"shares_labels": False}, classification_only=True),
    ThreatLevel(
        "fedavg", "FedAvg, 4 local steps",
        "FedAvg: 4 local SGD steps at lr 0.01 on the client's batch; the server knows those "
        "hyper-parameters and unrolls them",
        "FedAvg with the local hyper-parameters known",
        {"update": "fedavg", "local_steps": 4, "local_lr": 0.01, "attacker_knows_training": True}),
    ThreatLevel(
        "strongest", "strongest (gia_bn)",
        "the client's exact BN batch statistics, inference-mode BN, attack preset gia_bn "
        "(BN-statistics prior) with restarts: the upper bound",
        "the strongest attack (exact BN batch statistics, inference-mode BN, BN prior, restarts: "
        "an upper bound)",
        {"bn_mode": "eval", "bn_stats": "exact"}, preset="gia_bn", eval_mode=True, strongest=True),
    ThreatLevel(
        "dlg", "DLG (L2, L-BFGS)",
        "level 1 attacked with DLG instead: squared-L2 gradient matching and L-BFGS (joint soft labels "
        "when labels are not shared), the attack small sigmoid networks fall to where ig does not",
        "the DLG attack (L2 matching, L-BFGS)", {}, preset="dlg", classification_only=True),
)


@dataclass(frozen=True)
class Budget:
    """How hard every level tries. ``size_cap`` None: the variant's own input size."""

    name: str
    ig_iterations: int              # levels with preset ig (1, 3, 4, 5)
    gia_bn_iterations: int          # levels with preset gia_bn (2, 6)
    dlg_iterations: int             # level 7 (preset dlg): L-BFGS steps, up to 20 evaluations each
    strongest_restarts: int         # level 6; every other level runs one restart
    max_images: int | None
    default_images: int
    size_cap: int | None
    meant_for: str

    def describe(self) -> str:
        """One line for the report."""
        size = f"the variant's input size capped at {self.size_cap} px" if self.size_cap else \
            "the variant's full input size"
        imgs = f"at most {self.max_images} images" if self.max_images else "every requested image"
        return (f"{self.name}: preset ig {self.ig_iterations:,} iterations, preset gia_bn "
                f"{self.gia_bn_iterations:,} iterations, preset dlg {self.dlg_iterations:,} L-BFGS steps; 1 restart, level 6 {self.strongest_restarts} restarts; "
                f"{imgs} (default {self.default_images}); {size}; meant for {self.meant_for}")


BUDGETS: dict[str, Budget] = {
    "quick": Budget("quick", ig_iterations=100, gia_bn_iterations=100, dlg_iterations=100, strongest_restarts=2, max_images=2,
                    default_images=2, size_cap=256, meant_for="a laptop CPU (minutes)"),
    "thorough": Budget("thorough", ig_iterations=24_000, gia_bn_iterations=10_000, dlg_iterations=1_200,
                       strongest_restarts=4,
                       max_images=None, default_images=8, size_cap=None,
                       meant_for="a GPU (paper scale: IG 24,000, gia_bn 10,000 and DLG 1,200 iterations)"),
}

# Verdict table: (key, header). The same columns in the terminal, report, CSV and JSON.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("level", "#"),
    ("threat_level", "threat level"),
    ("assumption_level", "SoK level"),
    ("brr", "BRR"),
    ("wsrr", "WSRR"),
    ("psnr", "PSNR dB (median)"),
    ("ssim", "SSIM (median)"),
    ("lpips", "LPIPS (median)"),
    ("gain_psnr", "gain dB (median)"),
    ("positive_control", "positive control"),
    ("leaked", "leaked"),
)
# A level's gradient gain below this (dB) means the prior alone explains most of a leak.
SMALL_GAIN_DB = 1.0


def budget_for(name: str) -> Budget:
    """The named audit budget; a one-line error with the nearest name otherwise."""
    if name in BUDGETS:
        return BUDGETS[name]
    near = close_matches(str(name), BUDGETS, n=1)
    raise GistressError(f"unknown audit level '{name}'" + (f" (did you mean '{near}'?)" if near else ""),
                        f"use --level {' or --level '.join(BUDGETS)}")


# ---------------------------------------------------------------------------------------------
# planning: everything is validated here, before any folder or MLflow run exists
# ---------------------------------------------------------------------------------------------


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

    def battery_lines(self) -> list[str]:
        """Every battery entry in order, with its config summary or the reason it is skipped."""
        planned = {p.number: p for p in self.levels}
        skipped = {n: why for n, _, why in self.skipped}
        lines = []
        for n, lv in enumerate(BATTERY, start=1):
            if n in planned:
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
        pl = _plan_level(number, lv, base, b, images, size, model_has_bn, iterations, task)
        if positive_control:
            pl.control = control_config(pl.config, task, variant.num_classes)
        levels.append(pl)
    reference = reference_for(task)
    if positive_control and reference:
        notes.append(f"positive controls: every level also ran, at the same budget and on the same images "
                     f"(resized to 32 px), on {reference}, a model known to leak; a level that did not leak "
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
    attack = dict(preset=lv.preset, iterations=iters, restarts=restarts, control=True)
    weights = base.weights
    if lv.eval_mode and has_bn and weights == "random":
        weights = "calibrated"
        notes.append("random weights: BN statistics calibrated on data")
    cfg = RunConfig(**{**base.model_dump(), "images": images, "size": size, "weights": weights,
                       "threat": threat, "attack": attack})
    level = cfg.assumption_level(task, has_bn=has_bn)
    return PlannedLevel(number=number, level=lv, config=cfg, assumption_level=level, notes=notes)


# ---------------------------------------------------------------------------------------------
# per-level aggregation
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One audited image at one level: its scores and the images the report shows."""

    image: str
    psnr: float
    ssim: float
    lpips: float | None
    leaked: bool
    gain_psnr: float | None
    control_psnr: float | None
    target: Any = None              # (3, H, W) tensors, CPU
    reconstruction: Any = None
    control: Any = None
    boxes: Any = None


@dataclass
class LevelOutcome:
    """What one battery entry produced (or why it did not)."""

    number: int
    level: ThreatLevel
    status: str                     # FINISHED | FAILED | KILLED | SKIPPED | NOT RUN
    error: str | None = None
    run_id: str | None = None
    assumption_level: int | None = None
    upper_bound: bool | None = None
    samples: list[Sample] = field(default_factory=list)
    attempts_leaked: list[bool] = field(default_factory=list)  # one per (image, restart)
    lpips_missing: str | None = None
    leak_rule: str | None = None
    tags: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    figure: Path | None = None
    positive: LevelOutcome | None = None   # the positive control's outcome (same level, reference model)
    config_variant: str | None = None      # the variant this outcome attacked
    control_expected: bool = False         # positive controls were asked for

    @property
    def verdict(self) -> str | None:
        """leak | no leak at this budget | inconclusive | no leak (sensitivity not checked); None
        when the level did not finish."""
        return level_verdict(self.leaked, None if self.positive is None else self.positive.leaked,
                             self.control_expected)

    @property
    def brr(self) -> float | None:
        return sum(s.leaked for s in self.samples) / len(self.samples) if self.samples else None

    @property
    def wsrr(self) -> float | None:
        return sum(self.attempts_leaked) / len(self.attempts_leaked) if self.attempts_leaked else None

    @property
    def leaked(self) -> bool | None:
        return None if self.status != "FINISHED" else any(s.leaked for s in self.samples)

    def median(self, key: str) -> float | None:
        """Median of a per-sample score; None when any sample lacks it (LPIPS missing)."""
        values = [getattr(s, key) for s in self.samples]
        if not values or any(v is None for v in values):
            return None
        return float(statistics.median(values))

    def best_and_median(self) -> list[tuple[str, Sample]]:
        """The highest-PSNR sample and the (lower) median-PSNR one; one entry for one image."""
        if not self.samples:
            return []
        ranked = sorted(self.samples, key=lambda s: s.psnr, reverse=True)
        best, med = ranked[0], ranked[len(ranked) // 2]
        return [("best = median", best)] if best is med else [("best", best), ("median", med)]

    def metrics(self) -> dict[str, float]:
        """Aggregated metrics for the child run (medians over client batches)."""
        out: dict[str, float] = {"n_images": float(len(self.samples))}
        for key, value in (("brr", self.brr), ("wsrr", self.wsrr), ("median_psnr", self.median("psnr")),
                           ("median_ssim", self.median("ssim")), ("median_lpips", self.median("lpips")),
                           ("median_gain_psnr", self.median("gain_psnr")),
                           ("median_control_psnr", self.median("control_psnr"))):
            if value is not None:
                out[key] = float(value)
        if self.leaked is not None:
            out["leaked"] = float(self.leaked)
        out["seconds"] = self.seconds
        return out


def add_result(outcome: LevelOutcome, image: str, result) -> Sample:
    """Fold one client batch's RunResult into the level (per-sample scores, attempts, images)."""
    sc, m = result.scores, result.metrics
    recon = result.reconstruction.images[sc.order]
    control = None
    if result.control is not None and result.control_scores is not None:
        control = result.control.images[result.control_scores.order]
    boxes = result.target.boxes
    sample = None
    for i in range(len(sc.psnr)):
        sample = Sample(
            image=image if len(sc.psnr) == 1 else f"{image}[{i}]",
            psnr=float(sc.psnr[i]), ssim=float(sc.ssim[i]),
            lpips=None if sc.lpips is None else float(sc.lpips[i]), leaked=bool(sc.leaked[i]),
            gain_psnr=_finite(m.get("gain_psnr")), control_psnr=_finite(m.get("control_psnr")),
            target=result.target.images[i].cpu(), reconstruction=recon[i].cpu(),
            control=None if control is None else control[i].cpu(),
            boxes=None if boxes is None else boxes[i],
        )
        outcome.samples.append(sample)
    # every restart is an independent attempt; the client batch leaked in it if any sample did
    outcome.attempts_leaked.extend(s.any_leaked for s in (result.restart_scores or [sc]))
    if sc.lpips is None:
        outcome.lpips_missing = sc.lpips_missing or "LPIPS unavailable"
    outcome.leak_rule = sc.leak_rule
    tags = result.tags or {}
    if "assumption_level" in tags:
        outcome.assumption_level = int(tags["assumption_level"])
    if "upper_bound" in tags:
        outcome.upper_bound = str(tags["upper_bound"]).lower() == "true"
    for key in ("grants", "lpips", "leak_rule", "task", "device", "calibrated_on", "oracle_init"):
        if key in tags:
            outcome.tags.setdefault(key, tags[key])
    if "inferred_labels" in tags:
        prev = outcome.tags.get("inferred_labels")
        outcome.tags["inferred_labels"] = f"{prev};{image}={tags['inferred_labels']}" if prev else \
            f"{image}={tags['inferred_labels']}"
    return sample


def _finite(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ---------------------------------------------------------------------------------------------
# verdict: rows, conclusion
# ---------------------------------------------------------------------------------------------


def verdict_rows(outcomes: list[LevelOutcome]) -> list[dict]:
    """Machine-readable rows: numbers stay numbers, LPIPS is "missing" when missing, never 0."""
    rows = []
    for o in outcomes:
        finished = o.status == "FINISHED"
        lp = o.median("lpips") if finished else None
        rows.append({
            "level": o.number,
            "key": o.level.key,
            "threat_level": o.level.title,
            "assumption_level": o.assumption_level,
            "upper_bound": o.upper_bound,
            "brr": o.brr if finished else None,
            "wsrr": o.wsrr if finished else None,
            "psnr": o.median("psnr") if finished else None,
            "ssim": o.median("ssim") if finished else None,
            "lpips": lp if lp is not None else ("missing" if finished else None),
            "gain_psnr": o.median("gain_psnr") if finished else None,
            "control_psnr": o.median("control_psnr") if finished else None,
            "positive_control": _positive_psnr(o),  # the reference model's median PSNR at this level
            "positive_control_psnr": _positive_psnr(o),
            "positive_control_leaked": None if o.positive is None else o.positive.leaked,
            "positive_control_status": None if o.positive is None else _status_text(o.positive),
            "leaked": o.leaked,
            "verdict": o.verdict,
            "status": _status_text(o),
            "n_images": len(o.samples),
            "run_id": o.run_id,
            "seconds": round(o.seconds, 1),
        })
    return rows


def _positive_psnr(o: LevelOutcome) -> float | None:
    p = o.positive
    return p.median("psnr") if p is not None and p.status == "FINISHED" else None


def _positive_cell(r: dict) -> str:
    if r["positive_control_status"] is None:
        return "-"
    if r["positive_control_psnr"] is None:
        return r["positive_control_status"]
    return f"{r['positive_control_psnr']:.1f} dB, {'leaked' if r['positive_control_leaked'] else 'missed'}"


def _status_text(o: LevelOutcome) -> str:
    if o.status == "FINISHED":
        return "finished"
    if o.status == "SKIPPED":
        return f"skipped: {o.error}"
    if o.status == "NOT RUN":
        return "not run (audit interrupted)"
    return f"{o.status.lower()}: {o.error or 'no detail'}"


def display_rows(rows: list[dict]) -> list[dict[str, str]]:
    """The verdict rows as strings for the tables (``leaked`` carries the failure reason)."""
    out = []
    for r in rows:
        done = r["status"] == "finished"
        sok = "" if r["assumption_level"] is None else str(r["assumption_level"])
        if r["upper_bound"]:
            sok += " (upper bound)"
        cell = {
            "level": str(r["level"]),
            "threat_level": r["threat_level"],
            "assumption_level": sok,
            "brr": _fmt(r["brr"], 2),
            "wsrr": _fmt(r["wsrr"], 2),
            "psnr": _fmt(r["psnr"], 2),
            "ssim": _fmt(r["ssim"], 3),
            "lpips": r["lpips"] if isinstance(r["lpips"], str) else _fmt(r["lpips"], 3),
            "gain_psnr": _fmt(r["gain_psnr"], 2, signed=True),
            "positive_control": _positive_cell(r),
            "leaked": ("yes" if r["leaked"] else r["verdict"]) if done else r["status"],
        }
        out.append(cell)
    return out


def _fmt(value, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def conclusion(plan: AuditPlan, outcomes: list[LevelOutcome]) -> str:
    """A short plain-language verdict: which assumptions a leak needed, and what it bounds."""
    ran = [o for o in outcomes if o.status in ("FINISHED", "FAILED", "KILLED", "NOT RUN")]
    finished = [o for o in outcomes if o.status == "FINISHED"]
    leaking = [o for o in finished if o.leaked]
    rule = _rule_text(outcomes)
    budget = f"the {plan.budget.name} budget" + (
        f" overridden to {plan.iterations_override} iteration(s)" if plan.iterations_override else "")
    parts = []
    if not finished:
        parts.append("No threat level finished, so this audit gives no verdict.")
    elif not leaking:
        parts.append(f"No level leaked: under none of the {len(finished)} threat levels that ran did a "
                     f"reconstruction meet the leak rule ({rule}) at {budget}.")
    elif leaking[0].level.key == "realistic":
        o = leaking[0]
        given = "boxes and classes" if plan.task == "detection" else "label"
        parts.append(f"Leaks under the realistic setting (level 1): from one FedSGD gradient of a single "
                     f"image with its {given}, the server rebuilt {o.brr:.0%} of the audited images "
                     f"(median PSNR {o.median('psnr'):.1f} dB).")
        more = [x.level.key for x in leaking[1:]]
        if more:
            parts.append(f"Also leaked: {', '.join(more)}.")
    else:
        needs = " or with ".join(o.level.needs for o in leaking)
        text = f"Leaks only with {needs}"
        if all(o.upper_bound for o in leaking):
            text += "; every leaking level is an upper bound, beyond what a realistic client shares"
        parts.append(text + f" (leaked levels: {', '.join(str(o.number) for o in leaking)}).")
    parts += _sensitivity_sentences(plan, finished)
    if plan.task == "detection" and finished:
        parts.append("Every detection level gave the server the client's ground-truth boxes and classes "
                     "(batch-specific side information, counted at SoK level 4).")
    weak = [o for o in leaking if (o.median("gain_psnr") or 0.0) < SMALL_GAIN_DB]
    if weak:
        parts.append(f"At level(s) {', '.join(str(o.number) for o in weak)} the gradient adds less than "
                     f"{SMALL_GAIN_DB:g} dB over the prior-only control, so the image prior, not the "
                     "update, explains most of that leak.")
    failed = [o for o in ran if o.status != "FINISHED"]
    if failed:
        parts.append(f"{len(failed)} level(s) did not finish ({', '.join(o.level.key for o in failed)}), "
                     "so the verdict covers only the levels that did.")
    parts.append("The audit bounds only the attacks it ran (this battery, at this budget, on these "
                 "images, each as its own client batch of 1): a longer or different attack or other data "
                 "may leak where this one did not, so \"no leak\" is not a proof of privacy.")
    return " ".join(parts)


def _sensitivity_sentences(plan: AuditPlan, finished: list[LevelOutcome]) -> list[str]:
    """What the positive controls say about the levels that did not leak."""
    quiet = [o for o in finished if not o.leaked]
    if not quiet:
        return []
    if not plan.positive_control:
        return ["Positive controls were switched off, so nothing shows that this budget would catch a "
                "model that does leak: read 'no leak' as unchecked."]
    confirmed = [o for o in quiet if o.verdict == NO_LEAK]
    open_ = [o for o in quiet if o.verdict == INCONCLUSIVE]
    out = []
    if confirmed:
        shown = "; ".join(f"level {o.number}: reference {_positive_psnr(o):.1f} dB, this model "
                          f"{o.median('psnr'):.1f} dB" for o in confirmed)
        out.append(f"No leak at this budget at level(s) {', '.join(str(o.number) for o in confirmed)}: the same "
                   f"attack and budget recovered the known-leaky reference model {plan.reference} there ({shown}).")
    if open_:
        why = (f"the same attack and budget did not recover even the known-leaky reference model {plan.reference}"
               if plan.reference else f"no known-leaky reference model exists for {plan.task} to show that this "
               "budget catches a leak")
        out.append(f"Inconclusive at level(s) {', '.join(str(o.number) for o in open_)}: {why}, so the budget is "
                   "too small to tell; use a larger budget (--level thorough) before reading these as 'no leak'.")
    return out


def _rule_text(outcomes: list[LevelOutcome]) -> str:
    missing = next((o.lpips_missing for o in outcomes if o.lpips_missing), None)
    if missing:
        return "PSNR >= 18 dB alone, LPIPS missing"
    return "PSNR >= 18 dB and LPIPS <= 0.1"


# ---------------------------------------------------------------------------------------------
# running: one parent run, one child per level
# ---------------------------------------------------------------------------------------------


@dataclass
class AuditOutcome:
    """Everything an audit produced."""

    plan: AuditPlan
    outcomes: list[LevelOutcome]
    out_dir: Path
    tracking_uri: str | None = None
    experiment: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    verdict: str = ""

    @property
    def exit_code(self) -> int:
        """0 every level finished, 1 some level failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if any(o.status not in ("FINISHED", "SKIPPED") for o in self.outcomes) else 0

    def to_json(self) -> dict:
        """The machine-readable summary (``--json`` prints it as the last line)."""
        leaking = [o.level.key for o in self.outcomes if o.leaked]
        finished = any(o.status == "FINISHED" for o in self.outcomes)
        return jsonable({
            "variant": self.plan.base.variant,
            "weights": self.plan.base.weights,
            "budget": self.plan.budget.name,
            "leaked": bool(leaking) if finished else None,
            "leaking_levels": leaking,
            "inconclusive_levels": [o.level.key for o in self.outcomes if o.verdict == INCONCLUSIVE],
            "positive_control": self.plan.reference if self.plan.positive_control else None,
            "verdict": self.verdict,
            "columns": [k for k, _ in COLUMNS],
            "rows": verdict_rows(self.outcomes),
            "out_dir": str(self.out_dir.resolve()),
            "report": str(self.files["report.md"].resolve()) if "report.md" in self.files else None,
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
        })


def run_audit(plan: AuditPlan, *, out_dir: str | Path, experiment: str = "gistress-audit",
              tracking_uri: str | None = None, progress: bool = False, out=None,
              runner: Callable | None = None) -> AuditOutcome:
    """Run the planned battery: one MLflow parent run, one child per level, then the report.

    A failing level ends its child FAILED (tag ``error``) and the audit goes on. Ctrl-C / SIGTERM
    end the running child and the parent KILLED, write the report of what exists and re-raise.
    ``runner`` replaces ``suite.execution.runner.run_setting`` (tests).
    """
    from suite.execution import tracking
    from suite.studies.study import _install_sigterm

    if runner is None:
        from suite.execution.runner import run_setting as runner
    out = out or sys.stdout
    out_dir = Path(out_dir)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, experiment)
    result = AuditOutcome(plan=plan, outcomes=[], out_dir=out_dir, tracking_uri=uri, experiment=experiment,
                          experiment_id=exp_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    parent_id = _create_parent(client, exp_id, plan)
    result.parent_run_id = parent_id
    print(f"audit of {plan.base.variant} ({plan.budget.name}): {len(plan.levels)} threat level(s) on "
          f"{len(plan.images)} image(s) at {plan.size} px; MLflow {uri} parent run {parent_id}", file=out)

    planned = {p.number: p for p in plan.levels}
    skipped = {n: why for n, _, why in plan.skipped}
    outcomes = result.outcomes
    restore = _install_sigterm()
    try:
        with tracking.terminal_status(client, parent_id):
            try:
                for number, lv in enumerate(BATTERY, start=1):
                    if number in skipped:
                        outcomes.append(LevelOutcome(number, lv, "SKIPPED", error=skipped[number]))
                        continue
                    pl = planned[number]
                    outcome = LevelOutcome(number, lv, "FAILED", assumption_level=pl.assumption_level,
                                           upper_bound=pl.config.threat.upper_bound, notes=list(pl.notes),
                                           control_expected=plan.positive_control)
                    outcomes.append(outcome)  # before it runs, so an interrupt reports it KILLED
                    _run_level(outcome, pl, plan, client, exp_id, parent_id, out_dir, runner, progress, out)
                    pc = pl.control_level()
                    if pc is not None:
                        outcome.positive = LevelOutcome(number, lv, "FAILED", assumption_level=pl.assumption_level,
                                                        upper_bound=pc.config.threat.upper_bound,
                                                        config_variant=pc.config.variant)
                        _run_level(outcome.positive, pc, plan, client, exp_id, parent_id, out_dir, runner,
                                   progress, out)
            except KeyboardInterrupt:
                result.interrupted = True
                done = {o.number for o in outcomes}
                for n, lv in enumerate(BATTERY, start=1):
                    if n in done:
                        continue
                    if n in skipped:
                        outcomes.append(LevelOutcome(n, lv, "SKIPPED", error=skipped[n]))
                    else:
                        outcomes.append(LevelOutcome(n, lv, "NOT RUN", assumption_level=planned[n].assumption_level,
                                                     upper_bound=planned[n].config.threat.upper_bound))
                raise
            finally:
                outcomes.sort(key=lambda o: o.number)
                result.verdict = conclusion(plan, outcomes)
                _finish(result, client)
    finally:
        restore()
    return result


def _create_parent(client, exp_id: str, plan: AuditPlan) -> str:
    from mlflow.entities import Param

    from suite.execution import tracking

    base = plan.base
    tags = {
        tracking.KIND_TAG: KIND,
        "variant": base.variant,
        "audit.budget": plan.budget.name,
        "n_levels": str(len(plan.levels)),
        "gistress_version": _version(),
        "mlflow.source.name": "gistress audit",
    }
    if tracking.git_commit():
        tags["git_commit"] = tags["mlflow.source.git.commit"] = tracking.git_commit()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = client.create_run(exp_id, tags=tags, run_name=f"audit {base.variant} {plan.budget.name} {stamp}")
    run_id = run.info.run_id
    params = {
        "variant": base.variant, "weights": base.weights, "data": base.data, "images": ",".join(plan.images),
        "size": plan.size, "seed": base.seed, "device": base.device, "audit_level": plan.budget.name,
        "iterations_override": plan.iterations_override or "none", "client_batch_size": 1,
        "leak_psnr": base.leak_psnr, "leak_lpips": base.leak_lpips,
        **{f"variant.{k}": v for k, v in base.variant_options.items()},
    }
    try:
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    except BaseException as exc:
        tracking._terminate(client, run_id, exc)
        raise
    return run_id


def _version() -> str:
    import suite

    return suite.__version__


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


def _run_level(outcome: LevelOutcome, pl: PlannedLevel, plan: AuditPlan, client, exp_id: str, parent_id: str,
               out_dir: Path, runner, progress: bool, out) -> None:
    """One level into ``outcome``: its child run, one client batch per image, scores and artifacts."""
    from mlflow.entities import Param

    from suite.execution import tracking
    from suite.execution.mlflow_ui import describe_setting

    lv = pl.level
    t0 = time.perf_counter()
    extra = {tracking.KIND_TAG: CONTROL_KIND if pl.is_control else LEVEL_KIND, "audit.level": lv.key,
             "audit.number": pl.number,
             "audit.budget": plan.budget.name, "images": ",".join(pl.config.images),
             "assumption_level": pl.assumption_level, "mlflow.parentRunId": parent_id,
             "client_batches": "each image is its own client batch of 1"}
    tags = tracking.setting_tags(pl.config, extra)
    tags[tracking.NOTE_TAG] = describe_setting(pl.config)
    run_id = client.create_run(exp_id, tags=tags, run_name=pl.name).info.run_id
    outcome.run_id = run_id
    handle = tracking.SettingRun(client, run_id, pl.config)
    level_dir = out_dir / "levels" / (f"{pl.number}_{lv.key}" + ("_positive_control" if pl.is_control else ""))
    n = len(BATTERY)
    label = f"{lv.key} · positive control ({pl.config.variant})" if pl.is_control else lv.key
    try:
        with tracking.terminal_status(client, run_id):
            params = tracking.setting_params(pl.config)
            params.update(batch_size="1", clients=str(len(pl.config.images)), audit_level=lv.key)
            plist = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(plist), 100):
                client.log_batch(run_id, params=plist[i : i + 100])
            import yaml

            client.log_text(run_id, yaml.safe_dump(pl.config.model_dump(mode="json"), sort_keys=False),
                            "config.yaml")
            try:  # the curves logged so far are kept whatever ends the level
                for i, cfg in enumerate(pl.client_configs()):
                    image = cfg.images[0]
                    prefix = f"img{i}/"

                    def on_step(step, metrics, prefix=prefix):
                        handle.log_step(step, {prefix + k: v for k, v in metrics.items() if k != "step"})

                    ti = time.perf_counter()
                    res = runner(cfg, out_dir=level_dir / f"{i:02d}_{_safe(image)}", progress=progress,
                                 on_step=on_step)
                    sample = add_result(outcome, image, res)
                    _log_client(client, run_id, i, image, res)
                    ctrl = f", control {sample.control_psnr:.1f}" if sample.control_psnr is not None else ""
                    print(f"[{pl.number}/{n}] {label} · {image}: PSNR {sample.psnr:.1f} dB{ctrl}, "
                          f"leaked {'yes' if sample.leaked else 'no'} ({time.perf_counter() - ti:.0f} s)",
                          file=out, flush=True)
            finally:
                handle.flush()
            outcome.status = "FINISHED"
            outcome.seconds = time.perf_counter() - t0
            _log_level(client, run_id, outcome, pl)
    except (KeyboardInterrupt, SystemExit) as exc:
        outcome.status = "KILLED"
        outcome.error = "terminated (SIGTERM)" if isinstance(exc, tracking.Terminated) else "interrupted"
        outcome.seconds = time.perf_counter() - t0
        raise
    except Exception as exc:
        outcome.status = "FAILED"
        outcome.error = tracking.one_line_error(exc, 300)
        outcome.samples, outcome.attempts_leaked = [], []
        print(f"[{pl.number}/{n}] {label}: FAILED: {outcome.error}", file=out, flush=True)
    outcome.seconds = time.perf_counter() - t0


def _log_client(client, run_id: str, i: int, image: str, res) -> None:
    """One client batch's files on the level's run: PNGs under images/, the rest under clients/."""
    from suite.execution.tracking import IMAGE_SUFFIXES

    sub = f"{i:02d}_{_safe(image)}"
    for path in (res.artifacts or {}).values():
        path = Path(path)
        if path.is_file():
            where = f"images/{sub}" if path.suffix.lower() in IMAGE_SUFFIXES else f"clients/{sub}"
            client.log_artifact(run_id, str(path), artifact_path=where)


def _log_level(client, run_id: str, o: LevelOutcome, pl: PlannedLevel) -> None:
    from mlflow.entities import Metric, RunTag

    from suite.execution.tracking import tag_value

    now = int(time.time() * 1000)
    step = int(pl.config.attack.iterations)
    metrics = o.metrics()
    for i, s in enumerate(o.samples):
        metrics.update({f"img{i}/psnr": s.psnr, f"img{i}/ssim": s.ssim, f"img{i}/leaked": float(s.leaked)})
        if s.lpips is not None:
            metrics[f"img{i}/lpips"] = s.lpips
        if s.gain_psnr is not None:
            metrics[f"img{i}/gain_psnr"] = s.gain_psnr
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])
    tags = dict(o.tags)
    tags.update(assumption_level=str(o.assumption_level), upper_bound=str(bool(o.upper_bound)).lower(),
                leaked=str(bool(o.leaked)).lower())
    client.log_batch(run_id, tags=[RunTag(k, tag_value(v)) for k, v in tags.items()])
    client.log_dict(run_id, {
        "images": [s.image for s in o.samples], "psnr": [s.psnr for s in o.samples],
        "ssim": [s.ssim for s in o.samples], "lpips": [s.lpips for s in o.samples],
        "leaked": [s.leaked for s in o.samples], "gain_psnr": [s.gain_psnr for s in o.samples],
        "attempts_leaked": o.attempts_leaked, "leak_rule": o.leak_rule, "lpips_missing": o.lpips_missing,
    }, "scores.json")


def _finish(result: AuditOutcome, client) -> None:
    """Report files, the parent's artifacts and tags (best effort: never hides the runs' outcome)."""
    try:
        result.files = write_report(result)
        for name, path in result.files.items():
            if name.startswith("images/"):
                client.log_artifact(result.parent_run_id, str(path), artifact_path="images")
            else:
                client.log_artifact(result.parent_run_id, str(path))
        leaking = [o.level.key for o in result.outcomes if o.leaked]
        finished = any(o.status == "FINISHED" for o in result.outcomes)
        unsure = [o.level.key for o in result.outcomes if o.verdict == INCONCLUSIVE]
        client.set_tag(result.parent_run_id, "verdict",
                       ("leaks: " + ",".join(leaking)) if leaking else
                       ("inconclusive: " + ",".join(unsure)) if unsure else "no leak" if finished else "no verdict")
        client.set_tag(result.parent_run_id, "mlflow.note.content", result.verdict[:5000])
        counts: dict[str, int] = {}
        for o in result.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        for status, count in counts.items():
            client.set_tag(result.parent_run_id, f"n_{status.lower().replace(' ', '_')}", str(count))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        print(f"warning: audit report incomplete ({type(exc).__name__}: {exc})", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# report: markdown + HTML from one list of blocks, verdict CSV/JSON, figures
# ---------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    """The verdict table as aligned plain text (what the terminal shows)."""
    cells = display_rows(rows)
    headers = [h for _, h in COLUMNS]
    keys = [k for k, _ in COLUMNS]
    widths = [max(len(h), *(len(c[k]) for c in cells)) for h, k in zip(headers, keys)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))]
    lines += ["  ".join(f"{c[k]:<{w}}" for k, w in zip(keys, widths)) for c in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_report(result: AuditOutcome) -> dict[str, Path]:
    """report.md, report.html, verdict.csv, verdict.json, audit.png and per-level images."""
    out_dir = result.out_dir
    files: dict[str, Path] = {}
    rows = verdict_rows(result.outcomes)
    img_dir = out_dir / "images"
    for o in result.outcomes:
        if o.status == "FINISHED" and o.samples:
            o.figure = level_figure([o], img_dir / f"level{o.number}_{o.level.key}.png")
            files[f"images/{o.figure.name}"] = o.figure
    fig = level_figure([o for o in result.outcomes if o.status == "FINISHED" and o.samples],
                       out_dir / "audit.png", title=f"gistress audit: {result.plan.base.variant}")
    if fig is not None:
        files["audit.png"] = fig

    csv_path = out_dir / "verdict.csv"
    with csv_path.open("w", newline="") as fh:
        keys = [k for k, _ in COLUMNS] + ["upper_bound", "control_psnr", "status", "n_images", "run_id"]
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            rec = dict(r)
            rec["leaked"] = "" if r["leaked"] is None else ("yes" if r["leaked"] else "no")
            writer.writerow({k: "" if rec.get(k) is None else rec[k] for k in keys})
    files["verdict.csv"] = csv_path

    verdict = {**_meta(result), "verdict": result.verdict, "columns": [k for k, _ in COLUMNS],
               "headers": dict(COLUMNS), "rows": rows}
    json_path = out_dir / "verdict.json"
    json_path.write_text(json.dumps(jsonable(verdict), indent=2))
    files["verdict.json"] = json_path

    blocks = report_blocks(result, rows)
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(blocks, out_dir))
    files["report.md"] = md_path
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(blocks, out_dir, title=f"gistress audit: {result.plan.base.variant}"))
    files["report.html"] = html_path
    return files


def _meta(result: AuditOutcome) -> dict:
    plan, base = result.plan, result.plan.base
    return {
        "variant": base.variant, "variant_options": base.variant_options, "weights": base.weights,
        "data": base.data, "images": plan.images, "size": plan.size, "seed": base.seed, "device": base.device,
        "task": plan.task, "has_batchnorm": plan.has_bn, "budget": plan.budget.name,
        "budget_description": plan.budget.describe(), "iterations_override": plan.iterations_override,
        "leak_rule": {"psnr_db_at_least": base.leak_psnr, "lpips_at_most": base.leak_lpips,
                      "lpips_missing": next((o.lpips_missing for o in result.outcomes if o.lpips_missing), None)},
        "client_batches": "each image attacked as its own client batch of 1",
        "battery": plan.battery_lines(), "notes": plan.notes,
        "tracking_uri": result.tracking_uri, "experiment": result.experiment,
        "parent_run_id": result.parent_run_id, "interrupted": result.interrupted,
    }


def report_blocks(result: AuditOutcome, rows: list[dict]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("ul", items), ("table", headers, rows),
    ("img", path, alt)."""
    plan, base = result.plan, result.plan.base
    cells = display_rows(rows)
    missing = next((o.lpips_missing for o in result.outcomes if o.lpips_missing), None)
    blocks: list[tuple] = [
        ("h1", f"Leakage audit: {base.variant}"),
        ("p", f"Weights {base.weights}; data {base.data}; images {', '.join(plan.images)} at {plan.size} px; "
              f"level {plan.budget.name}; seed {base.seed}; {time.strftime('%Y-%m-%d %H:%M')}."),
        ("h2", "Verdict"),
        ("p", result.verdict),
    ]
    if result.interrupted:
        blocks.append(("p", "This audit was interrupted: levels marked 'not run' have no result."))
    blocks += [
        ("table", [h for _, h in COLUMNS], [[c[k] for k, _ in COLUMNS] for c in cells]),
        ("p", "SoK level: the highest adversary-assumption level (Du et al., 0-5) the setting relies on "
              "(1 = image priors, 2 = data distribution, 3 = client training details, 4 = BN statistics "
              "of the client's batch); \"upper bound\" marks clients simplified beyond a realistic "
              "training step. BRR: fraction of images leaked (the restart the attacker picks by matching "
              "loss). WSRR: fraction of attack attempts (image x restart) in which the image leaked. "
              "PSNR/SSIM/LPIPS: medians over images. Gain: median PSNR of the attack minus that of the "
              "prior-only control (same start and budget, gradient term off): what the update itself "
              "gives away."),
        ("h2", "How it was run"),
        ("ul", [
            f"Leak rule: a sample leaked if PSNR >= {base.leak_psnr:g} dB and LPIPS <= {base.leak_lpips:g}"
            + (f"; LPIPS is missing here ({missing}), so PSNR alone decided" if missing else "") + ".",
            "Client batches: each image is attacked as its own client batch of 1, the setting most "
            "favourable to the attacker (larger batches are harder to invert).",
            f"Budget: {plan.budget.describe()}.",
            *(f"Note: {n}." for n in plan.notes),
            f"Model: {base.variant}"
            + (f" ({', '.join(f'{k}={v}' for k, v in base.variant_options.items())})" if base.variant_options else "")
            + f", task {plan.task}, {'with' if plan.has_bn else 'without'} BatchNorm; device {base.device}.",
            f"MLflow: {result.tracking_uri}, experiment '{result.experiment}', parent run {result.parent_run_id} "
            "(one child run per level).",
        ]),
        ("h3", "Battery (fixed; numbers are the same in every audit)"),
        ("ul", plan.battery_lines()),
        ("h2", "Reconstructions"),
        ("p", "Per level: the best and the median reconstruction (by PSNR) next to its target and the "
              "prior-only control from the same start."),
    ]
    for o in result.outcomes:
        title = f"{o.number}. {o.level.key}: {o.level.title}"
        if o.status != "FINISHED":
            blocks += [("h3", title), ("p", _status_text(o))]
            continue
        blocks.append(("h3", title))
        picked = "; ".join(f"{label}: {s.image}, PSNR {s.psnr:.1f} dB, SSIM {s.ssim:.3f}"
                           + (f", LPIPS {s.lpips:.3f}" if s.lpips is not None else "")
                           + f", leaked {'yes' if s.leaked else 'no'}" for label, s in o.best_and_median())
        text = f"{o.level.grants}. {picked}."
        if o.positive is not None:
            if o.positive.status == "FINISHED":
                text += (f" Positive control: this budget recovers the reference model {o.positive.config_variant} "
                         f"at {o.positive.median('psnr'):.1f} dB (leaked: {'yes' if o.positive.leaked else 'no'}); "
                         f"your model: {o.median('psnr'):.1f} dB. Verdict: {o.verdict}.")
            else:
                text += f" Positive control {_status_text(o.positive)}. Verdict: {o.verdict}."
        if o.tags.get("calibrated_on"):
            text += f" BN statistics calibrated on {o.tags['calibrated_on']}."
        if o.tags.get("inferred_labels"):
            text += f" Inferred labels: {o.tags['inferred_labels']}."
        blocks.append(("p", text))
        if o.figure is not None:
            blocks.append(("img", o.figure, f"level {o.number} best and median reconstruction"))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple], base_dir: Path) -> str:
    """Markdown with images linked relative to the report (they sit beside it)."""
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            headers, body = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            lines.append("")
        elif kind == "img":
            rel = Path(block[1]).resolve().relative_to(base_dir.resolve()).as_posix()
            lines += [f"![{block[2]}]({rel})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], base_dir: Path, *, title: str) -> str:
    """A self-contained HTML page: images embedded as base64 PNGs."""
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{esc(block[2])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "line-height:1.45}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
             "padding:.3em .6em;text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def level_figure(outcomes: list[LevelOutcome], path: Path, *, title: str = "") -> Path | None:
    """Rows = levels; per picked sample (best, median): target | reconstruction | control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from suite.reports.images import draw_boxes, to_pil

    rows = [(o, o.best_and_median()) for o in outcomes if o.samples]
    if not rows:
        return None
    per = 3
    ncols = per * max(len(p) for _, p in rows)
    cell = 1.7
    label_w = 1.8
    height = (0.8 if title else 0.5) + (cell + 0.5) * len(rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(label_w + cell * ncols, height), squeeze=False)
    for i, (o, picks) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            k, panel = divmod(j, per)
            if k >= len(picks):
                ax.axis("off")
                continue
            label, s = picks[k]
            if panel == 0:
                pil = to_pil(s.target)
                if s.boxes is not None:
                    pil = draw_boxes(pil, [s.boxes])
                ax.imshow(pil, interpolation="nearest")
                ax.set_title(f"{label}: {s.image}\ntarget", fontsize=7)
            elif panel == 1:
                ax.imshow(to_pil(s.reconstruction), interpolation="nearest")
                ax.set_title(f"attack {s.psnr:.1f} dB" + (" LEAKED" if s.leaked else ""), fontsize=7)
            elif s.control is not None:
                ax.imshow(to_pil(s.control), interpolation="nearest")
                ax.set_title(f"control {s.control_psnr:.1f} dB" if s.control_psnr is not None else "control",
                             fontsize=7)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(f"{o.number}. {o.level.key}", fontsize=8, rotation=0, ha="right", va="center",
                              labelpad=6)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight())
    fig.subplots_adjust(left=label_w / (label_w + cell * ncols), right=0.99, top=1 - (0.75 if title else 0.45) / height,
                        bottom=0.1 / height, wspace=0.05, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


