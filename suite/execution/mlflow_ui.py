"""What the MLflow UI shows first: run descriptions and one saved runs view per study.

MLflow 3's runs page opens a *shared view* from the URL (``?viewStateShareKey=<key>``): the view
is an experiment tag ``mlflow.sharedViewState.<key>`` whose value is the runs page's state as
JSON: search filter, sort, selected columns, column order and widths, and the chart view's
``compareRunCharts`` (chart cards) and ``compareRunSections`` (their sections, in order when
``isAccordionReordered``). A study writes one such view on its experiment: its child runs only,
with PSNR, control PSNR, gain and the varying axes as columns, and in the chart view
(``compareRunsMode=CHART`` in the URL) the key charts first, then the image grid that puts every
run's target, start, control and reconstruction side by side. ``workflowType=machine_learning``
in the URL keeps MLflow on its model-training pages instead of the GenAI overview it opens on by
default. (Read from MLflow 3.17's UI bundle: ``mlflow/server/js/build/static/js``.)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from suite.execution.mlflow_names import IMAGE_FINAL, IMAGE_KEYS, NOTE_TAG

VIEW_KEY = "gistress"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY
VIEW_TIME_TAG = "gistress.view_updated"  # ms since the epoch: `gistress ui` opens the newest view
ML_MODE = "workflowType=machine_learning"
# Columns of the saved view, in order: MLflow names (see suite.execution.mlflow_names.METRIC_NAMES).
VIEW_METRICS = ("score/psnr", "control/psnr", "gain/psnr", "score/content_gain", "score/leaked", "score/ssim", "score/lpips",
                "score/brr")
CHART_MODE = "compareRunsMode=CHART"  # the runs page's chart view instead of its table
# The chart view's first section, in order: (MLflow metric, drawn as a curve over steps). A metric
# logged only at step 0 is drawn as bars across runs (suite.execution.tracking).
KEY_CHARTS = (("score/psnr", True), ("gain/psnr", False), ("score/ssim", False), ("score/psnr_affine", False),
              ("loss/matching", True))
KEY_SECTION, IMAGE_SECTION, IMAGE_KEY_SECTION = "gistress-key-charts", "gistress-images", "gistress-image-keys"
_FILTER_MAX = 15000
_DESCRIPTION_MAX = 4000  # experiment tags hold 20,000 characters; a longer run list filters by tags


def _col(kind: str, name: str) -> str:
    """A runs-table column id as the UI spells it, e.g. metrics.`score/psnr`."""
    return f"{kind}.`{name}`"


def runs_link(base_url: str, experiment_id: str, *, view: bool = True, charts: bool = False) -> str:
    """The browser link to an experiment's runs table (its saved study view when ``view``), or to
    its chart view (``charts``: the key charts and the image grid of the runs side by side)."""
    query = (f"viewStateShareKey={VIEW_KEY}&" if view else "") + (f"{CHART_MODE}&" if charts else "") + ML_MODE
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    """The browser link to one run's page (model-training mode)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"


def _card(uuid: str, section: str, kind: str, runs: int, **fields) -> dict[str, Any]:
    """One chart card as the UI stores it (the fields of its RunsChartsCardConfig classes)."""
    card: dict[str, Any] = {"uuid": uuid, "type": kind, "runsCountToCompare": runs, "metricSectionId": section,
                            "deleted": False, "isGenerated": False}
    if kind == "LINE":
        card.update(lineSmoothness=0, xAxisScaleType="linear", scaleType="linear",
                    range={"xMin": None, "xMax": None, "yMin": None, "yMax": None}, xAxisKey="step",
                    selectedXAxisMetricKey="", yAxisKey="metric", yAxisExpressions=[], ignoreOutliers=False,
                    useGlobalXaxisKey=True, useGlobalLineSmoothing=True)
    return {**card, **fields}


def chart_state(runs: int, has_control: bool) -> dict[str, Any]:
    """The chart view of a study's view: a section of key charts (PSNR and matching loss over
    steps, gain, SSIM and affine PSNR across runs), then the image grid (rows: target, start,
    control, reconstruction; columns: runs) at the scored step, then one grid per image key. The
    UI appends sections for the other metrics after these (``isAccordionReordered``)."""
    count = max(10, runs)
    cards = []
    for metric, curve in KEY_CHARTS:
        if not has_control and metric.startswith("gain/"):
            continue
        cards.append(_card(f"gistress-{metric.replace('/', '-')}", KEY_SECTION, "LINE" if curve else "BAR", count,
                           metricKey=metric))
    keys = [k for k in IMAGE_KEYS if has_control or k != "control"]
    cards.append(_card("gistress-image-grid", IMAGE_SECTION, "IMAGE", count, imageKeys=keys, step=IMAGE_FINAL,
                       showRunParams=False))
    # one card per key, or the UI adds them itself wherever it likes
    cards += [_card(f"gistress-image-{k}", IMAGE_KEY_SECTION, "IMAGE", count, imageKeys=[k], step=IMAGE_FINAL,
                    showRunParams=False) for k in keys]
    sections = [
        {"uuid": KEY_SECTION, "name": "Key charts", "display": True, "isReordered": True, "deleted": False,
         "columns": len([c for c in cards if c["metricSectionId"] == KEY_SECTION]), "cardHeight": 250},
        {"uuid": IMAGE_SECTION, "name": "Reconstructions side by side (slider: % of the attack's iterations)",
         "display": True, "isReordered": True, "deleted": False, "columns": 1, "cardHeight": 640},
        {"uuid": IMAGE_KEY_SECTION, "name": "Images by key", "display": False, "isReordered": True,
         "deleted": False, "columns": 2, "cardHeight": 500},
    ]
    # the runs list is hidden: the grid's columns name the runs, and it needs the width
    return {"compareRunCharts": cards, "compareRunSections": sections, "isAccordionReordered": True,
            "hideEmptyCharts": True, "runsHiddenMode": "SHOW_ALL", "runListHidden": True}


def view_state(run_ids: Sequence[str], axis_tags: Sequence[str], *, study: str, profile: str | None,
               has_control: bool, run_name_width: int = 260) -> dict[str, Any]:
    """The runs-page state of a study's view: its child runs, scores and varying axes as columns,
    and its chart view (``chart_state``)."""
    quoted = ",".join(f"'{r}'" for r in run_ids)
    if run_ids and len(quoted) < _FILTER_MAX:
        search = f"attributes.run_id IN ({quoted})"
    else:  # a very large study: every setting run of this study and profile
        search = f"tags.`study` = '{study}' AND tags.`profile` = '{profile or 'none'}' AND tags.`gistress.kind` = 'setting'"
    metrics = [m for m in VIEW_METRICS if has_control or not m.startswith(("control/", "gain/"))]
    columns = [_col("metrics", m) for m in metrics] + [_col("tags", t) for t in axis_tags]
    order = _col("metrics", "gain/psnr" if has_control else "score/psnr")
    run_name = _col("attributes", "Run Name")
    return {
        "searchFilter": search,
        "orderByKey": order,
        "orderByAsc": False,
        "selectedColumns": columns,
        "columnOrder": [run_name, *columns],
        "columnWidths": {run_name: run_name_width},
        **chart_state(len(run_ids), has_control),
    }


def study_description(study: str, experiment_id: str, parent_run_id: str, *, profile: str | None = None,
                      runs: Sequence[tuple[str, str]] = ()) -> str:
    """The experiment's description (Markdown, shown above its runs): links, in model-training
    mode, to the latest invocation's parent run (the study figure and the summary table) and to
    each of its runs (``runs``: name, run id). MLflow's own links to a run carry no mode, so
    from a fresh browser they open its GenAI pages."""
    def link(run_id: str) -> str:
        return f"#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"

    text = (f"Study **{study}**" + (f" (profile {profile})" if profile else "") +
            f": [summary figure and table of the latest invocation (its parent run)]({link(parent_run_id)}).")
    listed = " Its runs: " + " · ".join(f"[{name}]({link(run_id)})" for name, run_id in runs) + "."
    if runs and len(text) + len(listed) <= _DESCRIPTION_MAX:  # a large study's list would not fit a tag
        text += listed
    return text


def save_study_view(client, experiment_id: str, rows: Sequence[Mapping[str, Any]], *, study: str,
                    profile: str | None, parent_run_id: str | None = None) -> None:
    """Write the study's view on its experiment (replacing the previous invocation's), and with
    ``parent_run_id`` the experiment's description that links to that run."""
    run_ids = [r["run_id"] for r in rows if r.get("run_id")]
    axes: list[str] = []
    for r in rows:
        for k in r.get("axes") or {}:
            if k not in axes and k not in ("images", "seed"):
                axes.append(k)
    tags = [f"axis.{k}" for k in axes]
    if len({r.get("image") for r in rows}) > 1:
        tags.append("image")
    if len({r.get("seed") for r in rows}) > 1:
        tags.append("seed")
    has_control = any("control_psnr" in (r.get("metrics") or {}) for r in rows)
    longest = max((len(str(r.get("name", ""))) for r in rows), default=20)
    width = int(min(460, max(200, 7.5 * longest + 70)))  # the whole name, not its first 15 characters
    state = view_state(run_ids, tags, study=study, profile=profile, has_control=has_control,
                       run_name_width=width)
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))
    if parent_run_id:
        runs = [(str(r.get("name") or r["run_id"]), r["run_id"]) for r in rows if r.get("run_id")]
        client.set_experiment_tag(experiment_id, NOTE_TAG, study_description(study, experiment_id, parent_run_id,
                                                                             profile=profile, runs=runs))
    client.set_experiment_tag(experiment_id, VIEW_TIME_TAG, str(int(time.time() * 1000)))


def study_views(client) -> list[tuple[str, str]]:
    """(experiment name, id) of every experiment with a study view, newest view first."""
    from mlflow.entities import ViewType

    found = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000):
        if VIEW_TAG in exp.tags:
            found.append((int(exp.tags.get(VIEW_TIME_TAG, "0") or 0), exp.name, exp.experiment_id))
    return [(name, exp_id) for _, name, exp_id in sorted(found, reverse=True)]


def summary_table(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The study summary as columns for ``MlflowClient.log_table``: the setting and its scores
    first (the viewer shows the leftmost columns), no dots in column names (it reads a dot as a
    nested field)."""
    from suite.reports.figures import summary_records

    records = summary_records(rows)
    if not records:
        return {}
    first = ["psnr", "control_psnr", "gain_psnr", "content_gain", "leaked", "ssim", "lpips", "brr"]
    columns = {"setting": [str(r.get("name", "")) for r in rows]}
    for key in first + [k for k in records[0] if k not in first]:
        columns[key.replace(".", "_")] = [rec[key] for rec in records]
    return columns


# ---------------------------------------------------------------------------------------------
# run descriptions (the ``mlflow.note.content`` tag, shown as Markdown on the run's page)
# ---------------------------------------------------------------------------------------------


def describe_setting(cfg) -> str:
    """One paragraph on what a setting is: model, data, client, attack, control."""
    t, a = cfg.threat, cfg.attack
    opts = ", ".join(f"{k}={v}" for k, v in cfg.variant_options.items())
    model = f"**{cfg.variant}**" + (f" ({opts})" if opts else "") + f", {cfg.weights} weights"
    size = f"{cfg.size} px" if cfg.size else "its default size"
    data = f"{'+'.join(cfg.images)} from {cfg.data} at {size}"
    client = [f"{t.bn_mode}-mode BN", "labels shared" if t.shares_labels else "labels not shared"]
    if t.update != "gradient":
        client.append(f"{t.update} with {t.local_steps} local steps")
    if t.bn_stats != "none":
        client.append(f"BN statistics granted ({t.bn_stats})")
    if t.defense != "none":
        client.append(f"defense {t.defense}")
    attack = (f"{a.preset or 'custom'} ({a.objective}, {a.optimizer}, {a.iterations} iterations, "
              f"{a.restarts} restart{'s' if a.restarts != 1 else ''}, {a.init} init)")
    control = "; compared with a prior-only control (same start and budget, gradient term off)" if a.control else ""
    return f"{model}; {data}. Client: {', '.join(client)}. Attack: {attack}{control}."


def _db(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return f"{v:.2f} dB" if math.isfinite(v) else str(v)


def describe_result(cfg, metrics: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """The setting's paragraph plus its outcome: PSNR against the control, leaked or not."""
    m = metrics
    line = f"**PSNR {_db(m.get('psnr'))}**"
    if "control_psnr" in m:
        gain = m.get("gain_psnr")
        line += f" (prior-only control {_db(m['control_psnr'])}, gain {float(gain):+.2f} dB)" if gain is not None else ""
    if "ssim" in m:
        line += f"; SSIM {float(m['ssim']):.3f}"
    line += f"; LPIPS {float(m['lpips']):.3f}" if "lpips" in m else "; LPIPS missing"
    if "content_gain" in m:
        line += f"; content gain {_db(m['content_gain'])}"
        if "control_content_gain" in m:
            line += f" (control {_db(m['control_content_gain'])})"
    if "leaked" in m:
        line += f"; leaked: {'yes' if m['leaked'] else 'no'} (rule: {tags.get('leak_rule', 'see the leak_rule tag')})"
    notes = []
    if cfg.threat.upper_bound:
        notes.append("an upper bound (the client is simplified in the attacker's favour)")
    if cfg.attack.oracle_init:
        notes.append("an oracle start (target-derived: an upper bound)")
    if tags.get("diverged"):
        notes.append(f"diverged restarts: {tags['diverged']}")
    tail = f" Note: {'; '.join(notes)}." if notes else ""
    return f"{describe_setting(cfg)}\n\n{line}.{tail}"
