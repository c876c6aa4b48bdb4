"""The lifecycle of the runs a command starts: the same for ``gistress study``, ``audit`` and ``attack``.

- **Tags**: every run the suite creates carries ``run_tags``: its kind (``gistress.kind``), the
  suite's version, the command that made it (``mlflow.source.name``) and the git commit.
- **Signals**: while a command works, SIGTERM (scancel, a time limit, ``kill``) raises
  ``Terminated``, a KeyboardInterrupt, so runs end exactly as on Ctrl-C (``interruptible``).
- **Terminal status**: a run never stays RUNNING. How its block ends decides (``terminal_status``):
  FINISHED; FAILED with the error as the ``error`` tag (plus ``failed_step`` for a divergence and
  ``error.txt`` with the traceback for an unexpected error); KILLED on Ctrl-C, SIGTERM or exit.
- **A parent run** (a study's, an audit's) is created by ``create_parent_run`` and run by
  ``parent_run``: its children are closed and its summary written however it ends (SIGTERM is
  ignored meanwhile), then it gets its terminal status.
- **Exit codes**: 0 when everything finished, 1 when something failed, 130 when interrupted
  (``exit_code``); a usage or input error is 2 (the CLI's one-line errors).
- **The end**: ``print_end`` prints a command's last lines the same way every time: the table,
  the verdict in words, where the files are, how to open the runs in MLflow (``page_hint``) and
  the ``--json`` summary as the very last line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import suite
from suite.errors import DivergenceError, GistressError
from suite.execution.mlflow_names import KIND_TAG, NOTE_TAG, PARAM_BATCH, PARAM_MAX, one_line_error, tag_value

TERMINAL = ("FINISHED", "FAILED", "KILLED")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
OK_STATUSES = ("FINISHED", "SKIPPED")  # a part that was skipped on purpose did not fail
LOCAL_UI = "http://127.0.0.1:5000"  # where `gistress ui` serves a local store


class Terminated(KeyboardInterrupt):
    """Raised in place of SIGTERM so that runs end KILLED exactly as on Ctrl-C."""


# ---------------------------------------------------------------------------------------------
# tags
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The suite's git commit, or None (never raises, never waits long)."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(suite.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=2,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def run_tags(kind: str, command: str | None = None, tags: Mapping[str, Any] | None = None, *,
             description: str | None = None) -> dict[str, str]:
    """The tags of a run the suite creates: ``gistress.kind`` = ``kind``, ``gistress_version``,
    ``mlflow.source.name`` (``gistress`` or ``gistress <command>``) and the git commit, then
    ``tags`` (values as ``tag_value`` writes them; they may override the kind) and
    ``description`` as the run's note. The one builder for settings and parents alike."""
    out = {KIND_TAG: kind, "gistress_version": suite.__version__,
           "mlflow.source.name": f"gistress {command}" if command else "gistress"}
    sha = git_commit()
    if sha:
        out["git_commit"] = out["mlflow.source.git.commit"] = sha
    for key, value in (tags or {}).items():
        out[str(key)] = tag_value(value)
    if description:
        out[NOTE_TAG] = tag_value(description)
    return out


# ---------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------


def install_sigterm() -> Callable[[], None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread; returns the undo.

    Outside the main thread (where Python cannot handle signals) nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def ignore_sigterm() -> None:
    """Ignore SIGTERM from now on (in the main thread): closing runs and writing summaries takes
    seconds, let it finish. ``install_sigterm``'s undo puts the earlier handler back."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A block in which SIGTERM ends the work as Ctrl-C does; the earlier handler is back after it."""
    restore = install_sigterm()
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------------------------------
# terminal status
# ---------------------------------------------------------------------------------------------


def ending(exc: BaseException) -> tuple[str, str]:
    """(terminal status, reason) for a block ended by ``exc``: KILLED for Ctrl-C, SIGTERM or exit,
    else FAILED with the error as one line."""
    if isinstance(exc, Terminated):
        return "KILLED", "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "KILLED", "interrupted (Ctrl-C)"
    if isinstance(exc, SystemExit):
        return "KILLED", "exited"
    return "FAILED", one_line_error(exc)


def end_run(client, run_id: str, exc: BaseException) -> None:
    """Mark a run FAILED/KILLED for ``exc`` (see ``ending``); tracking errors here warn, never mask ``exc``."""
    status, reason = ending(exc)
    try:
        client.set_tag(run_id, "error", reason)
        if status == "FAILED":
            if isinstance(exc, DivergenceError):
                client.set_tag(run_id, "failed_step", str(exc.step))
            if not isinstance(exc, GistressError):
                # An unexpected error: keep the traceback beside the run for whoever debugs it.
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                client.log_text(run_id, tb, "error.txt")
        client.set_terminated(run_id, status)
    except Exception as track_exc:
        print(f"warning: could not mark MLflow run {run_id} {status} ({one_line_error(track_exc, 200)})",
              file=sys.stderr)


def close_run(client, run_id: str, status: str, reason: str) -> None:
    """End a run whose own process cannot (its worker died or was cancelled): ``status`` with
    ``reason`` as its ``error`` tag. Raises tracking errors (the caller decides how loud)."""
    client.set_tag(run_id, "error", tag_value(reason))
    client.set_terminated(run_id, status)


@contextlib.contextmanager
def terminal_status(client, run_id: str) -> Iterator[None]:
    """Give ``run_id`` its terminal status from how the block ends, then re-raise."""
    try:
        yield
    except BaseException as exc:
        end_run(client, run_id, exc)
        raise
    else:
        client.set_terminated(run_id, "FINISHED")


# ---------------------------------------------------------------------------------------------
# parent runs
# ---------------------------------------------------------------------------------------------


def create_parent_run(client, experiment_id: str, *, kind: str, command: str, run_name: str,
                      tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
                      description: str | None = None) -> str:
    """Create a command's parent run (tags from ``run_tags``, ``params`` logged) and return its id.

    A failure while logging ends the run (FAILED or KILLED) before it is re-raised.
    """
    from mlflow.entities import Param

    run = client.create_run(experiment_id, tags=run_tags(kind, command, tags, description=description),
                            run_name=run_name)
    run_id = run.info.run_id
    try:
        batch = [Param(str(k), str(v)[:PARAM_MAX]) for k, v in (params or {}).items()]
        for i in range(0, len(batch), PARAM_BATCH):
            client.log_batch(run_id, params=batch[i : i + PARAM_BATCH])
    except BaseException as exc:
        end_run(client, run_id, exc)
        raise
    return run_id


@contextlib.contextmanager
def parent_run(client, run_id: str, *, on_end: Callable[[bool], None]) -> Iterator[None]:
    """The body of a parent run. SIGTERM ends it as Ctrl-C does; however it ends,
    ``on_end(interrupted)`` runs with SIGTERM ignored (close the children, write the summary),
    then the parent gets its terminal status and any exception is re-raised.
    ``on_end`` should catch its own errors: one that escapes ends the parent FAILED."""
    with interruptible(), terminal_status(client, run_id):
        interrupted = False
        try:
            yield
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            ignore_sigterm()
            on_end(interrupted)


def exit_code(statuses: Iterable[str], *, interrupted: bool = False) -> int:
    """130 when interrupted, 1 when any part ended other than FINISHED (or SKIPPED), else 0."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if any(s not in OK_STATUSES for s in statuses) else EXIT_OK


# ---------------------------------------------------------------------------------------------
# the end of a command
# ---------------------------------------------------------------------------------------------


def ui_command(uri: str) -> str:
    """The ``gistress ui`` invocation that serves the store at ``uri``."""
    from suite.execution.tracking import resolve_tracking_uri

    return "gistress ui" if uri == resolve_tracking_uri(None) else f"gistress ui --tracking-uri {uri}"


def page_hint(label: str, uri: str, page: Callable[[str], str]) -> str:
    """``label`` and the browser link to an MLflow page; ``page(base_url)`` makes the link.

    An HTTP tracking server serves the page itself; a local store needs ``gistress ui`` first,
    and the hint names the exact command.
    """
    from suite.execution.tracking import is_http

    if is_http(uri):
        return f"{label}: {page(uri)}"
    return f"{label} once `{ui_command(uri)}` serves the store: {page(LOCAL_UI)}"


def print_end(out, *, table: str, verdict: Sequence[str] = (), files: Sequence[tuple[str, Any]] = (),
              mlflow: str | None = None, summary: Mapping[str, Any] | None = None) -> None:
    """A command's last lines, after a blank line: the table, the verdict in words, ``label: path``
    per file, the MLflow hint, and ``summary`` as one JSON line (``--json``), always the last line."""
    from suite.results import jsonable

    out = out or sys.stdout
    print("", file=out)
    print(table, file=out)
    lines = [line for line in verdict if line]
    if lines:
        print("", file=out)
        for line in lines:
            print(line, file=out)
    for label, path in files:
        print(f"{label}: {path}", file=out)
    if mlflow:
        print(mlflow, file=out)
    if summary is not None:
        print(json.dumps(jsonable(summary)), file=out)
