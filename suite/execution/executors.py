"""Where a study's settings run: in-process, in local worker processes, or as Slurm jobs.

- ``local`` with 1 worker: in this process, one setting after another.
- ``local`` with N > 1 workers: submitit's LocalExecutor (one subprocess per setting, at most
  N at a time).
- ``slurm``: submitit's AutoExecutor as a job array (partition, GPUs, time limit and array
  parallelism from the spec's ``executor`` block or the command-line flags).

Every job runs one setting inside ``tracking.setting_run`` and logs to the ONE tracking store
the study uses; for subprocesses the main process creates each child run first (SCHEDULED) and
passes its id, so it can mark the child KILLED/FAILED if the worker dies without a word.
"""

from __future__ import annotations

import importlib
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import GistressError

EXECUTORS = ("local", "slurm")
# Local worker jobs have no natural time limit; submitit's local default (2 min) would kill them.
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
_SLURM_KEYS = {
    "slurm_partition", "slurm_account", "slurm_qos", "slurm_constraint", "gpus_per_node",
    "cpus_per_task", "mem_gb", "timeout_min", "slurm_array_parallelism",
}


@dataclass
class SettingJob:
    """Everything a worker needs to run one setting (picklable, no live objects)."""

    index: int
    name: str
    config: dict                      # RunConfig.model_dump(mode="json")
    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    out_dir: str
    runner: str = "suite.execution.runner:run_setting"   # "module:function" with run_setting's signature
    extra_tags: dict = field(default_factory=dict)
    run_id: str | None = None         # pre-created child run (subprocess workers)
    progress: bool = False
    in_worker: bool = False           # True in a subprocess: install our own SIGTERM handler


@dataclass
class Plan:
    """The resolved executor choice."""

    kind: str                         # local | slurm
    workers: int = 1
    cluster: str | None = None        # submitit cluster: None (in-process), "local", "slurm"
    parameters: dict = field(default_factory=dict)
    folder: str | None = None         # submitit log folder (set by the study)

    def describe(self) -> str:
        """A few words for the study's first line."""
        if self.cluster is None:
            return "in-process"
        if self.cluster == "local":
            return f"{self.workers} local worker processes"
        par = self.parameters.get("slurm_array_parallelism")
        return "slurm job array" + (f", {par} at a time" if par else "")


def plan(kind: str, *, workers: int = 1, spec_block=None, options: dict | None = None) -> Plan:
    """Resolve ``--executor``/``--workers`` and the slurm settings (flags win over the spec)."""
    if kind not in EXECUTORS:
        from suite.errors import close_matches

        near = close_matches(kind, EXECUTORS)
        raise GistressError(f"unknown executor '{kind}'" + (f" (did you mean {near}?)" if near else ""),
                            "use --executor local or --executor slurm")
    if not isinstance(workers, int) or workers < 1:
        raise GistressError(f"--workers {workers} must be a positive integer", "use --workers 1 or more")
    params = {}
    if spec_block is not None:
        params.update({k: v for k, v in spec_block.model_dump().items() if v is not None})
    for key, value in (options or {}).items():
        if key not in _SLURM_KEYS:
            raise GistressError(f"unknown executor option '{key}'", f"options: {', '.join(sorted(_SLURM_KEYS))}")
        if value is not None:
            params[key] = value
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise GistressError("--executor slurm: no sbatch on PATH (not a Slurm login node?)",
                                "run on the cluster's login node, or use --executor local")
        return Plan(kind="slurm", workers=workers, cluster="slurm", parameters=slurm_parameters(params))
    if workers == 1:
        return Plan(kind="local", workers=1, cluster=None)
    local = {"timeout_min": params.get("timeout_min", LOCAL_TIMEOUT_MIN)}
    if "gpus_per_node" in params:
        local["gpus_per_node"] = params["gpus_per_node"]
    return Plan(kind="local", workers=workers, cluster="local", parameters=local)


def slurm_parameters(params: dict) -> dict:
    """submitit AutoExecutor parameters for a study's Slurm jobs (one task, one node each)."""
    out = {"nodes": 1, "tasks_per_node": 1, "timeout_min": 24 * 60}
    out.update(params)
    return out


def check_tracking(plan_: Plan, uri: str) -> None:
    """Several processes need one tracking server: error for Slurm, warn for local sqlite."""
    from suite.execution.tracking import is_http

    if is_http(uri):
        return
    hint = ("start a server (`gistress ui --host 0.0.0.0` on a host the jobs can reach, or "
            "`mlflow server`) and pass --tracking-uri http://<host>:5000")
    if plan_.cluster == "slurm":
        raise GistressError(f"--executor slurm needs an http tracking server; {uri} is a local store", hint)
    if plan_.cluster == "local":
        print(f"warning: {plan_.workers} worker processes writing to {uri}: sqlite can report "
              f"'database is locked' under concurrent writers; for reliable scale-out, {hint}",
              file=sys.stderr)


def image_hook(run_fn, tr) -> dict[str, Any]:
    """``{"on_images": tr.log_images}`` when the runner takes that keyword (``run_setting`` does;
    a custom runner with only ``on_step`` still runs, without image grids), else ``{}``."""
    import inspect

    try:
        params = inspect.signature(run_fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.name == "on_images" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return {"on_images": tr.log_images}
    return {}


def _load_runner(spec: str):
    if ":" not in spec:
        raise GistressError(f"runner '{spec}' is not module:function", "e.g. suite.execution.runner:run_setting")
    module, func = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise GistressError(f"runner '{spec}' cannot be imported ({exc})",
                            "check the module is on PYTHONPATH in every worker") from None


def _worker_sigterm() -> None:
    """In a worker process SIGTERM (scancel, Slurm time limit, local cancel) ends the run KILLED.

    submitit installs a handler that ignores SIGTERM (it waits for its own USR2 signal); a
    setting has nothing to checkpoint, so we take SIGTERM back for the worker's lifetime.
    """
    from suite.execution.lifecycle import install_sigterm

    install_sigterm()


def execute_setting(job: SettingJob) -> dict:
    """Run one setting inside its MLflow run; return its summary row.

    Errors (GistressError, DivergenceError, anything else) end the run FAILED and come back as
    ``status: FAILED`` so the study goes on; Ctrl-C / SIGTERM end it KILLED and propagate.
    """
    import suite  # noqa: F401  (offline defaults in a fresh worker)
    from suite.config import RunConfig
    from suite.execution.mlflow_names import numeric_metrics, one_line_error
    from suite.execution.tracking import setting_run

    if job.in_worker:
        from suite.execution.threads import apply_threads

        _worker_sigterm()
        apply_threads()  # the parent's --threads choice, passed on as GISTRESS_THREADS
    t0 = time.time()
    row: dict[str, Any] = {"index": job.index, "name": job.name, "run_id": job.run_id, "status": "FAILED",
                           "metrics": {}, "artifacts": {}, "error": None}
    try:
        cfg = RunConfig(**job.config)
        run_fn = _load_runner(job.runner)
        with setting_run(cfg, experiment=job.experiment, run_name=job.name, parent_run_id=job.parent_run_id,
                         tracking_uri=job.tracking_uri, extra_tags=job.extra_tags, run_id=job.run_id) as tr:
            row["run_id"] = tr.run_id
            result = run_fn(cfg, out_dir=Path(job.out_dir), progress=job.progress, on_step=tr.log_step,
                            **image_hook(run_fn, tr))
            tr.log_result(result)
        row["status"] = "FINISHED"
        row["metrics"] = numeric_metrics(result.metrics)
        row["leak_rule"] = result.tags.get("leak_rule")
        row["artifacts"] = {str(k): str(v) for k, v in (result.artifacts or {}).items()}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        row["error"] = one_line_error(exc, 500)
    row["seconds"] = time.time() - t0
    return row


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def run_jobs(jobs: Sequence[SettingJob], plan_: Plan, *, client, folder: str | Path | None = None) -> Iterator[dict]:
    """Run the jobs with the plan's executor; yield each job's row as it completes."""
    if not jobs:
        return
    if plan_.cluster is None:
        for job in jobs:
            job.progress = sys.stderr.isatty()
            yield execute_setting(job)
        return
    yield from _run_submitit(jobs, plan_, client=client, folder=folder)


def _precreate(job: SettingJob, client) -> None:
    from suite.config import RunConfig
    from suite.execution.tracking import create_setting_run

    job.in_worker = True
    job.run_id = create_setting_run(
        RunConfig(**job.config), experiment=job.experiment, run_name=job.name,
        parent_run_id=job.parent_run_id, extra_tags=job.extra_tags, scheduled=True, client=client,
    )


def _run_submitit(jobs: Sequence[SettingJob], plan_: Plan, *, client, folder) -> Iterator[dict]:
    import submitit

    folder = Path(folder or plan_.folder or "gistress-out/submitit")
    folder.mkdir(parents=True, exist_ok=True)
    if plan_.cluster == "local":
        executor = submitit.AutoExecutor(folder=str(folder), cluster="local")
        in_flight_max = plan_.workers
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster=plan_.cluster)
        in_flight_max = len(jobs)  # the array's parallelism is Slurm's business
    executor.update_parameters(**plan_.parameters)
    queue = list(jobs)
    running: dict = {}
    try:
        if plan_.cluster != "local":
            for job in queue:
                _precreate(job, client)
            with executor.batch():
                handles = [executor.submit(execute_setting, job) for job in queue]
            running = dict(zip(handles, queue))
            queue = []
        while queue or running:
            while queue and len(running) < in_flight_max:
                job = queue.pop(0)
                _precreate(job, client)
                running[executor.submit(execute_setting, job)] = job
            done = [h for h in running if h.done()]
            for handle in done:
                yield _collect(handle, running.pop(handle), client)
            if not done:
                time.sleep(0.25)
    finally:
        if running:
            _cancel(running)


def _collect(handle, job: SettingJob, client) -> dict:
    """A finished submitit job's row; a job that died reports what MLflow knows about it."""
    from suite.execution.lifecycle import close_run

    try:
        return handle.result()
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        status, error = "FAILED", f"worker died: {type(exc).__name__}" + (f": {lines[-1]}" if lines else "")
        try:
            info = client.get_run(job.run_id)
            if info.info.status in ("KILLED", "FAILED"):
                status = info.info.status
                error = info.data.tags.get("error", error)
            elif info.info.status in ("RUNNING", "SCHEDULED"):
                close_run(client, job.run_id, "FAILED", error)
        except Exception:
            pass
        return {"index": job.index, "name": job.name, "run_id": job.run_id, "status": status, "metrics": {},
                "artifacts": {}, "error": error, "seconds": 0.0}


def _cancel(running: dict, wait_s: float = 10.0) -> None:
    """Cancel in-flight jobs and give them a moment to mark their runs KILLED."""
    for handle in running:
        try:
            handle.cancel(check=False)
        except Exception:
            pass
    deadline = time.time() + wait_s
    while time.time() < deadline and not all(_safe_done(h) for h in running):
        time.sleep(0.2)


def _safe_done(handle) -> bool:
    try:
        return handle.done()
    except Exception:
        return True


def sweep(client, experiment_id: str, parent_run_id: str, *, interrupted: bool) -> int:
    """End children of ``parent_run_id`` still SCHEDULED/RUNNING (their worker is gone).

    Interrupted -> KILLED; otherwise -> FAILED ("worker exited without reporting"). Returns how
    many were ended.
    """
    from suite.execution.lifecycle import close_run
    from suite.execution.tracking import child_runs

    n = 0
    try:
        children = child_runs(client, experiment_id, parent_run_id)
    except Exception as exc:
        print(f"warning: could not list child runs to close them ({exc})", file=sys.stderr)
        return 0
    for run in children:
        if run.info.status not in ("SCHEDULED", "RUNNING"):
            continue
        try:
            if interrupted:
                close_run(client, run.info.run_id, "KILLED", "study interrupted before this setting finished")
            else:
                close_run(client, run.info.run_id, "FAILED", "worker exited without reporting a result")
            n += 1
        except Exception as exc:
            print(f"warning: could not close run {run.info.run_id} ({exc})", file=sys.stderr)
    return n
