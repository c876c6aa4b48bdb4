"""Hardening: bad inputs, divergence, interruption, determinism, untrusted files, no network.

What users meet when they point the suite at their own checkpoints, data and specs and leave a
study running overnight: every bad input is one ``error: <problem> (fix: <fix>)`` line with exit
code 2 and nothing half-written; a diverging run is FAILED with its step and the study goes on;
Ctrl-C / SIGTERM end runs KILLED and a re-run completes the study without duplicates.

Covered elsewhere and not repeated here (the loaders' own messages, asserted on the library
API): tests/test_data.py (corrupt images, COCO json validation), tests/test_variants.py and
tests/test_yolo.py (checkpoint mismatches, pretrained cache misses, trust), tests/test_study.py
(spec validation, SIGTERM and Ctrl-C resume with a fake runner), tests/test_tracking.py
(terminal statuses, unreachable server probe), tests/test_cli.py (a first bad-input table).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_study  # the fake runner (its CALLS list records what ran in-process)
import torch
from PIL import Image

import suite  # noqa: F401  (offline defaults before mlflow)
from suite.cli.main import build_parser, main
from suite.errors import DivergenceError, GistressError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAKE = "test_study:fake_run_setting"
DOC = REPO / "docs" / "troubleshooting.md"


# ---------------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------------


def cli(argv: list[str]) -> int:
    """``gistress ARGV`` in-process; argparse's own errors exit through SystemExit."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def runs_of(uri: str, experiment: str) -> list:
    c = mlflow_client(uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module's MLflow tests (creating a store costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    mlflow_client(uri).search_experiments()  # migrate now: a subprocess and this one must not race
    return uri


def _png(path: Path, w: int, h: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


COCO_OK = {
    "images": [{"id": 1, "file_name": "wide.png", "width": 100, "height": 50}],
    "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 5, 30, 20], "category_id": 1}],
    "categories": [{"id": 1, "name": "person"}],
}


@pytest.fixture
def inputs(workdir):
    """The user's files, good and bad: an ImageFolder, a COCO folder, checkpoints, specs."""
    root = workdir / "inputs"
    folder = root / "photos"
    _png(folder / "cls_a" / "ok.png", 48, 48)
    (folder / "cls_a" / "broken.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    whole = _png(root / "whole.png", 64, 64, seed=2).read_bytes()
    (folder / "cls_a" / "half.png").write_bytes(whole[: len(whole) // 2])
    (folder / "cls_a" / "notes.png").write_text("these are my notes, not a picture\n")
    _png(folder / "cls_b" / "tiny.png", 16, 16)

    coco = root / "coco"
    _png(coco / "images" / "wide.png", 100, 50)
    (coco / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)

    def coco_json(name: str, edit=None, text: str | None = None) -> str:
        data = json.loads(json.dumps(COCO_OK))
        if edit:
            edit(data)
        path = coco / name
        path.write_text(text if text is not None else json.dumps(data))
        return f"coco:{coco / 'images'}:{path}"

    def add_broken(d):
        d["images"].append({"id": 2, "file_name": "broken.png", "width": 100, "height": 50})
        d["annotations"].append({"id": 2, "image_id": 2, "bbox": [1, 1, 5, 5], "category_id": 1})

    import variants

    ckpt = root / "lenet10.pt"
    torch.save(variants.build("lenet", seed=1).model.state_dict(), ckpt)

    specs = root / "specs"
    specs.mkdir()
    good = "name: hard\nbase:\n  variant: lenet\n  size: 32\n  attack: {preset: dlg, iterations: 2}\n"
    spec_texts = {
        "malformed": "name: hard\ngrid:\n  variant: [lenet\n  size: 3\n",
        "unknown_key": "name: hard\nbase: {variant: lenet}\ngird:\n  size: [32]\n",
        "unknown_nested": "name: hard\nbase:\n  variant: lenet\n  attack: {iteratons: 3}\n",
        "wrong_type": good + "grid:\n  attack.iterations: [2, lots]\n",
        "empty_grid": good + "grid:\n  attack.tv: []\n",
        "bad_defense": good + "grid:\n  threat.defense: [none, 'topk:2']\n",
        "unknown_variant": good + "grid:\n  variant: [lenet, lenett]\n",
        "unknown_option": good + "grid:\n  variant_options: [{num_classes: 10}, {depth: 3}]\n",
        "good": good,
    }
    for name, text in spec_texts.items():
        (specs / f"{name}.yaml").write_text(text)

    return {
        "folder": f"imagefolder:{folder}",
        "coco_not_json": coco_json("notes.json", text="images: [1, 2]\n"),
        "coco_no_images": coco_json("no_images.json", lambda d: d.pop("images")),
        "coco_no_annotations": coco_json("no_anns.json", lambda d: d.pop("annotations")),
        "coco_outside": coco_json("outside.json", lambda d: d["annotations"][0].update(bbox=[90, 5, 30, 20])),
        "coco_zero_area": coco_json("zero.json", lambda d: d["annotations"][0].update(bbox=[10, 5, 0, 20])),
        "coco_unknown_cat": coco_json("cat.json", lambda d: d["annotations"][0].update(category_id=999)),
        "coco_broken_image": coco_json("broken.json", add_broken),
        "ckpt": str(ckpt),
        "spec": lambda name: str(specs / f"{name}.yaml"),
        "port": closed_port(),
    }


# ---------------------------------------------------------------------------------------------
# the bad-input matrix, through the CLI
# ---------------------------------------------------------------------------------------------

ATTACK = ["attack", "--iterations", "2", "--quiet", "--out", "out"]

# (id, argv from the inputs, words the one line must hold: the problem and the fix)
BAD_INPUTS = [
    ("unknown-variant", lambda i: ATTACK + ["--variant", "lenett"],
     ["unknown variant 'lenett'", "did you mean lenet"]),
    ("unknown-variant-option", lambda i: ATTACK + ["--variant", "lenet", "--opt", "num_clases=3"],
     ["unknown option 'num_clases'", "did you mean 'num_classes'"]),
    ("unknown-flag", lambda i: ATTACK + ["--variant", "lenet", "--iteratons", "3"],
     ["unrecognized arguments: --iteratons", "did you mean --iterations", "gistress attack --help"]),
    ("wrong-type-flag", lambda i: ATTACK + ["--variant", "lenet", "--lr", "fast"],
     ["--lr: invalid float value: 'fast'", "gistress attack --help"]),
    ("wrong-type-option", lambda i: ATTACK + ["--variant", "lenet", "--opt", "num_classes=ten"],
     ["num_classes='ten' must be a positive integer", "num_classes=10"]),
    ("unknown-device", lambda i: ATTACK + ["--variant", "lenet", "--device", "gpu"],
     ["unknown device 'gpu'", "--device auto, cpu, cuda"]),
    ("corrupt-image", lambda i: ATTACK + ["--variant", "lenet", "--data", i["folder"], "--image", "cls_a/broken.jpg"],
     ["broken.jpg", "replace the file with a complete image"]),
    ("truncated-image", lambda i: ATTACK + ["--variant", "lenet", "--data", i["folder"], "--image", "cls_a/half.png"],
     ["half.png", "truncated", "replace the file"]),
    ("not-an-image", lambda i: ATTACK + ["--variant", "lenet", "--data", i["folder"], "--image", "cls_a/notes.png"],
     ["notes.png", "cannot identify image file", "replace the file"]),
    ("image-too-small", lambda i: ATTACK + ["--variant", "lenet", "--data", i["folder"], "--image", "cls_b/tiny.png",
                                            "--size", "32"],
     ["tiny.png is 16x16, smaller than --size 32", "pick --size ≤ 16"]),
    ("coco-not-json", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_not_json"]],
     ["notes.json: not a json file", "pass a COCO instances json"]),
    ("coco-no-images", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_no_images"]],
     ["no_images.json: lacks a 'images' list", "add 'images'"]),
    ("coco-no-annotations", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_no_annotations"]],
     ["lacks a 'annotations' list", "add 'annotations'"]),
    ("coco-box-outside", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_outside"]],
     ["box [90, 5, 30, 20] lies outside image wide.png (100x50)", "fix or drop it"]),
    ("coco-zero-area", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_zero_area"]],
     ["zero or negative area", "positive width and height"]),
    ("coco-unknown-category", lambda i: ATTACK + ["--variant", "yolov8n", "--data", i["coco_unknown_cat"]],
     ["unknown category id 999", "use one of the json's category ids (1)"]),
    ("coco-corrupt-image", lambda i: ATTACK + ["--variant", "yolov8n", "--size", "64", "--data",
                                               i["coco_broken_image"], "--image", "broken.png"],
     ["broken.png", "replace the file with a complete image"]),
    ("class-count-mismatch", lambda i: ATTACK + ["--variant", "lenet", "--num-classes", "100",
                                                 "--weights", f"file:{i['ckpt']}"],
     ["checkpoint has 10 classes, variant has 100", "num_classes=10"]),
    ("checkpoint-other-architecture", lambda i: ATTACK + ["--variant", "convnet", "--size", "32",
                                                          "--weights", f"file:{i['ckpt']}"],
     ["lenet10.pt is for another architecture than convnet", "check the variant and its options"]),
    ("defense-out-of-range", lambda i: ATTACK + ["--variant", "lenet", "--defense", "qsgd:0"],
     ["defense 'qsgd:0': bits must be in [1, 16]", "gistress attack --help"]),
    ("init-file-not-an-image", lambda i: ATTACK + ["--variant", "lenet", "--init", "file", "--init-file",
                                                   i["folder"].split(":", 1)[1] + "/cls_a/notes.png"],
     ["init file", "notes.png is not a readable image", "pass a PNG or JPEG"]),
    ("detection-without-shared-boxes", lambda i: ATTACK + ["--variant", "yolov8n", "--image", "bus", "--size", "64",
                                                           "--no-labels"],
     ["the detection attack needs the boxes and classes shared", "threat.shares_labels=true"]),
    ("tracking-server-unreachable", lambda i: ATTACK + ["--variant", "lenet", "--tracking-uri",
                                                        f"http://127.0.0.1:{i['port']}"],
     ["tracking server http://127.0.0.1:{port} is unreachable", "start it"]),
    ("study-malformed-yaml", lambda i: ["study", i["spec"]("malformed"), "--out", "out"],
     ["malformed YAML in {spec}:", "fix the YAML syntax"]),
    ("study-unknown-key", lambda i: ["study", i["spec"]("unknown_key"), "--out", "out"],
     ["unknown key 'gird' in {spec}:3 (did you mean 'grid'?)", "valid keys: name,"]),
    ("study-unknown-nested-key", lambda i: ["study", i["spec"]("unknown_nested"), "--out", "out"],
     ["unknown key 'attack.iteratons'", "did you mean 'attack.iterations'?", "valid keys here:"]),
    ("study-wrong-type", lambda i: ["study", i["spec"]("wrong_type"), "--out", "out"],
     ["setting 2", "attack.iterations", "(got 'lots')", "fix the value in the spec"]),
    ("study-wrong-value", lambda i: ["study", i["spec"]("bad_defense"), "--out", "out"],
     ["setting 2", "threat.defense: defense 'topk:2': the kept fraction must be in (0, 1]",
      "fix the value in the spec"]),
    ("study-empty-grid", lambda i: ["study", i["spec"]("empty_grid"), "--out", "out"],
     ["grid axis 'attack.tv' in {spec}:", "is empty", "give it at least one value"]),
    ("study-unknown-variant", lambda i: ["study", i["spec"]("unknown_variant"), "--out", "out"],
     ["setting 2 (lenett)", "unknown variant 'lenett'", "did you mean lenet"]),
    ("study-unknown-variant-option", lambda i: ["study", i["spec"]("unknown_option"), "--out", "out"],
     ["unknown option 'depth' for variant 'lenet'", "valid options: num_classes"]),
    ("study-tracking-server-unreachable", lambda i: ["study", i["spec"]("good"), "--out", "out", "--tracking-uri",
                                                     f"http://127.0.0.1:{i['port']}"],
     ["tracking server http://127.0.0.1:{port} is unreachable", "start it"]),
]


def _assert_nothing_written(workdir: Path) -> None:
    """No MLflow store (so no run, RUNNING or otherwise, no study parent) and no output folder."""
    left = {p.name for p in workdir.iterdir()} - {"inputs"}
    assert not left, f"a failed command left {sorted(left)} behind"


@pytest.mark.parametrize("argv, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(workdir, inputs, capsys, argv, words):
    args = argv(inputs)
    spec = next((a for a in args if a.endswith(".yaml")), "")
    t0 = time.perf_counter()
    rc = cli(args)
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "(fix: " in lines[0]  # the problem and, after it, the fix
    for word in words:
        assert word.format(spec=spec, port=inputs["port"]) in lines[0]
    assert "Traceback" not in err
    assert elapsed < (5 if "unreachable" in words[0] else 20)  # before any attack work
    _assert_nothing_written(workdir)


@pytest.mark.parametrize("case", ["unknown-variant", "corrupt-image", "class-count-mismatch",
                                  "study-malformed-yaml", "study-unknown-variant"])
def test_debug_shows_the_traceback(workdir, inputs, case):
    argv = dict((c[0], c[1]) for c in BAD_INPUTS)[case](inputs)
    with pytest.raises(GistressError):  # raised through main: Python prints the traceback
        main(["--debug", *argv])
    with pytest.raises(GistressError):  # --debug after the subcommand works too
        main([*argv, "--debug"])
    _assert_nothing_written(workdir)


def test_debug_traceback_from_the_real_console_entry(tmp_path):
    """The installed entry point: one line and exit 2 normally, the traceback with --debug."""
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\ngrid:\n  variant: [lenet\n")
    cmd = [sys.executable, "-m", "suite.cli"]
    plain = subprocess.run([*cmd, "study", str(spec)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.startswith("error: malformed YAML")
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([*cmd, "--debug", "study", str(spec)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode != 0
    assert "Traceback (most recent call last)" in debug.stderr and "GistressError: malformed YAML" in debug.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_pretrained_weights_offline_fail_fast_naming_the_file(workdir, capsys, monkeypatch):
    torch_home = workdir / "empty-torch-home"
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    t0 = time.perf_counter()
    rc = cli(ATTACK + ["--variant", "resnet18", "--weights", "pretrained"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip()
    expected = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert f"not in the local cache: {expected}" in err
    assert "download https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert f"place it at {expected}" in err
    assert elapsed < 15  # a build and a file check, no download attempt or retry loop
    assert sorted(p.name for p in workdir.iterdir()) == []  # not even the cache folder


def test_unknown_gpu_index_is_a_clear_error():
    from suite.execution.runner import resolve_device

    with pytest.raises(GistressError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(GistressError, match="CUDA is not available") as e:
            resolve_device("cuda:0")
        assert e.value.hint == "use --device cpu"
    else:
        n = torch.cuda.device_count()
        with pytest.raises(GistressError, match=f"has {n} GPU"):
            resolve_device(f"cuda:{n}")
    assert resolve_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------------------------

# The real trigger below: a huge Adam step (lr 3e37) on the l2 objective without clamping (DLG's
# recipe on lenet). The image runs off to ~1e37 in one step and the next forward/backward
# overflows float32. Deterministic on CPU.


def test_nan_in_matching_loss_is_caught_at_the_step_it_happens(workdir, monkeypatch):
    """The check runs every step, not only at logging steps: the reported step is exact."""
    from suite.attack.objectives import UpdateMatcher
    from suite.config import RunConfig
    from suite.execution.runner import run_setting

    real = UpdateMatcher.__call__
    calls = {"n": 0}

    def poisoned(self, update):
        calls["n"] += 1
        value = real(self, update)
        return value * float("nan") if calls["n"] == 3 else value  # the third step's loss

    monkeypatch.setattr(UpdateMatcher, "__call__", poisoned)
    cfg = RunConfig(variant="lenet", size=32, device="cpu", attack={"preset": "ig", "iterations": 8, "log_every": 25})
    with pytest.raises(DivergenceError) as e:
        run_setting(cfg, out_dir=workdir / "never-written", progress=False)
    assert e.value.step == 2
    assert "diverged at step 2" in e.value.message and "matching_loss=nan" in e.value.message
    assert "lower the learning rate" in e.value.one_line()
    assert not (workdir / "never-written").exists()


def test_diverging_attack_is_failed_with_reason_and_step(workdir, store, capsys):
    rc = cli(ATTACK + ["--variant", "lenet", "--size", "32", "--preset", "dlg", "--optimizer", "adam",
                       "--lr", "3e37", "--iterations", "6", "--tracking-uri", store, "--experiment", "hard-diverge"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("error: the attack diverged at step ") and "NaN/inf" in err[0]
    assert "(fix: lower the learning rate" in err[0]
    (run,) = runs_of(store, "hard-diverge")
    assert run.info.status == "FAILED"
    step = run.data.tags["failed_step"]
    assert step.isdigit() and int(step) < 5  # caught when it happened, not at the last (logged) step
    assert f"diverged at step {step}" in run.data.tags["error"]
    assert not (workdir / "out").exists()


def test_study_marks_diverged_setting_failed_and_continues(workdir, store):
    from suite.studies import run_study

    spec = workdir / "diverge.yaml"
    spec.write_text(
        "name: hard_diverge_study\n"
        "base:\n  variant: lenet\n  size: 32\n  device: cpu\n"
        "  attack: {preset: dlg, optimizer: adam, iterations: 4}\n"
        "grid:\n  attack.lr: [3.0e+37, 0.1]\n"
        "images: [astronaut]\n"
    )
    out = run_study(spec, tracking_uri=store, out_root=workdir / "out")
    assert out.exit_code == 1
    by_lr = {float(r.data.params["lr"]): r for r in test_study.children(store, "hard_diverge_study")}
    bad, good = by_lr[3e37], by_lr[0.1]
    assert bad.info.status == "FAILED" and good.info.status == "FINISHED"
    step = bad.data.tags["failed_step"]
    assert step.isdigit() and f"diverged at step {step}" in bad.data.tags["error"]
    assert "score/psnr" in good.data.metrics
    assert mlflow_client(store).get_run(out.parent_run_id).info.status == "FINISHED"
    assert [r["status"] for r in out.rows] == ["FAILED", "FINISHED"]
    assert "diverged" in out.rows[0]["error"]
    assert "FAILED" in out.csv_path.read_text()


# ---------------------------------------------------------------------------------------------
# interruption
# ---------------------------------------------------------------------------------------------


def test_sigint_kills_the_running_child_keeps_results_and_rerun_resumes(tmp_path, store):
    """Ctrl-C (a real SIGINT) to `gistress study` after the first setting finished."""
    name = "hard_sigint"
    spec = tmp_path / "spec.yaml"
    spec.write_text(test_study.SMALL.replace("name: small", f"name: {name}")
                    .replace("[alpha, beta]", "[alpha, beta, gamma]")
                    .replace("images: [astronaut, chelsea]", "images: [astronaut]"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "FAKE_SLEEP_AT": "beta"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "suite.cli", "study", str(spec), "--tracking-uri", store, "--out",
         str(tmp_path / "out"), "--runner", FAKE], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        # a shell without job control starts background jobs with SIGINT ignored; undo that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            by = {r.data.tags.get("variant"): r.info.status for r in test_study.children(store, name)}
            if by.get("alpha") == "FINISHED" and by.get("beta") == "RUNNING":
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        else:
            pytest.fail("beta never started")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted: finished settings are kept" in output
    by = {r.data.tags["variant"]: r for r in test_study.children(store, name)}
    assert by["alpha"].info.status == "FINISHED"
    assert by["beta"].info.status == "KILLED" and by["beta"].data.tags["error"] == "interrupted (Ctrl-C)"
    assert "gamma" not in by
    assert test_study.parents(store, name)[0].info.status == "KILLED"
    # what exists so far is written: the summary with every setting's state, and the CSV
    summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert [r["status"] for r in summary["rows"]] == ["FINISHED", "KILLED", "PENDING"]
    assert (tmp_path / "out" / name / "summary.csv").is_file()
    assert (tmp_path / "out" / name / by["alpha"].data.tags["config_hash"] / "reconstruction.png").is_file()

    from suite.studies import run_study

    test_study.CALLS.clear()
    again = run_study(spec, tracking_uri=store, out_root=tmp_path / "out", runner=FAKE)
    assert again.exit_code == 0 and again.counts == {"FINISHED": 3}
    ran = set(test_study.CALLS)
    assert ran == {by["beta"].data.tags["config_hash"], again.rows[2]["config_hash"]}  # beta and gamma only
    assert [r["reused"] for r in again.rows] == [True, False, False]
    finished = [r for r in test_study.children(store, name) if r.info.status == "FINISHED"]
    hashes = [r.data.tags["config_hash"] for r in finished]
    assert len(hashes) == 3 and len(set(hashes)) == 3  # no duplicate FINISHED run


def test_sigterm_ends_an_attack_killed(workdir, store, capsys, monkeypatch):
    """`gistress attack` (not only studies) turns SIGTERM (scancel, a time limit) into KILLED."""
    from suite.execution.tracking import SettingRun

    real = SettingRun.log_step

    def log_then_terminate(self, step, metrics):
        real(self, step, metrics)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this thread before the next step

    monkeypatch.setattr(SettingRun, "log_step", log_then_terminate)
    ignored: list[int] = []

    def record(signum, frame):  # without the CLI's own handler the signal lands here, not in a dead pytest
        ignored.append(signum)

    original = signal.signal(signal.SIGTERM, record)
    try:
        rc = cli(ATTACK + ["--variant", "lenet", "--size", "32", "--iterations", "50", "--log-every", "1",
                           "--tracking-uri", store, "--experiment", "hard-sigterm"])
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, original)
    assert not ignored and rc == 130 and "interrupted" in capsys.readouterr().err
    assert restored is record  # the CLI puts back the handler it replaced
    (run,) = runs_of(store, "hard-sigterm")
    assert run.info.status == "KILLED" and run.data.tags["error"] == "terminated (SIGTERM)"
    history = mlflow_client(store).get_metric_history(run.info.run_id, "loss/matching")
    assert max(m.step for m in history) == 2  # it stopped where it was told to


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------


def test_same_spec_seed_and_device_give_the_same_reconstruction(workdir, capsys):
    from suite.config import RunConfig
    from suite.execution.runner import run_setting

    def attack(out: str, seed: int) -> torch.Tensor:
        rc = cli(["attack", "--variant", "lenet", "--size", "32", "--preset", "ig", "--iterations", "3",
                  "--restarts", "2", "--device", "cpu", "--seed", str(seed), "--no-mlflow", "--quiet", "--out", out])
        assert rc == 0, capsys.readouterr().err
        return torch.load(workdir / out / "reconstruction.pt", weights_only=True)["reconstruction"]

    first, second, other = attack("a", 3), attack("b", 3), attack("c", 4)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # a study runs the same config through the same code: the same tensor again
    cfg = RunConfig(**json.loads((workdir / "a" / "config.json").read_text()))
    result = run_setting(cfg, out_dir=workdir / "d", progress=False)
    assert torch.equal(result.reconstruction.images, first)


# ---------------------------------------------------------------------------------------------
# untrusted files
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def load_calls(monkeypatch):
    """file name -> the weights_only flag of each torch.load call on it."""
    seen: dict[str, list] = {}
    real = torch.load

    def spy(f, *args, **kwargs):
        seen.setdefault(Path(str(f)).name, []).append(kwargs.get("weights_only"))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def _check_trust(workdir, capsys, load_calls, argv: list[str], ckpt: Path) -> None:
    rc = cli(argv + ["--weights", f"file:{ckpt}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "arbitrary code" in err[0] and "--trust-checkpoint" in err[0]
    assert load_calls[ckpt.name] == [True]  # it tried weights_only=True and nothing more
    assert not (workdir / "out").exists()
    load_calls.clear()
    assert cli(argv + ["--weights", f"file:{ckpt}", "--trust-checkpoint"]) == 0, capsys.readouterr().err
    assert load_calls[ckpt.name][-1] is False  # full unpickling only now, because the user asked for it
    assert (workdir / "out" / "reconstruction.png").is_file()


def test_classifier_checkpoint_untrusted_then_trusted(workdir, capsys, load_calls):
    import variants

    state = workdir / "state.pt"
    torch.save(variants.build("lenet", seed=1).model.state_dict(), state)
    argv = ["attack", "--variant", "lenet", "--size", "32", "--iterations", "1", "--quiet", "--no-mlflow"]
    assert cli(argv + ["--weights", f"file:{state}", "--out", "plain"]) == 0
    assert load_calls[state.name] == [True]  # a plain state_dict needs no trust: weights_only=True
    load_calls.clear()
    full = workdir / "full.pt"
    torch.save(variants.build("lenet", seed=1).model, full)  # a pickled module
    _check_trust(workdir, capsys, load_calls, argv + ["--out", "out"], full)


def test_ultralytics_checkpoint_untrusted_then_trusted(workdir, capsys, load_calls):
    import variants

    ckpt = workdir / "last.pt"
    torch.save({"epoch": 1, "model": variants.build("yolov8n", seed=1).model}, ckpt)  # ultralytics' layout
    argv = ["attack", "--variant", "yolov8n", "--image", "bus", "--size", "64", "--iterations", "1", "--quiet",
            "--no-mlflow", "--out", "out"]
    _check_trust(workdir, capsys, load_calls, argv, ckpt)


# ---------------------------------------------------------------------------------------------
# no network, local-only servers
# ---------------------------------------------------------------------------------------------


def test_tests_cannot_reach_the_network_but_loopback_works():
    """conftest's autouse fixture is active here without being asked for."""
    import urllib.error
    import urllib.request

    for family, address in ((socket.AF_INET, ("203.0.113.7", 80)), (socket.AF_INET6, ("2001:db8::7", 443, 0, 0))):
        with socket.socket(family) as s, pytest.raises(OSError, match="network access blocked in tests"):
            s.settimeout(1)
            s.connect(address)
        with socket.socket(family) as s, pytest.raises(OSError, match="network access blocked"):
            s.settimeout(1)
            s.connect_ex(address)
    with pytest.raises(OSError, match="network access blocked"):
        socket.create_connection(("198.51.100.9", 443), timeout=1)
    with pytest.raises(urllib.error.URLError, match="network access blocked"):  # libraries go through it too
        urllib.request.urlopen("http://203.0.113.7/", timeout=1)

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5) as c:
            peer, _ = server.accept()
            with peer:
                c.sendall(b"ping")
                assert peer.recv(4) == b"ping"


def test_ui_binds_loopback_unless_asked(workdir, capsys, monkeypatch):
    from suite.cli.commands import ui

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    started: list[tuple[list[str], dict]] = []
    stopped: list[int] = []

    class Server:  # stands in for the mlflow server: up at once, then the user presses Ctrl-C
        pid = 4242

        def __init__(self, argv, **kw):
            started.append((argv, kw))

        def poll(self):
            return None

        def wait(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(ui.subprocess, "Popen", Server)
    monkeypatch.setattr(ui, "_wait_ready", lambda proc, url: True)
    monkeypatch.setattr(ui, "stop_group", lambda proc: stopped.append(proc.pid))
    (workdir / "mlflow.db").touch()
    assert cli(["ui", "--port", "5011"]) == 0
    argv, kw = started[-1]
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5011"
    assert "--allowed-hosts" not in argv and "0.0.0.0" not in argv
    # its own session (Ctrl-C and the clean-up reach the whole tree), no GenAI job runner
    assert kw["start_new_session"] is True and kw["env"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert stopped == [4242]  # Ctrl-C ended the server's process group
    out = capsys.readouterr().out
    assert "http://127.0.0.1:5011" in out and "serving at http://127.0.0.1:5011" in out
    assert cli(["ui", "--host", "0.0.0.0", "--port", "5012"]) == 0  # the user asks for the network
    argv, _ = started[-1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--allowed-hosts") + 1] == "*"
    assert ui.server_argv("sqlite:///x.db")[ui.server_argv("sqlite:///x.db").index("--host") + 1] == "127.0.0.1"


def test_ui_stop_group_kills_a_tree_that_ignores_sigterm():
    """A server whose workers ignore SIGTERM still ends, grandchildren included (SIGKILL after the wait)."""
    from suite.cli.commands import ui

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    parent = (f"import subprocess, sys, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"subprocess.Popen([sys.executable, '-c', {stubborn!r}]); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", parent], start_new_session=True)
    time.sleep(1.0)  # the grandchild is up
    t0 = time.monotonic()
    ui.stop_group(proc, timeout=1.0)
    assert time.monotonic() - t0 < 10 and proc.returncode == -signal.SIGKILL
    assert ui.live_members(proc.pid) == []  # the grandchild too (at most a zombie for init to reap)


# ---------------------------------------------------------------------------------------------
# the troubleshooting page
# ---------------------------------------------------------------------------------------------


def _doc_commands() -> list[str]:
    """Every `gistress ...` command line in the page's shell blocks (env assignments stripped)."""
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", DOC.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]
            if words and words[0] == "gistress":
                commands.append(words[1:])
    return commands


def test_troubleshooting_commands_parse():
    """Each gistress command in docs/troubleshooting.md is accepted by the real parser."""
    commands = _doc_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for words in commands:
        args, extra = parser.parse_known_args(words)
        assert not extra and getattr(args, "_run", None), words
