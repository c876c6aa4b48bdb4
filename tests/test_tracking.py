"""MLflow tracking of one setting (suite.execution.tracking), asserted through MlflowClient."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_study import fake_result  # the fake RunResult builder shared with the study tests

import suite
from suite.config import AttackSpec, RunConfig
from suite.errors import DivergenceError, GistressError
from suite.execution.lifecycle import Terminated
from suite.execution.tracking import (
    check_reachable,
    create_setting_run,
    failed_runs,
    finished_runs,
    resolve_tracking_uri,
    setting_run,
)
from suite.threat.threat_model import ThreatModel


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating a store costs seconds); tests use own experiments."""
    root = tmp_path_factory.mktemp("tracking")
    return f"sqlite:///{root / 'mlflow.db'}"


def client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def cfg(**kw) -> RunConfig:
    base = dict(variant="lenet", images=["astronaut"], size=32, attack=AttackSpec(preset="dlg", iterations=5))
    base.update(kw)
    return RunConfig(**base)


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    with pytest.raises(GistressError, match="no scheme"):
        resolve_tracking_uri("mlflow.db")


def test_unreachable_server_fails_fast():
    import socket

    with socket.socket() as s:  # a port that is certainly closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    with pytest.raises(GistressError) as e:
        check_reachable(f"http://127.0.0.1:{port}")
    assert time.time() - t0 < 5
    assert f"tracking server http://127.0.0.1:{port} is unreachable" in e.value.message
    assert e.value.hint == "start it or unset MLFLOW_TRACKING_URI"
    check_reachable("sqlite:///anything.db")  # local stores need no probe


def test_successful_run_is_finished_with_params_tags_metrics_artifacts(store, tmp_path):
    c0 = cfg(threat=ThreatModel(bn_stats="exact"), attack=AttackSpec(preset="gia_bn", iterations=5))
    with setting_run(c0, experiment="t_ok", run_name="lenet ok", tracking_uri=store,
                     extra_tags={"study": "unit"}) as tr:
        assert client(store).get_run(tr.run_id).info.status == "RUNNING"
        for step in (0, 2, 4):
            tr.log_step(step, {"matching_loss": 1.0 / (step + 1), "psnr": 5.0 + step, "note": "skipped"})
        tr.log_result(fake_result(c0, tmp_path / "out"))
    run = client(store).get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "lenet ok"
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert p["variant"] == "lenet" and p["iterations"] == "5" and p["bn_stats"] == "exact"
    # the loss weights are params named weight/...; the loss values are metrics named loss/...
    assert p["preset"] == "gia_bn" and p["weight/tv"] == "0.052" and p["weight/bn_prior"] == "0.00016"
    assert "tv" not in p and "bn_prior" not in p
    assert t["config_hash"] == c0.config_hash()
    assert t["assumption_level"] == "4" and t["upper_bound"] == "true" and t["oracle_init"] == "false"
    assert t["gistress_version"] == suite.__version__ and t["device"] == "cpu" and t["study"] == "unit"
    assert t["task"] == "classification"  # from the result's tags
    # grouped names: scores, control, gain, losses; nothing under the old flat names
    assert {"score/psnr", "score/ssim", "score/brr", "control/psnr", "gain/psnr", "loss/matching"} <= set(m)
    assert not {"psnr", "gain_psnr", "matching_loss", "step", "score/lpips"} & set(m)
    hist = sorted(client(store).get_metric_history(tr.run_id, "loss/matching"), key=lambda h: h.step)
    assert [h.step for h in hist] == [0, 2, 4, 5]  # the final value sits at the last iteration
    # final values to 4 significant digits (the table shows 14.0, not 14.000000001)
    psnr = fake_result(c0, tmp_path / "o2").metrics["psnr"]
    assert m["loss/matching"] == 0.25 and m["score/psnr"] == float(f"{psnr:.4g}")
    assert m["control/ssim"] == 0.3 and m["gain/psnr"] == float(f"{psnr - 9.0:.4g}")
    assert t["mlflow.note.content"].startswith("**lenet**") and "PSNR" in t["mlflow.note.content"]
    arts = {a.path for a in client(store).list_artifacts(tr.run_id)}
    assert {"figures", "images", "config.yaml", "config.json", "scores.json"} <= arts
    images = {Path(a.path).name for a in client(store).list_artifacts(tr.run_id, "figures")}
    assert images == {"target.png", "reconstruction.png", "control.png"}
    # images/ is MLflow's: the scored images for its image grids (a PNG and a thumbnail each), at step 100
    logged = {Path(a.path).name.split("+")[:3] == [k, "step", "100"] for a in client(store).list_artifacts(tr.run_id, "images")
              for k in ("target", "reconstruction", "control", "start") if Path(a.path).name.startswith(k + "+")}
    assert logged == {True} and len(client(store).list_artifacts(tr.run_id, "images")) == 8
    # final-only metrics sit at step 0 (drawn as bars), curves end at the last step
    assert [h.step for h in client(store).get_metric_history(tr.run_id, "control/psnr")] == [0]
    assert max(h.step for h in client(store).get_metric_history(tr.run_id, "score/psnr")) == 5


def test_config_hash_keeps_stores_resumable_across_the_log_every_default():
    """A spec that sets attack.log_every hashes as before log_every could be unset (its finished
    runs are still found); leaving it unset gives one hash whatever the derived interval. (The leak
    rule's change re-keyed every setting once, on purpose; this spec hashed to 8416eb56de848ed4
    before it.)"""
    from suite.studies import expand_settings

    repo = Path(__file__).resolve().parents[1]
    assert expand_settings(repo / "runs/fig2_resnet_bn.yaml", "paper")[0].config_hash == "54843ccf115acac4"
    a, b = cfg(attack=AttackSpec(preset="dlg", iterations=100)), cfg(attack=AttackSpec(preset="dlg", iterations=100))
    assert a.attack.log_every is None and a.attack.log_interval == 2 and a.config_hash() == b.config_hash()
    assert cfg(attack=AttackSpec(preset="dlg", iterations=100, log_every=2)).config_hash() != a.config_hash()


def test_metric_names_map_both_ways():
    from suite.execution.mlflow_names import internal_metrics, metric_name, mlflow_metrics

    internal = {"psnr": 20.123456, "control_psnr": 9.0, "gain_psnr": 11.123456, "matching_loss": 0.5, "tv": 0.1,
                "bn_prior": 0.2, "oracle_best_restart_psnr": 21.0, "step": 3, "img0/psnr": 1.0}
    named = mlflow_metrics(internal, digits=4)
    assert named == {"score/psnr": 20.12, "control/psnr": 9.0, "gain/psnr": 11.12, "loss/matching": 0.5,
                     "loss/tv": 0.1, "loss/bn_prior": 0.2, "oracle/best_restart_psnr": 21.0, "img0/psnr": 1.0}
    assert metric_name("step") is None and metric_name("control_matching_loss") == "control/matching_loss"
    back = internal_metrics(named)
    assert set(back) == set(internal) - {"step"}
    # runs logged before the renaming read back unchanged (resume keeps working across the change)
    assert internal_metrics({"psnr": 7.0, "control_psnr": 6.0}) == {"psnr": 7.0, "control_psnr": 6.0}


def test_step_metrics_are_buffered_and_flushed_on_exit(store):
    """Logging 60 steps costs a few store writes, and an interrupted run keeps its curve."""
    calls = []
    with pytest.raises(KeyboardInterrupt):
        with setting_run(cfg(), experiment="t_buffer", tracking_uri=store) as tr:
            real = tr.client.log_batch
            tr.client.log_batch = lambda *a, **kw: calls.append(kw.get("metrics")) or real(*a, **kw)
            for step in range(60):
                tr.log_step(step, {"matching_loss": 1.0 / (step + 1), "psnr": 5.0})
            raise KeyboardInterrupt
    hist = client(store).get_metric_history(tr.run_id, "loss/matching")
    assert sorted(h.step for h in hist) == list(range(60))
    assert len([c for c in calls if c]) <= 2  # one write at exit (two if the clock passed the flush interval)
    assert client(store).get_run(tr.run_id).info.status == "KILLED"


def test_git_commit_tag_when_in_a_repo(store):
    from suite.execution.lifecycle import git_commit

    with setting_run(cfg(), experiment="t_git", tracking_uri=store) as tr:
        pass
    tags = client(store).get_run(tr.run_id).data.tags
    if git_commit():
        assert tags["git_commit"] == git_commit() and len(tags["git_commit"]) == 40
    else:
        assert "git_commit" not in tags


def test_gistress_error_marks_failed_with_error_tag(store):
    with pytest.raises(GistressError):
        with setting_run(cfg(), experiment="t_fail", tracking_uri=store) as tr:
            raise GistressError("variant 'x' is\nnot known", "use gistress variants")
    run = client(store).get_run(tr.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "variant 'x' is not known (fix: use gistress variants)"


def test_divergence_marks_failed_with_step(store):
    with pytest.raises(DivergenceError):
        with setting_run(cfg(), experiment="t_div", tracking_uri=store) as tr:
            raise DivergenceError("matching loss became NaN", step=17)
    run = client(store).get_run(tr.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failed_step"] == "17"
    assert run.data.tags["error"].startswith("matching loss became NaN")


def test_unexpected_error_keeps_traceback(store):
    with pytest.raises(ZeroDivisionError):
        with setting_run(cfg(), experiment="t_bug", tracking_uri=store) as tr:
            1 / 0  # noqa: B018
    run = client(store).get_run(tr.run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"].startswith("ZeroDivisionError")
    assert "error.txt" in {a.path for a in client(store).list_artifacts(tr.run_id)}


@pytest.mark.parametrize("exc, tag", [(KeyboardInterrupt(), "interrupted (Ctrl-C)"),
                                      (Terminated("SIGTERM"), "terminated (SIGTERM)"),
                                      (SystemExit(143), "exited")])
def test_interrupts_mark_killed(store, exc, tag):
    with pytest.raises(type(exc)):
        with setting_run(cfg(), experiment="t_kill", tracking_uri=store) as tr:
            raise exc
    run = client(store).get_run(tr.run_id)
    assert run.info.status == "KILLED" and run.data.tags["error"] == tag


def test_nesting_attach_and_resume_lookups(store):
    c = client(store)
    exp = c.create_experiment("t_nest")
    parent = c.create_run(exp, tags={"gistress.kind": "study"}).info.run_id
    a, b, d = cfg(seed=0), cfg(seed=1), cfg(seed=2)
    with setting_run(a, experiment="t_nest", parent_run_id=parent, tracking_uri=store) as ra:
        pass
    # a pre-created (SCHEDULED) run, as a study creates for worker processes
    rid = create_setting_run(b, experiment="t_nest", parent_run_id=parent, tracking_uri=store, scheduled=True)
    assert c.get_run(rid).info.status == "SCHEDULED"
    with pytest.raises(GistressError):
        with setting_run(b, experiment="t_nest", tracking_uri=store, run_id=rid):
            raise GistressError("no")
    with setting_run(d, experiment="t_nest", parent_run_id=parent, tracking_uri=store) as rd:
        pass
    assert c.get_run(ra.run_id).data.tags["mlflow.parentRunId"] == parent
    assert c.get_run(rid).data.tags["mlflow.parentRunId"] == parent
    assert c.get_run(rid).info.status == "FAILED"
    assert finished_runs("t_nest", store) == {a.config_hash(): ra.run_id, d.config_hash(): rd.run_id}
    assert failed_runs("t_nest", store) == {b.config_hash(): [rid]}
    assert finished_runs("no_such_experiment", store) == {}


def test_oracle_init_and_levels_in_tags(store):
    c1 = cfg(attack=AttackSpec(preset="gia_bn", iterations=3, init="noisy_target", noise_p=0.8),
             threat=ThreatModel(bn_mode="eval"))
    with setting_run(c1, experiment="t_tags", tracking_uri=store) as tr:
        pass
    t = client(store).get_run(tr.run_id).data.tags
    assert t["oracle_init"] == "true" and t["upper_bound"] == "true" and t["assumption_level"] == "2"
