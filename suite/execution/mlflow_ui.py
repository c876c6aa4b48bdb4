"""What the MLflow UI shows first: run descriptions and one saved runs-table view per study.

MLflow 3's runs page opens a *shared view* from the URL (``?viewStateShareKey=<key>``): the view
is an experiment tag ``mlflow.sharedViewState.<key>`` whose value is the runs page's state as
JSON (search filter, sort, selected columns, column order and widths). A study writes one such
view on its experiment: its child runs only, with PSNR, control PSNR, gain and the varying axes
as columns. ``workflowType=machine_learning`` in the URL keeps MLflow on its model-training pages
instead of the GenAI overview it opens on by default.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

VIEW_KEY = "gistress"
VIEW_TAG = "mlflow.sharedViewState." + VIEW_KEY
VIEW_TIME_TAG = "gistress.view_updated"  # ms since the epoch: `gistress ui` opens the newest view
ML_MODE = "workflowType=machine_learning"
# Columns of the saved view, in order: MLflow names (see suite.execution.mlflow_names.METRIC_NAMES).
VIEW_METRICS = ("score/psnr", "control/psnr", "gain/psnr", "score/ssim", "score/lpips", "score/brr")
_FILTER_MAX = 15000  # experiment tags hold 20,000 characters; a longer run list filters by tags


def _col(kind: str, name: str) -> str:
    """A runs-table column id as the UI spells it, e.g. metrics.`score/psnr`."""
    return f"{kind}.`{name}`"


def runs_link(base_url: str, experiment_id: str, *, view: bool = True) -> str:
    """The browser link to an experiment's runs table (its saved study view when ``view``)."""
    query = (f"viewStateShareKey={VIEW_KEY}&" if view else "") + ML_MODE
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def run_link(base_url: str, experiment_id: str, run_id: str) -> str:
    """The browser link to one run's page (model-training mode)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_MODE}"


def view_state(run_ids: Sequence[str], axis_tags: Sequence[str], *, study: str, profile: str | None,
               has_control: bool, run_name_width: int = 260) -> dict[str, Any]:
    """The runs-page state of a study's view: its child runs, scores and varying axes as columns."""
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
    }


def save_study_view(client, experiment_id: str, rows: Sequence[Mapping[str, Any]], *, study: str,
                    profile: str | None) -> None:
    """Write the study's view on its experiment (replacing the previous invocation's)."""
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
    first = ["psnr", "control_psnr", "gain_psnr", "leaked", "ssim", "lpips", "brr"]
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
    if "brr" in m:
        line += f"; leaked: {'yes' if m['brr'] > 0 else 'no'} (rule: {tags.get('leak_rule', 'see the leak_rule tag')})"
    notes = []
    if cfg.threat.upper_bound:
        notes.append("an upper bound (the client is simplified in the attacker's favour)")
    if cfg.attack.oracle_init:
        notes.append("an oracle start (target-derived: an upper bound)")
    if tags.get("diverged"):
        notes.append(f"diverged restarts: {tags['diverged']}")
    tail = f" Note: {'; '.join(notes)}." if notes else ""
    return f"{describe_setting(cfg)}\n\n{line}.{tail}"
