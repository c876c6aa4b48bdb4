"""MLflow tracking: one run per setting, nested under a study's parent run.

Everything goes through an explicit ``MlflowClient`` and explicit run ids, never MLflow's
fluent "active run" state, so several worker processes can log to one tracking server at once
(each worker owns its own run ids). A run always ends in a terminal status: FINISHED on success,
FAILED on an error (tag ``error``, plus ``failed_step`` for a divergence), KILLED on Ctrl-C or
SIGTERM (the rule and the tags every run carries: ``suite.execution.lifecycle``; metric, param
and tag naming: ``suite.execution.mlflow_names``).

Tracking URI: ``--tracking-uri`` flag > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` in the
current working directory (MLflow's own local default).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from suite.errors import GistressError
from suite.execution.image_grids import ImageGrids
from suite.execution.lifecycle import end_run, run_tags, terminal_status
from suite.execution.mlflow_names import (
    DIGITS,
    FIGURES_DIR,
    IMAGE_SUFFIXES,
    KIND_TAG,
    NOTE_TAG,
    PARAM_BATCH,
    PARAM_MAX,
    PARAM_NAMES,
    mlflow_metrics,
    one_line_error,
    tag_value,
)

# ---------------------------------------------------------------------------------------------
# tracking URI
# ---------------------------------------------------------------------------------------------


def resolve_tracking_uri(flag: str | None = None) -> str:
    """The tracking URI to use: ``flag`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///mlflow.db`` (cwd).

    The local default is made absolute so that worker processes started elsewhere use the
    same store.
    """
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or ""
    uri = uri.strip()
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and not uri.startswith(("databricks", "file:")):
        # A bare path is a file store to MLflow; say so instead of guessing what was meant.
        raise GistressError(
            f"tracking URI '{uri}' has no scheme",
            "use sqlite:///path/to/mlflow.db, http://host:port or file:///path/to/mlruns",
        )
    return uri


def is_http(uri: str) -> bool:
    """True for tracking URIs served over HTTP(S) (a shared tracking server)."""
    return urlparse(uri).scheme in ("http", "https")


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast when an HTTP(S) tracking server does not answer; local stores always pass."""
    if not is_http(uri):
        return
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something answered: reachable (the health route may be absent or protected)
    except (OSError, ValueError) as exc:
        raise GistressError(
            f"tracking server {uri} is unreachable ({one_line_error(exc, 200)})",
            "start it or unset MLFLOW_TRACKING_URI",
        ) from None


def client_for(tracking_uri: str | None = None):
    """An ``MlflowClient`` bound to ``tracking_uri`` (resolved the suite's way when None)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri)


def _local_artifact_root(uri: str, experiment: str) -> str | None:
    """For a local sqlite store, keep artifacts beside the database, not in whatever cwd."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    db = uri[len("sqlite:///"):]
    if not db or db == ":memory:":
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment) or "default"
    return (Path(db).resolve().parent / "mlruns" / safe).as_uri()


def experiment_id(client, name: str, *, create: bool = True) -> str | None:
    """The id of experiment ``name``; created (race-safe across processes) when missing."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise GistressError(
                f"MLflow experiment '{name}' is deleted",
                f"restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
                "or rename the study",
            )
        return exp.experiment_id
    if not create:
        return None
    try:
        # experimentKind: MLflow 3's UI then opens the runs table (model training), not GenAI views
        return client.create_experiment(name, artifact_location=_local_artifact_root(client.tracking_uri, name),
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except MlflowException:
        # Another worker created it between our lookup and our create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# tags and params
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> the device the runner will pick (cuda when available, else cpu)."""
    if device != "auto":
        return device
    from suite.execution.runner import resolve_device as pick  # one definition of what ``auto`` means

    return str(pick("auto"))


def setting_tags(cfg, extra_tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags every setting run carries: ``lifecycle.run_tags`` (kind ``setting``) with the
    config's hash, variant and device and its threat-model flags (``upper_bound``,
    ``oracle_init``, ``assumption_level``), then ``extra_tags``, which override.

    ``assumption_level`` comes from ``RunConfig.assumption_level``; here, before the model is
    built, it assumes BN layers exist, and the runner's result tags refine it. A caller that
    knows the level already (an audit's plan) passes it in ``extra_tags``.
    """
    tags: dict[str, Any] = {
        "config_hash": cfg.config_hash(),
        "upper_bound": cfg.upper_bound,
        "oracle_init": cfg.attack.oracle_init,
        "variant": cfg.variant,
        "device": resolve_device(cfg.device),
    }
    extra = dict(extra_tags or {})
    if "assumption_level" not in extra:
        try:
            tags["assumption_level"] = cfg.assumption_level()
        except GistressError:
            pass  # a variant this process cannot resolve (a custom runner's): the result will say
    return run_tags("setting", None, {**tags, **extra})


def setting_params(cfg) -> dict[str, str]:
    """The run's params: ``cfg.flat_params()`` with the loss weights named ``weight/...``."""
    return {PARAM_NAMES.get(k, k): str(v)[:PARAM_MAX] for k, v in cfg.flat_params().items()}


# ---------------------------------------------------------------------------------------------
# one setting's run
# ---------------------------------------------------------------------------------------------


def create_setting_run(
    cfg,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    scheduled: bool = False,
    client=None,
) -> str:
    """Create the MLflow run for one setting (params and tags logged) and return its id.

    ``scheduled=True`` leaves it SCHEDULED (a queued job); ``setting_run(run_id=...)`` later
    attaches to it and marks it RUNNING. Used by studies so that the main process always knows
    every child's id and can mark it KILLED or FAILED if its worker dies.
    """
    from mlflow.entities import Param

    client = client or client_for(tracking_uri)
    exp_id = experiment_id(client, experiment)
    from suite.execution.mlflow_ui import describe_setting

    tags = setting_tags(cfg, extra_tags)
    tags.setdefault(NOTE_TAG, describe_setting(cfg))
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=tags, run_name=run_name)
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in setting_params(cfg).items()]
        for i in range(0, len(params), PARAM_BATCH):
            client.log_batch(run_id, params=params[i : i + PARAM_BATCH])
        if scheduled:
            client.update_run(run_id, status="SCHEDULED")
    except BaseException as exc:
        end_run(client, run_id, exc)
        raise
    return run_id


class SettingRun:
    """Handle yielded by ``setting_run``: log step metrics, iterates and the final result.

    Step metrics are buffered and written every few seconds (and on ``flush``), so logging a
    curve at 50+ points costs a handful of store writes, not one per logged step. Iterates
    (``log_images``) are kept in memory at a few steps (``image_steps``) and logged with the
    result, for the chosen restart only, as MLflow images (``log_image(key=..., step=...)``).
    """

    FLUSH_SECONDS = 5.0
    FLUSH_METRICS = 1000  # MLflow's batch limit

    def __init__(self, client, run_id: str, cfg):
        self.client = client
        self.run_id = run_id
        self.cfg = cfg
        self._step_warned = False
        self._last_step = 0
        self._pending: list = []
        self._flushed_at = time.monotonic()
        self._curves: set[str] = set()  # metric names that have a step curve in this run
        self._grids = ImageGrids(cfg)

    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue step metrics; a tracking hiccup warns once and never stops the attack."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in mlflow_metrics(metrics).items()]
        if not batch:
            return
        self._last_step = max(self._last_step, int(step))
        self._curves.update(m.key for m in batch)
        self._pending.extend(batch)
        if len(self._pending) >= self.FLUSH_METRICS or time.monotonic() - self._flushed_at >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write queued step metrics now (warns once on a tracking error, never raises)."""
        pending, self._pending = self._pending, []
        self._flushed_at = time.monotonic()
        try:
            for i in range(0, len(pending), self.FLUSH_METRICS):
                self.client.log_batch(self.run_id, metrics=pending[i : i + self.FLUSH_METRICS])
        except Exception as exc:  # step curves are nice to have; the final result is not optional
            if not self._step_warned:
                print(f"warning: step metrics not logged ({one_line_error(exc, 200)})", file=sys.stderr)
                self._step_warned = True

    def log_images(self, what: str, step: int, images) -> None:
        """Keep the iterate of the attack or its control (``what``) for MLflow's image grids
        (``suite.execution.image_grids.ImageGrids.keep``)."""
        self._grids.keep(what, step, images)

    @property
    def image_seconds(self) -> float:
        """Time spent keeping and logging images (the measured cost of the image grids)."""
        return self._grids.seconds

    def log_result(self, result) -> None:
        """Log final metrics, the result's tags and description, every artifact (PNGs under
        ``figures/``), the image grids' images (``log_images``; MLflow keeps them under
        ``images/``), the resolved config (``config.yaml``) and per-sample scores (``scores.json``)."""
        import yaml
        from mlflow.entities import Metric

        from suite.execution.mlflow_ui import describe_result

        self.flush()
        now = int(time.time() * 1000)
        # A final value that ends a step curve (score/psnr, loss/matching) goes at the last step:
        # MLflow shows a metric's value at its highest step. The others go at step 0, which makes
        # MLflow's chart view draw them as bars across runs instead of lone dots at the last step.
        cfg = result.config if result.config is not None else self.cfg
        final_step = max(int(cfg.attack.iterations), self._last_step)
        metrics = [Metric(k, v, now, final_step if k in self._curves else 0)
                   for k, v in mlflow_metrics(result.metrics, digits=DIGITS).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        for key, value in (result.tags or {}).items():
            self.client.set_tag(self.run_id, str(key), tag_value(value))
        self.client.set_tag(self.run_id, NOTE_TAG, describe_result(cfg, result.metrics, result.tags or {}))
        for path in (result.artifacts or {}).values():
            path = Path(path)
            if path.is_file():
                sub = FIGURES_DIR if path.suffix.lower() in IMAGE_SUFFIXES else None
                self.client.log_artifact(self.run_id, str(path), artifact_path=sub)
        if result.target is not None and result.reconstruction is not None:
            self._grids.log(self.client, self.run_id, result)
        self.client.log_text(
            self.run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml"
        )
        scores = {}
        for name in ("scores", "control_scores"):
            value = getattr(result, name, None)
            if value is not None and is_dataclass(value):
                scores[name] = asdict(value)
        if scores:
            self.client.log_dict(self.run_id, scores, "scores.json")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log one extra file."""
        self.client.log_artifact(self.run_id, str(path), artifact_path=artifact_path)


@contextlib.contextmanager
def setting_run(
    cfg,
    *,
    experiment: str,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
    extra_tags: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Iterator[SettingRun]:
    """Context manager for ONE setting's MLflow run (nested under ``parent_run_id`` if given).

    On enter the run is created (or, with ``run_id``, an existing SCHEDULED run is attached and
    marked RUNNING) with ``cfg.flat_params()`` and the setting's tags. On exit it is FINISHED;
    a ``GistressError`` / other exception makes it FAILED (tags ``error``, ``failed_step`` for a
    divergence); ``KeyboardInterrupt`` / ``SystemExit`` make it KILLED. The exception is
    re-raised. The run is never left RUNNING.
    """
    client = client_for(tracking_uri)
    if run_id is None:
        run_id = create_setting_run(
            cfg,
            experiment=experiment,
            run_name=run_name,
            parent_run_id=parent_run_id,
            extra_tags=extra_tags,
            client=client,
        )
    else:
        client.update_run(run_id, status="RUNNING")
    handle = SettingRun(client, run_id, cfg)
    with terminal_status(client, run_id):
        try:
            yield handle
        finally:
            handle.flush()  # an interrupted run keeps the curve up to where it stopped


# ---------------------------------------------------------------------------------------------
# lookups for resume
# ---------------------------------------------------------------------------------------------


def setting_runs(experiment: str, tracking_uri: str | None = None, statuses=None, *, client=None) -> list:
    """Active (not deleted) setting runs of ``experiment``, optionally only given statuses."""
    from mlflow.entities import ViewType

    client = client or client_for(tracking_uri)
    exp_id = experiment_id(client, experiment, create=False)
    if exp_id is None:
        return []
    flt = f"tags.`{KIND_TAG}` = 'setting'"
    wanted = set(statuses or ())
    if len(wanted) == 1:
        flt += f" and attributes.status = '{next(iter(wanted))}'"  # the store filters one status only
    runs, token = [], None
    while True:
        page = client.search_runs(
            [exp_id], filter_string=flt, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs.extend(r for r in page if not wanted or r.info.status in wanted)
        token = page.token
        if not token:
            return runs


def finished_runs(experiment: str, tracking_uri: str | None = None, *, client=None) -> dict[str, str]:
    """config_hash -> run_id of FINISHED setting runs (under any parent): what resume skips."""
    out = {}
    runs = setting_runs(experiment, tracking_uri, ["FINISHED"], client=client)
    # Oldest first, so that if a hash was ever finished twice the first run is the reference.
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        out.setdefault(run.data.tags.get("config_hash", ""), run.info.run_id)
    out.pop("", None)
    return out


def failed_runs(experiment: str, tracking_uri: str | None = None, *, client=None) -> dict[str, list[str]]:
    """config_hash -> run ids of FAILED or KILLED setting runs (what resume retries)."""
    out: dict[str, list[str]] = {}
    for run in setting_runs(experiment, tracking_uri, ["FAILED", "KILLED"], client=client):
        h = run.data.tags.get("config_hash")
        if h:
            out.setdefault(h, []).append(run.info.run_id)
    return out


def child_runs(client, experiment_id_: str, parent_run_id: str) -> list:
    """All runs nested under ``parent_run_id``."""
    flt = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id_], filter_string=flt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs

