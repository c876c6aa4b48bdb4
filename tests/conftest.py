"""Shared fixtures. Every test runs with outbound network blocked (loopback allowed), in a temp
working directory so that no MLflow store or output lands in the repository."""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: the tests' tensors are tiny, and on a 2-core machine shared with worker
# subprocesses (mlflow server, submitit workers) two OpenMP threads per process oversubscribe the
# cores; measured 4-20x slower attack steps that way.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Outbound sockets fail except to loopback, so no code path silently reaches for a hub."""
    monkeypatch.setattr(socket.socket, "connect", _guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", _guarded_connect_ex)
    yield


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A temporary working directory (MLflow's default sqlite store lands here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
