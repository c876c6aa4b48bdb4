"""An audit's verdict: per-level aggregation of the client batches, the verdict table and its words.

Per level, BRR is the fraction of images whose reconstruction leaked and WSRR the fraction of
all attack attempts (image x restart) in which the image leaked; a level's verdict weighs its
leak against its positive control (``suite.audit.positive_control``). ``conclusion`` says in
plain words which assumptions a leak needed and what the audit bounds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.audit.battery import ThreatLevel
from suite.audit.plan import AuditPlan
from suite.audit.positive_control import INCONCLUSIVE, NO_LEAK, level_verdict
from suite.execution.mlflow_names import finite_or_none

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
    ("iterations", "budget (iterations)"),
    ("positive_control", "positive control"),
    ("leaked", "leaked"),
)
# A leaked image whose PSNR beats its prior-only control by less than this (dB) is called out: the
# leak rule already asks it for content beyond the control's, so its colours, not its content, are off.
SMALL_GAIN_DB = 1.0


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
    gain_content: float | None = None   # content gain minus the prior-only control's (None: no control)
    target: Any = None              # (3, H, W) tensors, CPU
    reconstruction: Any = None
    control: Any = None
    boxes: Any = None
    residual: float | None = None   # closed forms: the solve's residual, rank and unknowns
    rank: int | None = None
    unknowns: int | None = None


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
    positive: LevelOutcome | None = None   # the positive control's last attempt (same level, reference model)
    config_variant: str | None = None      # the variant this outcome attacked
    control_expected: bool = False         # positive controls were asked for
    iterations: int | None = None          # the budget this outcome ran at (a level: the one its control set)
    config_size: int | None = None         # the input size this outcome attacked (controls: the reference's)
    control_attempts: list[LevelOutcome] = field(default_factory=list)  # the control at each budget tried

    def attempts_text(self) -> str | None:
        """The positive control's search in words: "leaked at 400 after missing at 100, 200", "missed
        at every budget up to 1,600 (100, 200, ...)", "leaked at 100"; None without a control."""
        tries = self.control_attempts
        if not tries:
            return None
        last, before = tries[-1], [f"{a.iterations:,}" for a in tries[:-1]]
        after = f" after missing at {', '.join(before)}" if before else ""
        if last.status != "FINISHED":
            return f"{status_text(last)} at {last.iterations:,}{after}"
        if last.leaked:
            return f"leaked at {last.iterations:,}{after}"
        if before:
            return f"missed at every budget up to {last.iterations:,} ({', '.join(before)}, {last.iterations:,})"
        return f"missed at {last.iterations:,}"

    @property
    def verdict(self) -> str | None:
        """leak | no leak at this budget | inconclusive | no leak (sensitivity not checked); None
        when the level did not finish."""
        return level_verdict(self.leaked, None if self.positive is None else self.positive.leaked,
                             self.control_expected, self.closed_form_evidence())

    def closed_form_evidence(self) -> str | None:
        """A closed-form level's evidence in words (median residual, lowest rank); None otherwise."""
        if not self.level.closed_form or not self.samples:
            return None
        residual = statistics.median(s.residual for s in self.samples if s.residual is not None)
        short = [s for s in self.samples if s.rank is not None and s.unknowns and s.rank < s.unknowns]
        rank = (f", rank {short[0].rank} of {short[0].unknowns} unknowns (underdetermined)" if short
                else ", full rank")
        return f"residual {residual:.1e}{rank}"

    @property
    def brr(self) -> float | None:
        """Fraction of the level's images that leaked (None: no samples)."""
        return sum(s.leaked for s in self.samples) / len(self.samples) if self.samples else None

    @property
    def wsrr(self) -> float | None:
        """Fraction of attack attempts (image x restart) in which the image leaked (None: none)."""
        return sum(self.attempts_leaked) / len(self.attempts_leaked) if self.attempts_leaked else None

    @property
    def leaked(self) -> bool | None:
        """Whether any image leaked; None when the level did not finish."""
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
            gain_psnr=finite_or_none(m.get("gain_psnr")), control_psnr=finite_or_none(m.get("control_psnr")),
            gain_content=finite_or_none(m.get("gain_content")),
            target=result.target.images[i].cpu(), reconstruction=recon[i].cpu(),
            control=None if control is None else control[i].cpu(),
            boxes=None if boxes is None else boxes[i],
            residual=finite_or_none(m.get("closed_form_residual")),
            rank=None if "closed_form_rank" not in m else int(m["closed_form_rank"]),
            unknowns=None if "closed_form_unknowns" not in m else int(m["closed_form_unknowns"]),
        )
        outcome.samples.append(sample)
    # every restart is an independent attempt; the client batch leaked in it if any sample did
    outcome.attempts_leaked.extend(s.any_leaked for s in (result.restart_scores or [sc]))
    if sc.lpips is None:
        outcome.lpips_missing = sc.lpips_missing or "LPIPS unavailable"
    outcome.leak_rule = sc.leak_rule
    # the level's assumption level and upper-bound flag come from its plan (the config's own rule)
    tags = result.tags or {}
    for key in ("grants", "lpips", "leak_rule", "task", "device", "calibrated_on", "closed_form"):
        if key in tags:
            outcome.tags.setdefault(key, tags[key])
    # per image, joined: the labels the attack inferred, and the step a continued audit's attack
    # loop reloaded from (its earliest restart's; suite/audit/run.py)
    for key, level_key in (("inferred_labels", "inferred_labels"), ("resumed_from_step", "audit.resumed")):
        if key in tags:
            prev = outcome.tags.get(level_key)
            outcome.tags[level_key] = f"{prev};{image}={tags[key]}" if prev else f"{image}={tags[key]}"
    return sample


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
            "iterations": o.iterations,
            "positive_control": _positive_psnr(o),  # the reference model's median PSNR at this level
            "positive_control_psnr": _positive_psnr(o),
            "positive_control_leaked": None if o.positive is None else o.positive.leaked,
            "positive_control_status": None if o.positive is None else status_text(o.positive),
            "positive_control_variant": None if o.positive is None else o.positive.config_variant,
            "positive_control_size": None if o.positive is None else o.positive.config_size,
            "positive_control_search": o.attempts_text(),
            "positive_control_attempts": [
                {"iterations": a.iterations, "psnr": a.median("psnr") if a.status == "FINISHED" else None,
                 "leaked": a.leaked, "status": status_text(a), "run_id": a.run_id} for a in o.control_attempts],
            "leaked": o.leaked,
            "verdict": o.verdict,
            "status": status_text(o),
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
    search = r.get("positive_control_search") or ("leaked" if r["positive_control_leaked"] else "missed")
    return f"{r['positive_control_psnr']:.1f} dB, {search}"


def status_text(o: LevelOutcome) -> str:
    """A level's status in words: finished, skipped: why, not run, failed/killed: why."""
    if o.status == "FINISHED":
        return "finished"
    if o.status == "SKIPPED":
        return o.error if (o.error or "").startswith("not applicable") else f"skipped: {o.error}"
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
            "iterations": "-" if r.get("iterations") is None else f"{r['iterations']:,}",
            "positive_control": _positive_cell(r),
            "leaked": ("yes" if r["leaked"] else r["verdict"]) if done else r["status"],
        }
        out.append(cell)
    return out


def _fmt(value, digits: int, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _off_colour_sentences(leaking: list[LevelOutcome]) -> list[str]:
    """Leaks a reader could doubt from PSNR alone: the leaked images of a level barely beat (or trail)
    their prior-only control in PSNR although the rule found content beyond the control's (measured:
    DLG's saturated ConvNeXt-T ``chelsea``, 2.6 dB below its control, the face's layout plain)."""
    out = []
    for o in leaking:
        leaked = [s for s in o.samples if s.leaked and s.gain_psnr is not None and s.gain_content is not None]
        if o.level.closed_form or not leaked:  # a closed form has no prior-only control
            continue
        psnr_gain = statistics.median(s.gain_psnr for s in leaked)
        if psnr_gain < SMALL_GAIN_DB:
            content_gain = statistics.median(s.gain_content for s in leaked)
            out.append(f"At level {o.number} the leaked reconstructions score {psnr_gain:+.1f} dB against "
                       f"their prior-only control in PSNR yet carry content the control lacks (content gain "
                       f"{content_gain:+.1f} dB over the control's): their colours or contrast are off, not "
                       "their structure; look at the images.")
    return out


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
    elif leaking[0].level.closed_form:
        o = leaking[0]
        parts.append(f"Leaks from the update alone (level {o.number}, SoK assumption level "
                     f"{o.assumption_level}): a realistic client's single FedSGD gradient, solved in closed "
                     f"form ({o.tags.get('closed_form', 'closed form')}), gave back {o.brr:.0%} of the audited "
                     f"images (median PSNR {o.median('psnr'):.1f} dB, {o.closed_form_evidence()}) with no "
                     "labels, no image prior and no iterations.")
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
    parts += _off_colour_sentences(leaking)
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
        shown = "; ".join(f"level {o.number}: reference {o.positive.config_variant} {_positive_psnr(o):.1f} dB at "
                          f"{o.iterations:,} iterations, this model {o.median('psnr'):.1f} dB" for o in confirmed)
        out.append(f"No leak at this budget at level(s) {', '.join(str(o.number) for o in confirmed)}: the same "
                   f"attack and budget recovered a known-leaky reference model there ({shown}).")
    if open_:
        names = sorted({o.positive.config_variant for o in open_ if o.positive is not None})
        capped = [o.iterations for o in open_ if len(o.control_attempts) > 1]
        why = (f"the same attack did not recover even the known-leaky reference model {', '.join(names)}"
               + (f" at any budget up to {max(capped):,} iterations" if capped else " at this budget")
               if names else f"no known-leaky reference model exists for {plan.task} to show that this "
               "budget catches a leak")
        out.append(f"Inconclusive at level(s) {', '.join(str(o.number) for o in open_)}: {why}, so the budget is "
                   "too small to tell; use a larger budget (--level thorough) before reading these as 'no leak'.")
    sizes = sorted({o.positive.config_size for o in quiet if o.positive is not None
                    and o.positive.config_size not in (None, plan.size)})
    if sizes:
        out.append(f"Positive control at {', '.join(str(z) for z in sizes)} px, audited model at {plan.size} px: no "
                   "known-leaky reference exists at this size, so the control shows the budget catches a leak "
                   "at another scale only.")
    return out


def _rule_text(outcomes: list[LevelOutcome]) -> str:
    # the rule as the levels' scores named it (suite.scoring.leak_rule), never re-worded here
    return next((o.leak_rule for o in outcomes if o.leak_rule), "the leak rule")


def format_table(rows: list[dict]) -> str:
    """The verdict table as aligned plain text (what the terminal shows)."""
    cells = display_rows(rows)
    headers = [h for _, h in COLUMNS]
    keys = [k for k, _ in COLUMNS]
    widths = [max(len(h), *(len(c[k]) for c in cells)) for h, k in zip(headers, keys)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths))]
    lines += ["  ".join(f"{c[k]:<{w}}" for k, w in zip(keys, widths)) for c in cells]
    return "\n".join(line.rstrip() for line in lines)
