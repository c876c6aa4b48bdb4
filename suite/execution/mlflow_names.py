"""What the suite's values are called in MLflow and how they are written there.

Metric names: the UI groups charts by the part before "/", so scores, the control, the gain and
the loss terms land in their own sections; result dicts inside the suite keep the plain keys
(psnr, control_psnr, matching_loss, ...). This module is the one place names change, both ways.
Also here: param names, tag values (booleans lower-case, containers as JSON, capped), an
exception as a one-line ``error`` tag, and the tags the suite reads back (kind, description).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from suite.errors import GistressError

METRIC_NAMES = {
    "psnr": "score/psnr", "ssim": "score/ssim", "lpips": "score/lpips", "brr": "score/brr",
    "wsrr": "score/wsrr", "label_accuracy": "score/label_accuracy", "init_psnr": "score/init_psnr",
    "psnr_affine": "score/psnr_affine", "content_gain": "score/content_gain", "leaked": "score/leaked",
    "oracle_best_restart_psnr": "oracle/best_restart_psnr",
    "oracle_best_snapshot_ssim": "oracle/best_snapshot_ssim", "oracle_best_snapshot_psnr": "oracle/best_snapshot_psnr",
    "oracle_best_snapshot_step": "oracle/best_snapshot_step",
    "matching_loss": "loss/matching", "total": "loss/total", "tv": "loss/tv", "bn_prior": "loss/bn_prior",
    "restarts_diverged": "run/restarts_diverged", "seconds": "run/seconds", "chosen_tv": "weight/chosen_tv",
    "closed_form_residual": "closed_form/residual", "start_residual": "closed_form/start_residual",
    "closed_form_rank": "closed_form/rank", "closed_form_unknowns": "closed_form/unknowns",
}
PREFIXES = {"control_": "control/", "gain_": "gain/"}  # control_psnr -> control/psnr, gain_ssim -> gain/ssim
NOT_LOGGED = ("step",)  # the step is MLflow's x axis already
# Params that share a name with a loss term are the terms' weights.
PARAM_NAMES = {"tv": "weight/tv", "bn_prior": "weight/bn_prior"}
# Final metrics are logged to this many significant digits so that the runs table reads
# "7.32", not "7.3213491439819336"; metrics.json and scores.json keep full precision.
DIGITS = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A setting run's PNG files (what reports read back) go under this artifact folder: MLflow's own
# ``images/`` holds the images logged with ``log_image(key=..., step=...)``, and its UI drops every
# image of a run whose ``images/`` has a file not named the way ``log_image`` names them.
FIGURES_DIR = "figures"
# Keys of the images logged for MLflow's image grids, in the order its grid shows them (rows): the
# reconstruction right under its target, then the prior-only control and the attack's start.
IMAGE_KEYS = ("target", "reconstruction", "control", "start")
# Image steps are percent of the attack's budget, the same for every run whatever its iteration
# count, so that the grid's step slider lines up runs of different budgets: 0 is the start,
# IMAGE_FINAL the scored reconstruction; the steps between are the logged iterates nearest to
# each eighth of the budget.
IMAGE_FINAL = 100
IMAGE_FRACTIONS = 8
# MLflow limits: 8000 characters for a tag value, 6000 for a param value, 100 params per batch.
TAG_MAX, PARAM_MAX, PARAM_BATCH = 5000, 6000, 100
# The tag that says what a run is: setting, study, audit, audit_level, ... (resume looks settings up by it).
KIND_TAG = "gistress.kind"
NOTE_TAG = "mlflow.note.content"  # a run's description, rendered as Markdown on its page


def tag_value(value: Any) -> str:
    """A param or tag value as MLflow stores it: booleans lower-case, containers as JSON, capped."""
    if isinstance(value, bool):
        return str(value).lower()
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text[:TAG_MAX]


def one_line_error(exc: BaseException, limit: int = TAG_MAX) -> str:
    """An exception as one line: a GistressError's message and hint, else ``Type: message``."""
    if isinstance(exc, GistressError):
        text = exc.one_line()
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:limit]


def metric_name(key: str) -> str | None:
    """The MLflow name of an internal metric key (None: not logged); unknown keys pass as they are."""
    if key in NOT_LOGGED:
        return None
    if key in METRIC_NAMES:
        return METRIC_NAMES[key]
    for prefix, group in PREFIXES.items():
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return key


def internal_metrics(mlflow_metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics read back from MLflow under the suite's internal keys (runs logged before the
    renaming carry the internal keys already and pass unchanged)."""
    inverse = {v: k for k, v in METRIC_NAMES.items()}
    out = {}
    for name, value in mlflow_metrics.items():
        key = inverse.get(name)
        if key is None:
            group = next((p for p, g in PREFIXES.items() if name.startswith(g)), None)
            key = group + name[len(PREFIXES[group]):] if group else name
        out[key] = value
    return out


def mlflow_metrics(metrics: Mapping[str, Any], *, digits: int | None = None) -> dict[str, float]:
    """Numeric metrics under their MLflow names, optionally rounded to ``digits`` significant digits."""
    out = {}
    for key, value in numeric_metrics(metrics).items():
        name = metric_name(key)
        if name is not None:
            out[name] = _round(value, digits) if digits else value
    return out


def _round(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Keep numeric values (bools as 0/1); MLflow stores NaN/inf as such, so they stay."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        elif hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensor / numpy scalar
            out[key] = float(value.item())
    return out


def finite_or_none(value: Any) -> float | None:
    """A float for finite numbers, else None (for summaries)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
