"""Running an audit: one MLflow parent run, one child run per level (and per positive control).

The parent run's lifecycle (tags, SIGTERM, terminal status, exit code) is
``suite.execution.lifecycle``'s, shared with ``gistress study`` and ``gistress attack``. A level
runs each audited image as its own client batch of 1 through ``run_setting`` (or a stand-in).

Per level the positive control runs first: at each budget of the level's schedule in turn
(``PlannedLevel.budgets``: 100, 200, 400, ... up to the cap at ``quick``), each attempt its own
child run, until it leaks; then the audited model runs at the budget the control stopped at.

Every optimization loop (attack and prior-only control, of the levels and of their positive
controls) keeps its final checkpoint in its client batch's folder under ``out_dir/levels``, so
running the same audit into the same ``out_dir`` again continues it: finished loops reload their
saved end state (seconds) and an interrupted one resumes at its last save, under a new parent run
whose levels carry ``audit.resumed`` (``image=step``). Closed-form levels have no loop and are
solved again. That is how an audit longer than a session or a job's time limit finishes
(docs/audit.md).
"""

from __future__ import annotations

import functools
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from suite.audit.battery import BATTERY
from suite.audit.plan import AuditPlan, PlannedLevel
from suite.audit.positive_control import INCONCLUSIVE
from suite.audit.report import write_report
from suite.audit.verdict import COLUMNS, LevelOutcome, add_result, conclusion, verdict_rows
from suite.results import jsonable

KIND = "audit"
LEVEL_KIND = "audit_level"
CONTROL_KIND = "audit_positive_control"


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
        """0 every level finished (or was skipped), 1 some level failed, 130 interrupted
        (``lifecycle.exit_code``)."""
        from suite.execution.lifecycle import exit_code

        return exit_code((o.status for o in self.outcomes), interrupted=self.interrupted)

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
            "budgets": {o.level.key: o.iterations for o in self.outcomes if o.iterations is not None},
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
    The default runner keeps every loop's final checkpoint, so the same audit into the same
    ``out_dir`` continues (module docstring). ``runner`` replaces
    ``suite.execution.runner.run_setting`` (tests); a replacement decides its own checkpoints.
    """
    from suite.execution import lifecycle, tracking

    if runner is None:
        from suite.execution.runner import run_setting

        # each attack keeps its final checkpoint: the same audit into the same folder continues
        runner = functools.partial(run_setting, keep_checkpoints=True)
    out = out or sys.stdout
    out_dir = Path(out_dir)
    saved = sorted(out_dir.glob("levels/*/*/checkpoints/*.pt"))
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, experiment)
    result = AuditOutcome(plan=plan, outcomes=[], out_dir=out_dir, tracking_uri=uri, experiment=experiment,
                          experiment_id=exp_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = plan.base
    parent_id = lifecycle.create_parent_run(
        client, exp_id, kind=KIND, command="audit",
        run_name=f"audit {base.variant} {plan.budget.name} {time.strftime('%Y%m%d-%H%M%S')}",
        tags={"variant": base.variant, "audit.budget": plan.budget.name, "n_levels": len(plan.levels),
              **({"audit.set": " ".join(plan.overrides)} if plan.overrides else {})},
        params={"variant": base.variant, "weights": base.weights, "data": base.data, "images": ",".join(plan.images),
                "size": plan.size, "seed": base.seed, "device": base.device, "audit_level": plan.budget.name,
                "iterations_override": plan.iterations_override or "none", "client_batch_size": 1,
                **{f"leak.{k}": v for k, v in base.leak.model_dump().items()},
                **{f"variant.{k}": v for k, v in base.variant_options.items()}})
    result.parent_run_id = parent_id
    print(f"audit of {plan.base.variant} ({plan.budget.name}): {len(plan.levels)} threat level(s) on "
          f"{len(plan.images)} image(s) at {plan.size} px; MLflow {uri} parent run {parent_id}", file=out)
    if saved:
        print(f"continuing in {out_dir}: {len(saved)} saved loop(s) there reload (finished) or resume "
              "(interrupted); a loop saved for other settings starts afresh", file=out)

    planned = {p.number: p for p in plan.levels}
    skipped = {n: why for n, _, why in plan.skipped}
    outcomes = result.outcomes

    def on_end(interrupted: bool) -> None:
        result.interrupted = interrupted
        if interrupted:  # the levels it never reached are in the report too
            done = {o.number for o in outcomes}
            for n, lv in enumerate(BATTERY, start=1):
                if n in done:
                    continue
                if n in skipped:
                    outcomes.append(LevelOutcome(n, lv, "SKIPPED", error=skipped[n]))
                else:
                    outcomes.append(LevelOutcome(n, lv, "NOT RUN", assumption_level=planned[n].assumption_level,
                                                 upper_bound=planned[n].config.upper_bound))
        outcomes.sort(key=lambda o: o.number)
        result.verdict = conclusion(plan, outcomes)
        _finish(result, client)

    with lifecycle.parent_run(client, parent_id, on_end=on_end):
        for number, lv in enumerate(BATTERY, start=1):
            if number in skipped:
                outcomes.append(LevelOutcome(number, lv, "SKIPPED", error=skipped[number]))
                continue
            pl = planned[number]
            # NOT RUN until the audited model runs: an interrupt during its control reports it so
            outcome = LevelOutcome(number, lv, "NOT RUN", assumption_level=pl.assumption_level,
                                   upper_bound=pl.config.upper_bound, notes=list(pl.notes),
                                   control_expected=plan.positive_control)
            outcomes.append(outcome)
            iterations = _search_budget(outcome, pl, plan, client, exp_id, parent_id, out_dir, runner,
                                        progress, out)
            outcome.iterations = None if pl.config.attack.closed_form else iterations  # a solve has none
            outcome.status = "FAILED"  # until it finishes (an interrupt makes it KILLED)
            _run_level(outcome, pl.at(iterations), plan, client, exp_id, parent_id, out_dir, runner, progress, out)
    return result


def _search_budget(outcome: LevelOutcome, pl: PlannedLevel, plan: AuditPlan, client, exp_id: str,
                   parent_id: str, out_dir: Path, runner, progress: bool, out) -> int:
    """Run the level's positive control at each budget of its schedule until it leaks (or fails);
    every attempt is kept (``outcome.control_attempts``), the last is ``outcome.positive``.
    Returns the budget the audited model runs at: where the control stopped, or the planned
    budget when the level has no control."""
    budgets = pl.budgets or (pl.config.attack.iterations,)
    if pl.control is None:
        return budgets[0]
    for iterations in budgets:
        pc = pl.control_level(iterations)
        attempt = LevelOutcome(pl.number, pl.level, "FAILED", assumption_level=pl.assumption_level,
                               upper_bound=pc.config.upper_bound, config_variant=pc.config.variant,
                               config_size=pc.config.size, iterations=iterations)
        outcome.control_attempts.append(attempt)
        outcome.positive = attempt
        _run_level(attempt, pc, plan, client, exp_id, parent_id, out_dir, runner, progress, out)
        if attempt.status != "FINISHED" or attempt.leaked:
            break
    outcome.tags["audit.control_attempts"] = ",".join(
        f"{a.iterations}:{'leaked' if a.leaked else 'missed' if a.status == 'FINISHED' else a.status.lower()}"
        for a in outcome.control_attempts)
    return outcome.positive.iterations


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"


def _run_level(outcome: LevelOutcome, pl: PlannedLevel, plan: AuditPlan, client, exp_id: str, parent_id: str,
               out_dir: Path, runner, progress: bool, out) -> None:
    """One level into ``outcome``: its child run, one client batch per image, scores and artifacts."""
    from mlflow.entities import Param

    from suite.execution import tracking
    from suite.execution.lifecycle import ending, terminal_status
    from suite.execution.mlflow_names import KIND_TAG, NOTE_TAG, PARAM_BATCH, one_line_error
    from suite.execution.mlflow_ui import describe_setting

    lv = pl.level
    t0 = time.perf_counter()
    extra = {KIND_TAG: CONTROL_KIND if pl.is_control else LEVEL_KIND, "audit.level": lv.key,
             "audit.number": pl.number,
             "audit.budget": plan.budget.name, "images": ",".join(pl.config.images),
             "assumption_level": pl.assumption_level, "mlflow.parentRunId": parent_id,
             "client_batches": "each image is its own client batch of 1"}
    if not pl.config.attack.closed_form:
        extra["audit.iterations"] = pl.config.attack.iterations
    tags = tracking.setting_tags(pl.config, extra)
    tags[NOTE_TAG] = describe_setting(pl.config)
    run_id = client.create_run(exp_id, tags=tags, run_name=pl.name).info.run_id
    outcome.run_id = run_id
    handle = tracking.SettingRun(client, run_id, pl.config)
    iters = pl.config.attack.iterations
    level_dir = out_dir / "levels" / (f"{pl.number}_{lv.key}" + (f"_positive_control_{iters}" if pl.is_control else ""))
    n = len(BATTERY)
    label = (f"{lv.key} · positive control ({pl.config.variant}, {pl.config.size} px, {iters} it)" if pl.is_control
             else f"{lv.key} ({iters} it)")
    try:
        with terminal_status(client, run_id):
            params = tracking.setting_params(pl.config)
            params.update(batch_size="1", clients=str(len(pl.config.images)), audit_level=lv.key)
            plist = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(plist), PARAM_BATCH):
                client.log_batch(run_id, params=plist[i : i + PARAM_BATCH])
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
        outcome.status, outcome.error = ending(exc)  # KILLED, and why: the rule the run's status follows
        outcome.seconds = time.perf_counter() - t0
        raise
    except Exception as exc:
        outcome.status = "FAILED"
        outcome.error = one_line_error(exc, 300)
        outcome.samples, outcome.attempts_leaked = [], []
        print(f"[{pl.number}/{n}] {label}: FAILED: {outcome.error}", file=out, flush=True)
    outcome.seconds = time.perf_counter() - t0


def _log_client(client, run_id: str, i: int, image: str, res) -> None:
    """One client batch's files on the level's run: PNGs under images/, the rest under clients/."""
    from suite.execution.mlflow_names import IMAGE_SUFFIXES

    sub = f"{i:02d}_{_safe(image)}"
    for path in (res.artifacts or {}).values():
        path = Path(path)
        if path.is_file():
            where = f"images/{sub}" if path.suffix.lower() in IMAGE_SUFFIXES else f"clients/{sub}"
            client.log_artifact(run_id, str(path), artifact_path=where)


def _log_level(client, run_id: str, o: LevelOutcome, pl: PlannedLevel) -> None:
    """A finished level's metrics (aggregates and per image), its result tags and scores.json.

    The level's config flags (``assumption_level``, ``upper_bound``, ``oracle_init``) were
    tagged when its run was created; they are not logged again."""
    from mlflow.entities import Metric, RunTag

    from suite.execution.mlflow_names import tag_value

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
    tags = {**o.tags, "leaked": bool(o.leaked)}
    client.log_batch(run_id, tags=[RunTag(k, tag_value(v)) for k, v in tags.items()])
    client.log_dict(run_id, {
        "images": [s.image for s in o.samples], "psnr": [s.psnr for s in o.samples],
        "ssim": [s.ssim for s in o.samples], "lpips": [s.lpips for s in o.samples],
        "leaked": [s.leaked for s in o.samples], "gain_psnr": [s.gain_psnr for s in o.samples],
        "attempts_leaked": o.attempts_leaked, "leak_rule": o.leak_rule, "lpips_missing": o.lpips_missing,
    }, "scores.json")


def _finish(result: AuditOutcome, client) -> None:
    """Report files, the parent's artifacts and tags (best effort: never hides the runs' outcome)."""
    from suite.execution.mlflow_names import NOTE_TAG, tag_value

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
        client.set_tag(result.parent_run_id, NOTE_TAG, tag_value(result.verdict))
        budgets = [f"{o.number}:{o.iterations}" for o in result.outcomes if o.iterations is not None]
        if budgets:
            client.set_tag(result.parent_run_id, "audit.iterations", " ".join(budgets))
        counts: dict[str, int] = {}
        for o in result.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        for status, count in counts.items():
            client.set_tag(result.parent_run_id, f"n_{status.lower().replace(' ', '_')}", str(count))
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        print(f"warning: audit report incomplete ({type(exc).__name__}: {exc})", file=sys.stderr)
