"""``gistress ui``: the MLflow UI for the tracking store the suite uses (bound to 127.0.0.1)."""

from __future__ import annotations

import subprocess
import sys


def add_parser(sub):
    """Register ``gistress ui`` and its flags."""
    p = sub.add_parser("ui", help="open the MLflow UI on the suite's tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    p.add_argument("--tracking-uri", help="store to serve (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
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


def _artifact_root(uri: str) -> str | None:
    from pathlib import Path

    if uri.startswith("sqlite:///"):
        db = uri[len("sqlite:///"):]
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlartifacts").as_uri()
    return None


def run(args) -> int:
    """Serve the UI until Ctrl-C."""
    from suite.errors import GistressError
    from suite.tracking import is_http, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if is_http(uri):
        print(f"the tracking store is already a server: open {uri} in a browser")
        return 0
    if uri.startswith("sqlite:///"):
        from pathlib import Path

        db = Path(uri[len("sqlite:///"):])
        if not db.exists():
            raise GistressError(f"no MLflow database at {db}",
                                "run a study first (gistress study runs/quickstart.yaml --profile smoke) "
                                "or pass --tracking-uri")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"MLflow UI for {uri}: http://{shown}:{args.port}  (Ctrl-C to stop)", flush=True)
    try:
        proc = subprocess.run(server_argv(uri, host=args.host, port=args.port))
    except KeyboardInterrupt:
        return 0
    except FileNotFoundError as exc:
        raise GistressError(f"cannot start mlflow server ({exc})", "install mlflow in this environment") from None
    return proc.returncode
