"""A study's outcome: one summary row per setting, the CSV, figure and runs-table view, the printed end.

Rows come from this invocation's children, from earlier FINISHED runs (resume) or, for settings
that never reported, from what MLflow knows (KILLED, FAILED) or PENDING. Writing the summary is
best effort: it never hides the runs' own outcome.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.studies.expand import Setting, short_value


@dataclass
class Comparison:
    """One paired table of an ablation: its changes against ``baseline`` and the files written."""

    baseline: Any
    changes: list  # suite.studies.compare.Change, one per change
    csv_path: Path | None = None
    figure: Path | None = None


@dataclass
class StudyOutcome:
    """What a study invocation produced."""

    study: str
    profile: str | None
    settings: list[Setting]
    rows: list[dict] = field(default_factory=list)
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    csv_path: Path | None = None
    figure_path: Path | None = None
    interrupted: bool = False
    compare: Any = None  # the spec's CompareBlock (ablations): changes paired against the baseline
    # one per paired table: against compare.baseline first, then each compare.also_against value
    comparisons: list[Comparison] = field(default_factory=list)
    sweep: Any = None  # the spec's SweepBlock: the server's and the oracle's pick per group
    sweep_groups: list = field(default_factory=list)  # suite.studies.sweep.SweepGroup
    sweep_path: Path | None = None

    @property
    def changes(self) -> list:
        """The changes paired against ``compare.baseline`` (empty without a compare block)."""
        return self.comparisons[0].changes if self.comparisons else []

    @property
    def comparison_path(self) -> Path | None:
        """``comparison.csv``: the table against ``compare.baseline``."""
        return self.comparisons[0].csv_path if self.comparisons else None

    @property
    def comparison_figure(self) -> Path | None:
        """``comparison.png``: the forest plot against ``compare.baseline``."""
        return self.comparisons[0].figure if self.comparisons else None

    @property
    def also_compared(self) -> list[Comparison]:
        """The tables against each ``compare.also_against`` value."""
        return self.comparisons[1:]

    @property
    def counts(self) -> dict[str, int]:
        """Rows per status."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        """0 all finished, 1 some setting failed (or never ran), 130 interrupted (``lifecycle.exit_code``)."""
        from suite.execution.lifecycle import exit_code

        return exit_code((r["status"] for r in self.rows), interrupted=self.interrupted)

    def to_json(self) -> dict:
        """A machine-readable summary (the ``--json`` line)."""
        return {
            "study": self.study,
            "profile": self.profile,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "n_settings": len(self.settings),
            "counts": self.counts,
            "interrupted": self.interrupted,
            "summary_csv": str(self.csv_path) if self.csv_path else None,
            "figure": str(self.figure_path) if self.figure_path else None,
            "comparison_csv": str(self.comparison_path) if self.comparison_path else None,
            "comparison": [_change_json(c) for c in self.changes],
            "also_compared": [{"baseline": c.baseline, "label": short_value(c.baseline),
                               "comparison_csv": str(c.csv_path) if c.csv_path else None,
                               "comparison_figure": str(c.figure) if c.figure else None,
                               "comparison": [_change_json(x) for x in c.changes]} for c in self.also_compared],
            "sweep_csv": str(self.sweep_path) if self.sweep_path else None,
            "sweep": [{"group": g.group, "trials": g.trials, "by_matching_loss": vars(g.by_matching_loss),
                       "leaked_by_matching_loss": g.leaked_by_matching_loss, "oracle": vars(g.oracle)}
                      for g in self.sweep_groups],
            "rows": self.rows,
        }


def _change_json(change) -> dict:
    return {"change": change.name, "pairs": change.n_pairs, "unpaired": change.unpaired,
            "differences": {m: {"n": d.n, "mean": d.mean, "low": d.low, "high": d.high, "direction": d.direction}
                            for m, d in change.differences.items()},
            "leaks_baseline": change.leaks_baseline, "leaks_change": change.leaks_change,
            "leak_p": change.leak_p, "leak_direction": change.leak_direction}


def progress_line(n: int, total: int, row: dict) -> str:
    """One line per finished child: ``[n/total] name: psnr ... dB`` or its status and error."""
    m = row.get("metrics") or {}
    if row["status"] == "FINISHED":
        what = f"psnr {m.get('psnr', float('nan')):.2f} dB"
        if "control_psnr" in m:
            what += f", control {m['control_psnr']:.2f} dB"
    else:
        what = f"{row['status']}: {row.get('error') or 'no detail'}"
    return f"[{n}/{total}] {row['name']}: {what} ({row.get('seconds', 0):.0f} s)"


def summarize(outcome: StudyOutcome, settings: Sequence[Setting], results: dict[int, dict],
              reused: dict[int, str], client, study_dir: Path) -> None:
    """Summary rows for every setting into ``outcome.rows``; CSV, figure, runs-table view and
    ``n_<status>`` tags on disk and on the parent run (best effort: warns, never raises but Ctrl-C).

    ``results``: this invocation's rows by setting index; ``reused``: setting index -> the
    earlier FINISHED run that resume kept.
    """
    parent_id = outcome.parent_run_id
    # Children this invocation started but got no row for (interrupted, worker gone): their
    # status as MLflow has it after the sweep.
    started = {}
    if len(results) + len(reused) < len(settings):
        from suite.execution.tracking import child_runs

        try:
            for run in child_runs(client, outcome.experiment_id, parent_id):
                started[run.data.tags.get("config_hash")] = run
        except Exception:
            pass
    rows = []
    for s in settings:
        if s.index in results:
            row = {**results[s.index], "reused": False}
        elif s.index in reused:
            row = _reused_row(client, s, reused[s.index], study_dir)
        elif s.config_hash in started:
            run = started[s.config_hash]
            row = {"index": s.index, "status": run.info.status, "run_id": run.info.run_id, "metrics": {},
                   "artifacts": {}, "error": run.data.tags.get("error"), "reused": False}
        else:
            row = {"index": s.index, "status": "PENDING", "run_id": None, "metrics": {}, "artifacts": {},
                   "error": None, "reused": False}
        # the image column already says which images; the other varying axes get a column each
        row.update(name=s.name, axes={k: short_value(v) for k, v in s.axes.items() if k != "images"}, seed=s.seed,
                   image=s.image, row_label=s.row_label, config_hash=s.config_hash, variant=s.config.variant)
        rows.append(row)
    outcome.rows = rows
    # Each part is guarded on its own: a figure that fails to render must not cost the comparison
    # tables or summary.json, and no part may hide the runs' own outcome.
    parts = [("summary table", lambda: _write_summary_table(outcome, rows, client, study_dir)),
             ("figure", lambda: _write_figure(outcome, rows, client, study_dir))]
    if outcome.compare is not None:
        parts.append(("paired comparison", lambda: _write_comparison(outcome, rows, client, study_dir)))
    if outcome.sweep is not None:
        parts.append(("sweep table", lambda: _write_sweep(outcome, rows, client, study_dir)))
    parts.append(("summary.json", lambda: _write_counts_and_json(outcome, client, study_dir)))
    for what, write in parts:
        try:
            write()
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            print(f"warning: study summary incomplete: {what} not written ({type(exc).__name__}: {exc})",
                  file=sys.stderr)


def _write_summary_table(outcome: StudyOutcome, rows: list[dict], client, study_dir: Path) -> None:
    """summary.csv, the saved runs-table view `gistress ui` opens, and the parent's table."""
    from suite.execution.mlflow_ui import save_study_view, summary_table
    from suite.reports import figures

    parent_id = outcome.parent_run_id
    outcome.csv_path = figures.write_summary_csv(rows, study_dir / "summary.csv")
    client.log_artifact(parent_id, str(outcome.csv_path))
    # the runs-table view first: it is what `gistress ui` opens, whatever fails after it
    save_study_view(client, outcome.experiment_id, rows, study=outcome.study, profile=outcome.profile,
                    parent_run_id=parent_id)
    table = summary_table(rows)
    if table:  # the same table, rendered as a table on the parent's artifacts page
        client.log_table(parent_id, table, "summary_table.json")


def _write_figure(outcome: StudyOutcome, rows: list[dict], client, study_dir: Path) -> None:
    """The study's image grid, on disk and on the parent run."""
    from suite.execution.mlflow_names import FIGURES_DIR
    from suite.reports import figures

    # runs logged before the PNGs moved to figures/ keep them in images/
    outcome.figure_path = figures.study_figure(rows, study_dir / "figure.png", title=outcome.study,
                                               client=client, cache_dir=study_dir / ".artifact-cache",
                                               folders=(FIGURES_DIR, "images"))
    if outcome.figure_path is not None:
        from PIL import Image

        with Image.open(outcome.figure_path) as im:
            client.log_image(outcome.parent_run_id, im.convert("RGB"),
                             artifact_file=f"images/{figures.comparison_name(rows)}")


def _write_sweep(outcome: StudyOutcome, rows: list[dict], client, study_dir: Path) -> None:
    """A sweep's per-group table (sweep.csv)."""
    from suite.studies.sweep import sweep_groups, write_sweep_csv

    outcome.sweep_groups = sweep_groups(rows, outcome.sweep.axes)
    outcome.sweep_path = write_sweep_csv(outcome.sweep_groups, study_dir / "sweep.csv")
    client.log_artifact(outcome.parent_run_id, str(outcome.sweep_path))


def _write_counts_and_json(outcome: StudyOutcome, client, study_dir: Path) -> None:
    """Status counts as parent tags, and summary.json with whatever the other parts produced."""
    for status, n in outcome.counts.items():
        client.set_tag(outcome.parent_run_id, f"n_{status.lower()}", str(n))
    (study_dir / "summary.json").write_text(json.dumps(outcome.to_json(), indent=2, default=str))


def _write_comparison(outcome: StudyOutcome, rows: list[dict], client, study_dir: Path) -> None:
    """An ablation's paired differences, against the baseline and each ``also_against`` value."""
    from suite.studies.compare import file_stem

    compare = outcome.compare
    outcome.comparisons = [
        _one_comparison(compare.axis, value, rows, client, outcome.parent_run_id, study_dir, stem)
        for value, stem in [(compare.baseline, "comparison"), *((v, file_stem(v)) for v in compare.also_against)]]


def _one_comparison(axis: str, baseline: Any, rows: list[dict], client, parent_id: str, study_dir: Path,
                    stem: str) -> Comparison:
    """One paired table: ``<stem>.csv`` and ``<stem>.png`` on disk and on the parent run, and the
    table ``<stem>_table.json`` there."""
    from suite.reports.figures import paired_differences_figure
    from suite.studies.compare import paired_changes, records, write_comparison_csv

    changes = paired_changes(rows, axis, baseline)
    out = Comparison(baseline, changes, csv_path=write_comparison_csv(changes, study_dir / f"{stem}.csv"))
    client.log_artifact(parent_id, str(out.csv_path))
    recs = records(changes)
    if recs:  # a table on the parent's artifacts page, beside the summary table
        client.log_table(parent_id, {k: [r[k] for r in recs] for k in recs[0]}, f"{stem}_table.json")
    entries = [(c.name, {m: (d.mean, d.low, d.high) for m, d in c.differences.items()})
               for c in changes if c.differences]
    out.figure = paired_differences_figure(entries, study_dir / f"{stem}.png",
                                           baseline=f"{axis}={short_value(baseline)}")
    if out.figure is not None:
        client.log_artifact(parent_id, str(out.figure), "images")
    return out


def _reused_row(client, s: Setting, run_id: str, study_dir: Path) -> dict:
    """A summary row from an earlier FINISHED run (metrics from MLflow, images from disk if there)."""
    row = {"index": s.index, "name": s.name, "status": "FINISHED", "run_id": run_id, "error": None,
           "reused": True, "metrics": {}, "artifacts": {}}
    try:
        from suite.execution.mlflow_names import internal_metrics

        run = client.get_run(run_id)
        row["metrics"] = internal_metrics(run.data.metrics)  # MLflow's names back to the suite's keys
        row["leak_rule"] = run.data.tags.get("leak_rule")
    except Exception as exc:
        row["error"] = f"earlier run unreadable: {exc}"
    local = study_dir / s.config_hash
    for name in ("target", "control", "reconstruction", "init"):
        p = local / f"{name}.png"
        if p.is_file():
            row["artifacts"][name] = str(p)
    return row


def format_table(rows: Sequence[dict]) -> str:
    """The printed summary: one row per child with its varying axes, scores and status."""
    from suite.reports.figures import summary_records

    records = summary_records(rows, short_ids=True)
    if not records:
        return "(no settings)"
    cols = list(records[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in records)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{str(r[c]):<{widths[c]}}" for c in cols) for r in records]
    return "\n".join(lines)


def leak_sentence(rows: Sequence[dict]) -> str:
    """Which settings leaked (a sample met the leak rule) and which did not, in words."""
    from suite.reports.figures import summary_records

    done = [(row, rec) for row, rec in zip(rows, summary_records(rows)) if rec["leaked"]]
    if not done:
        return ""

    def label(row: dict, rec: dict) -> str:
        # the setting's run name (what varies), else the variant
        return f"{row.get('name') or rec.get('variant') or row.get('variant', '?')} ({rec['psnr']} dB)"

    leaked = [label(row, rec) for row, rec in done if rec["leaked"] == "yes"]
    held = [label(row, rec) for row, rec in done if rec["leaked"] == "no"]
    parts = [f"leaked: {'; '.join(leaked)}" if leaked else "no setting leaked"]
    if held:
        parts.append(f"did not leak: {'; '.join(held)}")
    rules = sorted({row["leak_rule"] for row, _ in done if row.get("leak_rule")})
    if rules:  # the rule names itself wherever a verdict is printed
        parts.append(f"leak rule: {' | '.join(rules)}")
    return ". ".join(parts) + "."


def print_summary(outcome: StudyOutcome, out, json_out: bool) -> None:
    """The study's end as ``lifecycle.print_end`` prints every command's: the table, counts and
    which settings leaked, the summary files, the runs table in MLflow, the ``--json`` line."""
    from suite.execution.lifecycle import page_hint, print_end
    from suite.execution.mlflow_ui import runs_link

    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(outcome.counts.items()))
    files = [(label, path.resolve()) for label, path in (("summary", outcome.csv_path), ("figure", outcome.figure_path),
                                                         ("comparison", outcome.comparison_path),
                                                         ("comparison figure", outcome.comparison_figure),
                                                         *((f"comparison vs {short_value(c.baseline)}{what}", path)
                                                           for c in outcome.also_compared
                                                           for what, path in (("", c.csv_path), (" figure", c.figure))),
                                                         ("sweep", outcome.sweep_path))
             if path]
    uri, exp_id = outcome.tracking_uri, outcome.experiment_id
    hint = page_hint("compare runs: the study's runs table", uri, lambda base: runs_link(base, exp_id)) \
        if uri and exp_id else None
    table = format_table(outcome.rows)
    if outcome.compare is not None:
        from suite.studies.compare import format_comparison

        for c in outcome.comparisons:
            table += "\n\n" + format_comparison(c.changes, outcome.compare.axis, c.baseline)
    if outcome.sweep is not None:
        from suite.studies.sweep import format_sweep

        table += "\n\n" + format_sweep(outcome.sweep_groups, outcome.sweep.axes)
    print_end(out, table=table, verdict=[f"{outcome.study}: {counts}", leak_sentence(outcome.rows)],
              files=files, mlflow=hint, summary=outcome.to_json() if json_out else None)
