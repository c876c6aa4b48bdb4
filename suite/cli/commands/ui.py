"""``gistress ui``: the MLflow UI for the tracking store the suite uses (bound to 127.0.0.1).

It prints the link that opens the newest study's runs table (its saved view, in MLflow's
model-training mode) and the link to the same view's charts (key charts, then every run's
reconstruction side by side) and serves until Ctrl-C or SIGTERM, then ends the server's whole process
tree: ``mlflow server`` starts uvicorn workers that would otherwise keep the port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

STOP_SECONDS = 10  # SIGTERM to the server's process group, then SIGKILL after this long
READY_SECONDS = 120


def add_parser(sub):
    """Register ``gistress ui`` and its flags."""
    p = sub.add_parser("ui", help="open the MLflow UI on the suite's tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--tracking-uri", help="store to serve (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--open", action="store_true", help="open the newest study's runs in a browser once serving")
    return p


def server_argv(uri: str, *, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The ``mlflow server`` command line serving ``uri`` (a local store) at host:port.

    A server also accepts runs from worker processes, so the same command backs
    ``--workers N`` / ``--executor slurm`` studies (``--tracking-uri http://host:port``).
    """
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1"]
    local_root = _artifact_root(uri)
    if local_root:
        # New experiments created through the server keep artifacts beside the database.
        argv += ["--artifacts-destination", local_root]
    if host not in ("127.0.0.1", "localhost"):
        argv += ["--allowed-hosts", "*"]
    return argv


def server_env() -> dict[str, str]:
    """The server's environment: MLflow's GenAI job runner (eight more processes) off unless set."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _artifact_root(uri: str) -> str | None:
    from pathlib import Path

    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlartifacts").as_uri()
    return None


def check_port(host: str, port: int) -> None:
    """Fail in one line when host:port cannot be bound (another UI or server holds it)."""
    from suite.errors import GistressError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            raise GistressError(f"port {port} on {host} is busy ({exc.strerror or exc})",
                                f"stop what serves it (another `gistress ui`?) or pick a free port: "
                                f"gistress ui --port {port + 1}") from None


def study_links(uri: str, base_url: str) -> list[tuple[str, str, str]]:
    """(study, link to its runs view, link to the view's charts) for every study in the store,
    newest first (best effort)."""
    from suite.execution.mlflow_ui import runs_link, study_views
    from suite.execution.tracking import client_for

    try:
        return [(name, runs_link(base_url, exp_id), runs_link(base_url, exp_id, charts=True))
                for name, exp_id in study_views(client_for(uri))]
    except Exception as exc:  # an unreadable store still gets its UI
        print(f"warning: could not list studies ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


def print_links(links: list[tuple[str, str, str]], base_url: str) -> str:
    """Print where to go; return the link to open (the newest study's, else the UI's root)."""
    if not links:
        print(f"no study views yet (run `gistress study ...`); experiments: {base_url}", flush=True)
        return base_url
    name, link, charts = links[0]
    print(f"runs of the newest study ({name}): {link}", flush=True)
    print(f"  its key charts and reconstructions side by side: {charts}", flush=True)
    for other, url, _ in links[1:10]:
        print(f"  study {other}: {url}", flush=True)
    if len(links) > 10:
        print(f"  ... and {len(links) - 10} more studies in the experiments list", flush=True)
    return link


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_group(proc: subprocess.Popen, timeout: float = STOP_SECONDS) -> None:
    """End the server's process group: SIGTERM, then SIGKILL for whatever outlives ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    return bool(live_members(pgid))


def live_members(pgid: int) -> list[int]:
    """Pids of the process group's members that are still running. Zombies do not count: they
    hold no port, and an init that does not reap (some containers) would keep them forever."""
    from pathlib import Path

    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel whether anything is in the group
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    live = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def _wait_ready(proc: subprocess.Popen, url: str) -> bool:
    """Poll the server's health route until it answers (True) or the server exits (False)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    return proc.poll() is None


def run(args) -> int:
    """Serve the UI until Ctrl-C / SIGTERM / SIGHUP, then end the server's process tree."""
    from pathlib import Path

    from suite.errors import GistressError
    from suite.execution.tracking import check_reachable, is_http, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if is_http(uri):
        print(f"the tracking store is already a server: open {uri}", flush=True)
        try:
            check_reachable(uri)
        except GistressError as exc:
            print(f"warning: {exc.one_line()}", file=sys.stderr)
            return 0
        link = print_links(study_links(uri, uri), uri)
        if getattr(args, "open", False):
            import webbrowser

            webbrowser.open(link)
        return 0
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            raise GistressError(f"no MLflow database at {db}",
                                "run a study first (gistress study runs/quickstart.yaml --profile smoke) "
                                "or pass --tracking-uri")
    check_port(args.host, args.port)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{shown}:{args.port}"
    print(f"MLflow UI for {uri}: {base}  (Ctrl-C to stop)", flush=True)
    link = print_links(study_links(uri, base), base)
    # Ctrl-C reaches only this process (the server has its own session); SIGTERM and a closed
    # terminal end it the same way, so the server never outlives the command.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    proc = None
    try:
        try:
            proc = subprocess.Popen(server_argv(uri, host=args.host, port=args.port), env=server_env(),
                                    start_new_session=True)
        except OSError as exc:
            raise GistressError(f"cannot start mlflow server ({exc})", "install mlflow in this environment") from None
        if _wait_ready(proc, base):
            print(f"serving at {base}", flush=True)
            if getattr(args, "open", False):
                import webbrowser

                webbrowser.open(link)
        code = proc.wait()
        check_port(args.host, args.port)  # it lost a race for the port: say so, as up front
        raise GistressError(f"mlflow server stopped on its own (exit status {code})", "see its messages above")
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None:
            # a second Ctrl-C must not cut the clean-up short and leave workers on the port
            held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                stop_group(proc)
            finally:
                for sig, handler in held.items():
                    signal.signal(sig, handler)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
