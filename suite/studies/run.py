"""Running a study: one MLflow experiment, one parent run, one child run per setting, resumable.

The parent run's lifecycle (tags, SIGTERM, terminal status, exit code, the printed end) is
``suite.execution.lifecycle``'s, shared with ``gistress audit`` and ``gistress attack``; where
settings run is ``suite.execution.executors``'.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from suite.errors import GistressError
from suite.studies.expand import Setting, dry_run_lines, expand_settings
from suite.studies.spec import load_spec
from suite.studies.summary import StudyOutcome, print_summary, progress_line, summarize

DEFAULT_RUNNER = "suite.execution.runner:run_setting"


def run_study(
    spec_path: str | Path,
    *,
    profile: str | None = None,
    sets: Sequence[str] = (),
    dry_run: bool = False,
    fresh: bool = False,
    executor: str = "local",
    workers: int = 1,
    tracking_uri: str | None = None,
    out_root: str | Path = "gistress-out",
    json_out: bool = False,
    runner: str = DEFAULT_RUNNER,
    executor_options: dict | None = None,
    out=None,
) -> StudyOutcome:
    """Run (or resume) a study: one MLflow experiment, one parent run, one child per setting.

    Resume: settings whose config hash already has a FINISHED child in the experiment are
    skipped (their earlier results fill the summary); FAILED/KILLED ones run again; ``fresh``
    re-runs everything. A failing setting marks its child FAILED and the study goes on. Ctrl-C /
    SIGTERM: the running child and the parent end KILLED, the summary of what exists is written,
    and KeyboardInterrupt is re-raised (re-running completes the rest). ``outcome.exit_code``
    follows ``lifecycle.exit_code``.
    """
    from suite.execution import executors, lifecycle, tracking

    out = out or sys.stdout
    spec = load_spec(spec_path)
    settings = expand_settings(spec, profile, sets)
    outcome = StudyOutcome(study=spec.name, profile=profile, settings=settings, compare=spec.compare,
                           sweep=spec.sweep)
    if dry_run:
        for line in dry_run_lines(settings):
            print(line, file=out)
        if json_out:
            print(json.dumps({"study": spec.name, "profile": profile, "n_settings": len(settings),
                              "settings": [{"name": s.name, "config_hash": s.config_hash,
                                            "config": s.config.model_dump(mode="json")} for s in settings]}),
                  file=out)
        return outcome

    if runner == DEFAULT_RUNNER:
        check_variants(settings, spec.source)
    plan = executors.plan(executor, workers=workers, spec_block=spec.executor, options=executor_options)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    executors.check_tracking(plan, uri)
    outcome.tracking_uri = uri
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, spec.name)
    outcome.experiment_id = exp_id
    done = {} if fresh else tracking.finished_runs(spec.name, uri, client=client)
    pending = [s for s in settings if s.config_hash not in done]
    reused = {s.index: done[s.config_hash] for s in settings if s.config_hash in done}

    study_dir = Path(out_root) / spec.name
    study_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_id = lifecycle.create_parent_run(
        client, exp_id, kind="study", command="study", run_name=f"{spec.name} {profile or 'default'} {stamp}",
        tags={"study": spec.name, "profile": profile or "none", "sets": " ".join(sets) or "none",
              "spec": str(spec_path), "executor": plan.kind, "n_settings": len(settings), "n_reused": len(reused)},
        description=spec.description)
    outcome.parent_run_id = parent_id
    print(f"study {spec.name}: {len(settings)} setting(s), {len(reused)} already finished, "
          f"{len(pending)} to run ({plan.describe()}); MLflow {uri} parent run {parent_id}", file=out)

    results: dict[int, dict] = {}

    def on_end(interrupted: bool) -> None:
        outcome.interrupted = interrupted
        executors.sweep(client, exp_id, parent_id, interrupted=interrupted)
        summarize(outcome, settings, results, reused, client, study_dir)

    with lifecycle.parent_run(client, parent_id, on_end=on_end):
        client.log_text(parent_id, Path(spec_path).read_text(), "spec.yaml")
        client.log_dict(parent_id, {"profile": profile, "sets": list(sets),
                                    "settings": [{"name": s.name, "config_hash": s.config_hash}
                                                 for s in settings]}, "settings.json")
        jobs = [
            executors.SettingJob(
                index=s.index, name=s.name, config=s.config.model_dump(mode="json"),
                experiment=spec.name, tracking_uri=uri, parent_run_id=parent_id,
                out_dir=str((study_dir / s.config_hash).resolve()), runner=runner,
                extra_tags={"study": spec.name, "profile": profile or "none", "image": s.image,
                            "seed": s.seed, **{f"axis.{k}": v for k, v in s.axes.items()}},
            )
            for s in pending
        ]
        total = len(jobs)
        for n, row in enumerate(executors.run_jobs(jobs, plan, client=client, folder=study_dir / "submitit"),
                                start=1):
            results[row["index"]] = row
            print(progress_line(n, total, row), file=out)
    print_summary(outcome, out, json_out)
    return outcome


def check_variants(settings: Sequence[Setting], source: str) -> None:
    """Unknown variant names, variant options and weights specs fail before anything runs.

    Cheap registry checks (nothing is built); ``timm:``/``torchvision:`` names are left to the
    runner. Without this a misspelt variant would surface hours into a study as a FAILED child.
    """
    from variants.base import check_options, lookup, parse_variant_name
    from variants.weights import check_weights_spec

    seen: set[str] = set()
    for s in settings:
        cfg = s.config
        key = json.dumps([cfg.variant, sorted(cfg.variant_options), cfg.weights])
        if key in seen:
            continue
        seen.add(key)
        try:
            check_weights_spec(cfg.weights)
            if not parse_variant_name(cfg.variant).external:
                check_options(cfg.variant, lookup(cfg.variant).builder, cfg.variant_options)
        except GistressError as exc:
            raise GistressError(f"setting {s.index + 1} ({s.name}) of {source}: {exc.message}", exc.hint) from None
