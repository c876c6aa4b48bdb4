"""Flower's deployment runtime on this machine: a SuperLink and SuperNodes as local processes on
127.0.0.1 (insecure mode, loopback only), the app started with Flower's own ``flwr run``.

Everything lives under one temporary ``FLWR_HOME`` (the SuperLink connection ``gistress-local``
in its ``config.toml``, installed apps, logs), so the user's ``~/.flwr`` is never touched. Every
process is started in its own process group and killed with it on exit, whatever happens. Not
Flower's Ray-based simulation engine: Ray is never installed or imported.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from suite.errors import GistressError

CONNECTION = "gistress-local"
HOST = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise GistressError(f"'{name}' not found", "pip install 'gistress[flower]'")
    return found


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until 127.0.0.1:``port`` accepts connections (or ``proc`` died, or time ran out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise GistressError(f"a Flower process exited with {proc.returncode} before listening on {port}",
                                "see its log in the deployment's FLWR_HOME/logs")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise GistressError(f"nothing listens on {HOST}:{port} after {timeout:.0f} s", "see the logs")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # the next step of close() escalates (SIGKILL) or gives up on it


class LocalDeployment:
    """Context manager: SuperLink + ``supernodes`` SuperNodes on loopback; ``run`` calls ``flwr run``.

    ``node_configs``: one ``--node-config`` string per SuperNode (default
    ``partition-id=<i> num-partitions=<n>``); ``env``: extra environment for every process (the
    ClientApps and the ServerApp inherit it from their SuperNode / SuperLink)."""

    def __init__(self, supernodes: int = 2, *, node_configs: list[str] | None = None,
                 env: dict[str, str] | None = None, home: str | Path | None = None):
        self.supernodes = supernodes
        self.node_configs = node_configs or [f"partition-id={i} num-partitions={supernodes}"
                                             for i in range(supernodes)]
        self._tmp = None if home else tempfile.mkdtemp(prefix="gistress-flwr-")
        self.home = Path(home or self._tmp)
        self.logs = self.home / "logs"
        self.port = free_port()
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_file = log
        self.procs.append(proc)
        return proc

    def __enter__(self) -> LocalDeployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\ninsecure = true\n')
        try:
            link = self._spawn("superlink", [_bin("flower-superlink"), "--insecure", "--host", HOST,
                                             "--port", str(self.port)])
            wait_for_port(self.port, 60, link)
            for i, node_config in enumerate(self.node_configs):
                port = free_port()
                node = self._spawn(f"supernode-{i}", [
                    _bin("flower-supernode"), "--insecure", "--superlink", f"{HOST}:{self.port}",
                    "--host", HOST, "--port", str(port), "--node-config", node_config])
                wait_for_port(port, 60, node)
        except BaseException:
            print(self.log_tail(), file=sys.stderr)
            self.close()
            raise
        return self

    def run(self, app_dir: str | Path, run_config: list[str] | None = None, timeout: float = 900) -> int:
        """``flwr run <app_dir> gistress-local --stream`` (with ``--run-config`` overrides), its
        output passed through; returns its exit code."""
        args = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        for override in run_config or []:
            args += ["--run-config", override]
        return subprocess.run(args, env=self.env, timeout=timeout, stdin=subprocess.DEVNULL).returncode

    def close(self) -> None:
        """Stop every process this deployment started and their descendants (Flower detaches its
        SuperExec, ServerApp and ClientApp processes into sessions of their own), then its home."""
        pids = [p.pid for p in self.procs if p.poll() is None]
        pids += [d for pid in pids for d in descendants(pid)]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        for proc in self.procs:
            _wait(proc, 10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for proc in self.procs:
            _wait(proc, 5)
            proc.log_file.close()
        self.procs.clear()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of every process's log (for an error report)."""
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)
