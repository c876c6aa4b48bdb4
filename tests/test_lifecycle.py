"""One run lifecycle for `gistress study`, `audit` and `attack` (suite.execution.lifecycle): SIGTERM
ends every command's runs KILLED with exit 130, the same tags mark every command's top run, and
one rule decides exit codes and terminal statuses."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import suite
from suite.cli.main import main
from suite.errors import DivergenceError, GistressError
from suite.execution import lifecycle

STUDY = """name: life_study
base: {variant: lenet, size: 32, device: cpu, attack: {preset: dlg, iterations: 2}}
images: [astronaut]
"""


# the tests run from a checkout (bench is not installed): its commit, asked of git directly
HEAD = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                      text=True).stdout.strip()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating a store costs seconds); each command has its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('lifecycle') / 'mlflow.db'}"


def terminated_attack(cfg, *, out_dir, progress=True, on_step=None, prepared=None, keep_checkpoints=False):
    """A run_setting stand-in that is sent SIGTERM (scancel, a time limit) while it works."""
    if on_step is not None:
        on_step(0, {"matching_loss": 1.0})
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(500):  # the handler raises in this (the main) thread at the next check
        time.sleep(0.01)
    raise AssertionError("SIGTERM did not end the run")


def argv_for(command: str, workdir) -> tuple[list[str], str]:
    """The command line and the MLflow experiment it logs to."""
    if command == "attack":
        return ["attack", "--variant", "lenet", "--size", "32", "--iterations", "2", "--device", "cpu", "--quiet",
                "--out", "out", "--experiment", "life-attack"], "life-attack"
    if command == "study":
        (workdir / "spec.yaml").write_text(STUDY)
        return ["study", "spec.yaml", "--out", "out"], "life_study"
    return ["audit", "--variant", "lenet", "--image", "astronaut", "--iterations", "1", "--device", "cpu",
            "--no-positive-control", "--quiet", "--out", "out", "--experiment", "life-audit"], "life-audit"


@pytest.mark.parametrize("command", ["attack", "study", "audit"])
def test_sigterm_ends_every_command_killed_with_exit_130(command, workdir, store, monkeypatch, capsys):
    from suite.execution import runner

    monkeypatch.setattr(runner, "run_setting", terminated_attack)
    argv, experiment = argv_for(command, workdir)
    caught: list[int] = []

    def outside(signum, frame):  # without the shared handler the signal would land here
        caught.append(signum)

    original = signal.signal(signal.SIGTERM, outside)
    try:
        rc = main([*argv, "--tracking-uri", store])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)
    assert rc == lifecycle.EXIT_INTERRUPTED == 130, capsys.readouterr()
    assert not caught and restored is outside  # handled by the command, the earlier handler put back

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (top,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r is not top]
    assert len(children) == (0 if command == "attack" else 1)  # study: its setting; audit: level 1
    # the run that was working and the parent above it: KILLED, saying why
    for run in runs:
        assert run.info.status == "KILLED" and run.data.tags["error"] == "terminated (SIGTERM)"
    # the one tag builder: kind, version, the command that made it
    tags = top.data.tags
    assert tags["gistress.kind"] == {"attack": "setting", "study": "study", "audit": "audit"}[command]
    assert tags["gistress_version"] == suite.__version__
    assert tags["mlflow.source.name"] == ("gistress" if command == "attack" else f"gistress {command}")
    assert tags.get("git_commit") == HEAD  # the checkout's commit, read here by git itself


def test_one_rule_for_exit_codes_and_terminal_statuses():
    assert lifecycle.exit_code(["FINISHED", "SKIPPED"]) == 0
    assert lifecycle.exit_code(["FINISHED", "FAILED"]) == 1
    assert lifecycle.exit_code(["FINISHED", "PENDING"]) == 1  # a part that never ran did not finish
    assert lifecycle.exit_code(["FINISHED"], interrupted=True) == 130
    assert lifecycle.ending(lifecycle.Terminated("SIGTERM")) == ("KILLED", "terminated (SIGTERM)")
    assert lifecycle.ending(KeyboardInterrupt()) == ("KILLED", "interrupted (Ctrl-C)")
    assert lifecycle.ending(SystemExit(3)) == ("KILLED", "exited")
    assert lifecycle.ending(GistressError("bad input", "fix it")) == ("FAILED", "bad input (fix: fix it)")
    assert lifecycle.ending(DivergenceError("loss diverged", step=3))[0] == "FAILED"
    assert lifecycle.ending(RuntimeError("out of memory")) == ("FAILED", "RuntimeError: out of memory")


def test_the_printed_end_ends_with_the_json_line(capsys):
    lifecycle.print_end(None, table="a  b", verdict=["it leaked.", ""], files=[("report", "/x/report.md")],
                        mlflow=lifecycle.page_hint("mlflow run: r1; its page", "http://host:5000",
                                                   lambda base: f"{base}/#/r1"),
                        summary={"psnr": float("nan")})
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["", "a  b", "", "it leaked.", "report: /x/report.md", "mlflow run: r1; its page: http://host:5000/#/r1",
                     '{"psnr": null}']
