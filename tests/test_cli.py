"""The command line: attack, variants, doctor, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from suite.cli.main import main


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_attack_cli_writes_table_pngs_and_one_mlflow_run(workdir, capsys):
    rc = main(["attack", "--variant", "lenet", "--data", "samples", "--image", "astronaut", "--size", "32",
               "--preset", "ig", "--iterations", "6", "--restarts", "2", "--control", "--json",
               "--log-every", "2", "--quiet", "--out", "out"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PSNR" in out and "prior-only ctrl" in out and "gradient gain" in out
    summary = _last_json(out)
    for name in ("target.png", "init.png", "reconstruction.png", "control.png", "reconstruction_x8.png",
                 "comparison_target_init_control_reconstruction.png", "config.json"):
        assert (workdir / "out" / name).is_file(), name
    assert {"psnr", "ssim", "brr", "wsrr", "control_psnr", "gain_psnr"} <= set(summary["metrics"])
    client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
    exp = client.get_experiment_by_name("gistress-attack")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["variant"] == "lenet" and run.data.params["restarts"] == "2"
    assert run.data.tags["config_hash"] == summary["config_hash"]
    link = f"/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning"
    assert f"mlflow run: {run.info.run_id}; its page once `gistress ui` serves the store: " \
           f"http://127.0.0.1:5000{link}" in out
    assert "score/psnr" in run.data.metrics and "control/psnr" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/reconstruction.png", "figures/reconstruction_x8.png"} <= arts
    # images/ holds only what log_image(key=, step=) wrote: MLflow's UI drops a run's image grids
    # when a file there is named otherwise
    logged = [Path(a.path).name for a in client.list_artifacts(run.info.run_id, "images")]
    assert logged and all("+step+" in name for name in logged)
    assert "mlflow.loggedImages" in run.data.tags  # what makes the UI look for them
    hist = client.get_metric_history(run.info.run_id, "loss/matching")
    assert len(hist) >= 3  # step metrics every 2 steps, plus the final value


def test_step_metrics_default_to_about_fifty_points(workdir, capsys):
    """Without --log-every a run logs a curve (>= 50 points when the budget has that many steps)."""
    assert main(["attack", "--variant", "lenet", "--size", "32", "--preset", "ig", "--iterations", "120",
                 "--quiet", "--out", "out", "--device", "cpu"]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")  # absolute: MLflow caches engines by URI
    (run,) = client.search_runs([client.get_experiment_by_name("gistress-attack").experiment_id])
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/matching"))
    assert steps[:3] == [0, 2, 4] and len(steps) >= 50 and steps[-1] == 120


def test_yolo_attack_cli_runs_on_bus(workdir, capsys):
    rc = main(["attack", "--variant", "yolov8n", "--data", "samples", "--image", "bus", "--size", "128",
               "--bn-mode", "eval", "--weights", "calibrated", "--preset", "gia_bn", "--iterations", "3",
               "--json", "--quiet", "--no-mlflow", "--out", "yolo"])
    out = capsys.readouterr().out
    assert rc == 0
    summary = _last_json(out)
    assert summary["tags"]["task"] == "detection"
    assert "other images of the source" in summary["tags"]["calibrated_on"]
    assert (workdir / "yolo" / "target.png").is_file()


def test_variants_json_lists_every_named_variant_with_reference_counts(capsys):
    assert main(["variants", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    expected = {"resnet18": 11.69, "yolov8n": 3.16, "vit_b_16": 86.6, "swin_t": 28.3, "convnext_t": 28.6,
                "maxvit_t": 30.9}
    for name, millions in expected.items():
        assert rows[name]["params"] / 1e6 == pytest.approx(millions, abs=0.05), name
    for name in ("resnet34", "preact_resnet18", "preact_resnet34", "convnet", "lenet", "yolov8n-basicblock",
                 "yolov8n-preact"):
        assert name in rows


def test_doctor_reports_device_store_and_caches(workdir, capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"]["selected"] in ("cpu", "cuda")
    assert info["tracking_uri"].startswith("sqlite:///")
    assert info["caches"]["lpips_backbone"] in ("present", "missing")
    assert "torch" in info["versions"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["attack", "--variant", "resnet19"], "unknown variant 'resnet19'"),
        (["attack", "--variant", "lenet", "--opt", "depth=3"], "unknown option 'depth'"),
        (["attack", "--variant", "lenet", "--image", "astronot"], "astronaut"),
        (["attack", "--variant", "lenet", "--data", "cifar10:/nonexistent/dir"], "/nonexistent/dir"),
        (["attack", "--variant", "lenet", "--preset", "igg"], "unknown preset"),
        (["attack", "--variant", "lenet", "--batch", "50"], "batch of 50"),
        (["attack", "--variant", "lenet", "--size", "4096"], "smaller than"),
        (["attack", "--variant", "lenet", "--defense", "qsgd:0"], "qsgd"),
    ],
)
def test_bad_input_is_one_line_error_with_nonzero_exit(workdir, capsys, argv, message):
    rc = main(argv + ["--iterations", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    # nothing half-written: no MLflow run left RUNNING
    if (workdir / "mlflow.db").exists():
        client = MlflowClient(tracking_uri="sqlite:///mlflow.db")
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id]):
                assert run.info.status != "RUNNING"

