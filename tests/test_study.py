"""Study specs, expansion, dry-run, resume, interrupts and scale-out (suite.studies / executors)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import suite  # noqa: F401  (offline defaults before mlflow)
from suite.config import RunConfig
from suite.data.batch import Batch
from suite.errors import DivergenceError, GistressError
from suite.results import Reconstruction, RunResult, Scores
from suite.studies import expand, expand_settings, parse_sets, parse_spec, run_study

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAKE = "test_study:fake_run_setting"
CALLS: list[str] = []  # config hashes the fake runner ran (in-process runs only)


# ---------------------------------------------------------------------------------------------
# a fake runner with run_setting's signature (tiny tensors, real PNG artifacts)
# ---------------------------------------------------------------------------------------------


def fake_result(cfg: RunConfig, out_dir: Path) -> RunResult:
    """A RunResult made of tiny tensors, with target/control/reconstruction PNGs on disk."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(int(cfg.config_hash()[:6], 16))
    target = torch.rand(1, 3, 8, 8, generator=g)
    recon = torch.rand(1, 3, 8, 8, generator=g)
    psnr = 10.0 + int(cfg.config_hash()[:4], 16) % 20
    scores = Scores(psnr=[psnr], ssim=[0.5], lpips=None, leaked=[psnr >= 18], order=[0],
                    lpips_missing="no backbone offline")
    control_scores = Scores(psnr=[9.0], ssim=[0.3], lpips=None, leaked=[False], order=[0])
    rec = Reconstruction(images=recon, matching_loss=0.25, restart_images=[recon], restart_losses=[0.25],
                         chosen=0, init=torch.rand(1, 3, 8, 8, generator=g))
    artifacts = {}
    for name, t in (("target", target), ("reconstruction", recon), ("control", recon.flip(-1))):
        arr = (t[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
        p = out_dir / f"{name}.png"
        Image.fromarray(arr).resize((32, 32)).save(p)
        artifacts[name] = p
    (out_dir / "config.json").write_text(cfg.model_dump_json())
    artifacts["config"] = out_dir / "config.json"
    metrics = {**scores.summary(), **control_scores.summary("control_"), "matching_loss": 0.25,
               "gain_psnr": psnr - 9.0}
    return RunResult(config=cfg, target=Batch(images=target, labels=torch.tensor([1])), reconstruction=rec,
                     scores=scores, control=rec, control_scores=control_scores, metrics=metrics,
                     artifacts=artifacts, tags={"device": "cpu", "task": "classification"})


def fake_run_setting(cfg: RunConfig, *, out_dir: Path, progress: bool = True, on_step=None) -> RunResult:
    """Behaves by variant name: fail / diverge / crash; env FAKE_INTERRUPT_AT, FAKE_SLEEP_AT."""
    CALLS.append(cfg.config_hash())
    v = cfg.variant
    if os.environ.get("FAKE_INTERRUPT_AT") == v:
        raise KeyboardInterrupt
    if os.environ.get("FAKE_SLEEP_AT") == v:
        time.sleep(120)
    if v == "fail":
        raise GistressError("fake setting failed on purpose", "nothing to fix")
    if v == "diverge":
        raise DivergenceError("matching loss is NaN at step 3", step=3)
    if v == "crash":
        raise RuntimeError("unexpected bug")
    for step in range(0, cfg.attack.iterations, cfg.attack.log_interval):
        if on_step is not None:
            on_step(step, {"matching_loss": 1.0 / (step + 1), "tv": 0.1, "psnr": 5.0 + step})
    return fake_result(cfg, out_dir)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def children(uri: str, study: str) -> list:
    from suite.execution.tracking import setting_runs

    return setting_runs(study, uri)


def parents(uri: str, study: str) -> list:
    c = client(uri)
    exp = c.get_experiment_by_name(study)
    return c.search_runs([exp.experiment_id], filter_string="tags.`gistress.kind` = 'study'")


SMALL = """
name: small
base:
  attack: {preset: ig, iterations: 4, log_every: 2}
grid:
  variant: [alpha, beta]
seeds: [0]
images: [astronaut, chelsea]
profiles:
  smoke: {attack.iterations: 2}
  paper: {attack.iterations: 24000}
"""


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------
# spec validation
# ---------------------------------------------------------------------------------------------


def test_unknown_top_level_key_names_key_file_line_and_nearest(tmp_path):
    p = write(tmp_path, "name: x\ngird:\n  variant: [lenet]\n", "x.yaml")
    with pytest.raises(GistressError) as e:
        expand(p)
    msg = e.value.one_line()
    assert "unknown key 'gird'" in msg and f"{p}:2" in msg and "did you mean 'grid'?" in msg
    assert "\n" not in msg


def test_unknown_nested_keys_name_nearest(tmp_path):
    p = write(tmp_path, "name: x\nbase:\n  variant: lenet\n  attack: {iteratons: 3}\n")
    with pytest.raises(GistressError, match=r"unknown key 'attack.iteratons'.*did you mean 'attack.iterations'"):
        expand(p)
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\ngrid:\n  threat.bn_mod: [train]\n")
    with pytest.raises(GistressError, match=r"'threat.bn_mod'.*:4.*did you mean 'threat.bn_mode'"):
        expand(p)
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\nexecutor: {slurm_partiton: gpu}\n")
    with pytest.raises(GistressError, match=r"unknown key 'executor.slurm_partiton'.*did you mean 'slurm_partition'"):
        expand(p)
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\nprofiles:\n  smoke: {attack.iters: 2}\n")
    with pytest.raises(GistressError, match=r"'attack.iters'.*profile 'smoke'.*did you mean 'attack.iterations'"):
        expand(p, "smoke")


def test_free_form_option_dicts_accept_any_key(tmp_path):
    p = write(tmp_path, "name: x\nbase: {variant: resnet18}\ngrid:\n  variant_options.cut_skips: [[0], all]\n")
    cfgs = expand(p)
    assert [c.variant_options["cut_skips"] for c in cfgs] == [[0], "all"]


def test_wrong_types_are_one_line_errors(tmp_path):
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\nseeds: [zero]\n")
    with pytest.raises(GistressError) as e:
        expand(p)
    assert "seeds.0" in e.value.message and str(p) in e.value.message and "'zero'" in e.value.message
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\ngrid:\n  attack.iterations: [5, lots]\n")
    with pytest.raises(GistressError) as e:
        expand(p)
    msg = e.value.one_line()
    assert "setting 2" in msg and "attack.iterations" in msg and "'lots'" in msg and "\n" not in msg
    p = write(tmp_path, "name: x\ngrid: {variant: lenet}\n")
    with pytest.raises(GistressError, match="grid.variant.*valid list"):
        expand(p)


def test_missing_variant_is_named(tmp_path):
    p = write(tmp_path, "name: x\ngrid: {size: [32]}\n")
    with pytest.raises(GistressError, match=r"setting 1 .*variant: Field required"):
        expand(p)


def test_empty_axis_and_zip_mismatch(tmp_path):
    p = write(tmp_path, "name: x\nbase: {variant: lenet}\ngrid:\n  seed: []\n")
    with pytest.raises(GistressError, match=r"grid axis 'seed' in .*:4 is empty"):
        expand(p)
    p = write(tmp_path, "name: x\nzip:\n  variant: [a, b]\n  size: [32]\n")
    with pytest.raises(GistressError, match=r"zip axes in .* different lengths \(variant: 2, size: 1\)"):
        expand(p)
    prof = "name: x\nbase: {variant: a}\nzip: {size: [32, 64], seed: [0, 1]}\nprofiles:\n  s: {zip: {size: [8]}}\n"
    with pytest.raises(GistressError, match=r"profile 's'.*different lengths"):
        expand(write(tmp_path, prof), "s")


def test_malformed_yaml_is_one_line_with_file_and_line(tmp_path):
    p = write(tmp_path, "name: x\ngrid:\n  variant: [lenet\n  size: 3\n", "bad.yaml")
    with pytest.raises(GistressError) as e:
        expand(p)
    msg = e.value.one_line()
    assert msg.startswith(f"malformed YAML in {p}:") and "\n" not in msg
    line = int(msg.split(f"{p}:")[1].split(":")[0])
    assert 3 <= line <= 4


def test_profile_errors(tmp_path):
    p = write(tmp_path, SMALL)
    with pytest.raises(GistressError, match=r"profile 'smok' is not in .*did you mean 'smoke'"):
        expand(p, "smok")
    p = write(tmp_path, SMALL.replace("smoke: {attack.iterations: 2}", "smoke: {grid: {varint: [alpha]}}"))
    with pytest.raises(GistressError, match=r"axis 'varint'.*did you mean 'variant'"):
        expand(p, "smoke")


def test_missing_spec_file(tmp_path):
    with pytest.raises(GistressError, match="not found"):
        expand(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------


def test_expansion_counts_grid_zip_seeds_images(tmp_path):
    p = write(tmp_path, """
name: count
base: {attack: {iterations: 3}}
grid:
  threat.bn_mode: [train, eval]
  threat.bn_stats: [none, running, exact]
zip:
  variant: [resnet18, preact_resnet18]
  variant_options: [{stem: cifar}, {stem: cifar, width: 128}]
seeds: [0, 1]
images: [astronaut, chelsea, [coffee, rocket]]
""")
    settings = expand_settings(p)
    assert len(settings) == 2 * 3 * 2 * 2 * 3
    assert len({s.config_hash for s in settings}) == len(settings)
    batch = [s for s in settings if s.image == "coffee+rocket"]
    assert batch and all(s.config.images == ["coffee", "rocket"] for s in batch)
    s = settings[0]
    assert s.name == "resnet18 bn=train bn_stats=none seed=0 img=astronaut"
    assert set(s.axes) == {"threat.bn_mode", "threat.bn_stats", "variant", "variant_options"}
    wide = [x for x in settings if x.config.variant == "preact_resnet18"]
    assert all(x.config.variant_options == {"stem": "cifar", "width": 128} for x in wide)


def test_precedence_base_grid_profile_set_and_dedupe(tmp_path):
    p = write(tmp_path, """
name: prec
base: {variant: lenet, size: 16, attack: {iterations: 7, tv: 0.5}, variant_options: {num_classes: 10}}
grid:
  size: [24, 32]
  variant_options.num_classes: [10, 100]
profiles:
  smoke: {size: 8, seeds: [3], images: [rocket]}
""")
    cfgs = expand(p)
    assert sorted({c.size for c in cfgs}) == [24, 32] and {c.attack.tv for c in cfgs} == {0.5}
    assert {c.variant_options["num_classes"] for c in cfgs} == {10, 100}
    smoke = expand(p, "smoke")
    # the profile pins size, so the two size points collapse: duplicates run once
    assert len(smoke) == 2 and {c.size for c in smoke} == {8} and {c.seed for c in smoke} == {3}
    assert {tuple(c.images) for c in smoke} == {("rocket",)}
    final = expand(p, "smoke", ["size=12", "attack.iterations=50", "seeds=[4, 5]", "images=chelsea"])
    assert {c.size for c in final} == {12} and {c.attack.iterations for c in final} == {50}
    assert isinstance(final[0].attack.iterations, int)
    assert sorted({c.seed for c in final}) == [4, 5] and {tuple(c.images) for c in final} == {("chelsea",)}


def test_parse_sets():
    over, study = parse_sets(["attack.iterations=50", "threat.bn_mode=eval", "variant_options={stem: cifar}",
                              "attack.noise_p=0.75", "weights=file:/a=b.pt", "seeds=[0,1]"])
    assert over["attack.iterations"] == 50 and over["threat.bn_mode"] == "eval"
    assert over["variant_options"] == {"stem": "cifar"} and over["attack.noise_p"] == 0.75
    assert over["weights"] == "file:/a=b.pt" and study == {"seeds": [0, 1]}
    with pytest.raises(GistressError, match=r"unknown key 'attack.iteration'.*did you mean 'attack.iterations'"):
        parse_sets(["attack.iteration=5"])
    with pytest.raises(GistressError, match="not key=value"):
        parse_sets(["attack.iterations"])
    with pytest.raises(GistressError, match=r"did you mean 'threat.bn_mode'"):
        parse_sets(["threat.bnmode=train"])


def test_label_axes_drop_implied_ones(tmp_path):
    p = write(tmp_path, """
name: lab
zip:
  variant: [resnet18, yolov8n]
  size: [32, 128]
  images: [[astronaut], [bus]]
""")
    names = [s.name for s in expand_settings(p)]
    assert names == ["resnet18", "yolov8n"]  # the image follows from the variant; one seed


# ---------------------------------------------------------------------------------------------
# dry run and the CLI module
# ---------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from suite.cli.commands import study as cmd

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cmd.add_parser(sub)
    return cmd.run(parser.parse_args(["study", *argv]))


def test_dry_run_prints_settings_and_never_touches_mlflow(tmp_path, monkeypatch, capsys):
    spec = write(tmp_path, SMALL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    assert _cli([str(spec), "--profile", "smoke", "--dry-run", "--json", "--set", "attack.iterations=3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-2] == "4 setting(s)"
    assert out[0].startswith("[1] alpha img=astronaut")
    data = json.loads(out[-1])
    assert data["n_settings"] == 4 and data["settings"][0]["config"]["attack"]["iterations"] == 3
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "gistress-out").exists()


def test_cli_errors_are_gistress_errors(tmp_path):
    spec = write(tmp_path, SMALL)
    with pytest.raises(GistressError, match="unknown key 'atack.iterations'"):
        _cli([str(spec), "--dry-run", "--set", "atack.iterations=3"])


# ---------------------------------------------------------------------------------------------
# running, resume, failures, interrupts (fake runner, in-process)
# ---------------------------------------------------------------------------------------------


def test_run_study_in_process(tmp_path, uri, capsys):
    spec = write(tmp_path, SMALL)
    out = run_study(spec, profile="smoke", tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE, json_out=True)
    assert out.exit_code == 0 and out.counts == {"FINISHED": 4}
    kids = children(uri, "small")
    assert len(kids) == 4 and {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags["mlflow.parentRunId"] for k in kids} == {out.parent_run_id}
    # names: what differs between settings, nothing constant (one seed: no seed=0)
    assert {k.info.run_name for k in kids} == {f"{v} img={i}" for v in ("alpha", "beta")
                                               for i in ("astronaut", "chelsea")}
    parent = client(uri).get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["n_finished"] == "4"
    arts = {a.path for a in client(uri).list_artifacts(out.parent_run_id)}
    assert {"summary.csv", "summary_table.json", "spec.yaml", "settings.json", "images"} <= arts
    figure = {a.path for a in client(uri).list_artifacts(out.parent_run_id, "images")}
    assert figure == {"images/study_comparison_target_control_reconstruction.png"}
    table = json.loads(Path(client(uri).download_artifacts(out.parent_run_id, "summary_table.json",
                                                           str(tmp_path / "dl"))).read_text())
    assert table["columns"][:4] == ["setting", "psnr", "control_psnr", "gain_psnr"]
    assert sorted(row[0] for row in table["data"]) == sorted(k.info.run_name for k in kids)
    # the saved runs-table view: these four children, their scores and the varying axes as columns
    exp = client(uri).get_experiment(out.experiment_id)
    view = json.loads(exp.tags["mlflow.sharedViewState.gistress"])
    assert view["searchFilter"].startswith("attributes.run_id IN (")
    assert {k.info.run_id for k in kids} == set(view["searchFilter"].split("'")[1::2])
    assert view["selectedColumns"][:3] == ["metrics.`score/psnr`", "metrics.`control/psnr`", "metrics.`gain/psnr`"]
    assert {"tags.`axis.variant`", "tags.`image`"} <= set(view["selectedColumns"])
    assert view["columnOrder"][0] == "attributes.`Run Name`" and view["orderByKey"] == "metrics.`gain/psnr`"
    csv_lines = out.csv_path.read_text().splitlines()
    assert csv_lines[0].startswith("variant,seed,image,psnr,ssim,lpips,brr,content_gain,leaked,control_psnr,gain_psnr,"
                                   "status")
    assert len(csv_lines) == 5 and ",missing," in csv_lines[1]
    assert out.figure_path.is_file() and out.figure_path.stat().st_size > 1000
    printed = capsys.readouterr().out.strip().splitlines()
    last = json.loads(printed[-1])
    assert last["counts"] == {"FINISHED": 4} and last["parent_run_id"] == out.parent_run_id
    assert any("figure:" in line for line in printed) and any("gistress ui" in line for line in printed)
    link = f"/#/experiments/{out.experiment_id}/runs?viewStateShareKey=gistress&workflowType=machine_learning"
    assert any(line.startswith("compare runs:") and line.endswith(link) for line in printed)


def test_resume_reruns_only_missing_and_failed(tmp_path, uri):
    spec = write(tmp_path, SMALL)
    kw = dict(profile="smoke", tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE)
    first = run_study(spec, **kw)
    kids = sorted(children(uri, "small"), key=lambda r: r.info.run_name)
    c = client(uri)
    c.set_terminated(kids[0].info.run_id, "FAILED")   # as if it had failed
    c.delete_run(kids[1].info.run_id)                 # as if someone deleted it
    CALLS.clear()
    second = run_study(spec, **kw)
    rerun = {kids[0].data.tags["config_hash"], kids[1].data.tags["config_hash"]}
    assert set(CALLS) == rerun and len(CALLS) == 2
    assert second.exit_code == 0 and second.counts == {"FINISHED": 4}
    assert sum(r["reused"] for r in second.rows) == 2
    # reused rows read their scores back from MLflow's names into the suite's keys
    assert all(r["metrics"]["psnr"] >= 10 and "gain_psnr" in r["metrics"] for r in second.rows if r["reused"])
    active = children(uri, "small")
    finished = [r for r in active if r.info.status == "FINISHED"]
    assert len(active) == 5 and len(finished) == 4  # 3 left (one FAILED) + 2 new; the deleted one is gone
    assert len({r.data.tags["config_hash"] for r in finished}) == 4  # never a duplicate FINISHED
    CALLS.clear()
    third = run_study(spec, **kw)
    assert CALLS == [] and third.counts == {"FINISHED": 4} and len(children(uri, "small")) == 5
    assert first.parent_run_id != second.parent_run_id != third.parent_run_id
    CALLS.clear()
    run_study(spec, fresh=True, **kw)
    assert len(CALLS) == 4


def test_resume_reads_runs_logged_before_the_metric_renaming(tmp_path, uri):
    """A store from before metrics were grouped (psnr, control_psnr) still resumes and summarizes."""
    from mlflow.entities import Metric

    from suite.execution.tracking import create_setting_run

    spec = write(tmp_path, SMALL)
    (first, *_) = expand_settings(spec, "smoke")
    rid = create_setting_run(first.config, experiment="small", tracking_uri=uri,
                             extra_tags={"study": "small", "profile": "smoke"})
    old = {"psnr": 12.5, "ssim": 0.4, "brr": 0.0, "control_psnr": 9.5, "gain_psnr": 3.0}
    client(uri).log_batch(rid, metrics=[Metric(k, v, 0, 2) for k, v in old.items()])
    client(uri).set_terminated(rid, "FINISHED")
    CALLS.clear()
    out = run_study(spec, profile="smoke", tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE)
    assert first.config_hash not in CALLS and len(CALLS) == 3
    row = next(r for r in out.rows if r["reused"])
    assert row["metrics"]["psnr"] == 12.5 and row["metrics"]["gain_psnr"] == 3.0
    assert ",12.50,0.400," in out.csv_path.read_text()


def test_view_state_of_a_large_study_filters_by_its_tags():
    """Past what an experiment tag holds, the view selects the study's runs by tags instead of ids."""
    from suite.execution.mlflow_ui import view_state

    small = view_state(["a" * 32, "b" * 32], ["axis.attack.tv"], study="s", profile="smoke", has_control=False)
    assert small["searchFilter"] == f"attributes.run_id IN ('{'a' * 32}','{'b' * 32}')"
    assert small["selectedColumns"] == ["metrics.`score/psnr`", "metrics.`score/content_gain`", "metrics.`score/leaked`",
                                        "metrics.`score/ssim`", "metrics.`score/lpips`", "metrics.`score/brr`",
                                        "tags.`axis.attack.tv`"]  # no control: no gain
    assert small["orderByKey"] == "metrics.`score/psnr`"
    large = view_state([f"{i:032x}" for i in range(600)], [], study="s", profile=None, has_control=True)
    assert large["searchFilter"] == ("tags.`study` = 's' AND tags.`profile` = 'none' "
                                     "AND tags.`gistress.kind` = 'setting'")
    assert len(json.dumps(large)) < 20000  # MLflow's limit for an experiment tag


def test_run_names_show_only_what_varies(tmp_path):
    seeds = write(tmp_path, "name: a\nbase: {variant: lenet}\ngrid: {attack.tv: [0.0, 0.2]}\nseeds: [0, 1]\n", "a.yaml")
    assert [s.name for s in expand_settings(seeds)] == ["tv=0 seed=0", "tv=0 seed=1", "tv=0.2 seed=0", "tv=0.2 seed=1"]
    alone = write(tmp_path, "name: b\nbase: {variant: lenet}\n", "b.yaml")
    assert [s.name for s in expand_settings(alone)] == ["lenet"]  # nothing varies: the variant names it
    cut = write(tmp_path, "name: c\nbase: {variant: resnet18}\ngrid: {variant_options.cut_skips: [none, [0]]}\n"
                          "images: [astronaut, chelsea]\n", "c.yaml")
    assert [s.name for s in expand_settings(cut)] == ["cut_skips=none img=astronaut", "cut_skips=none img=chelsea",
                                                     "cut_skips=0 img=astronaut", "cut_skips=0 img=chelsea"]


def test_failing_settings_are_failed_and_the_study_continues(tmp_path, uri):
    spec = write(tmp_path, SMALL.replace("[alpha, beta]", "[fail, diverge, crash, ok]").replace(
        "images: [astronaut, chelsea]", "images: [astronaut]"))
    out = run_study(spec, tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE)
    assert out.exit_code == 1
    by = {r.data.tags["variant"]: r for r in children(uri, "small")}
    assert by["ok"].info.status == "FINISHED"
    assert by["fail"].info.status == "FAILED"
    assert by["fail"].data.tags["error"] == "fake setting failed on purpose (fix: nothing to fix)"
    assert by["diverge"].info.status == "FAILED" and by["diverge"].data.tags["failed_step"] == "3"
    assert by["crash"].info.status == "FAILED" and "RuntimeError: unexpected bug" in by["crash"].data.tags["error"]
    assert "error.txt" in {a.path for a in client(uri).list_artifacts(by["crash"].info.run_id)}
    assert client(uri).get_run(out.parent_run_id).info.status == "FINISHED"
    statuses = {r["variant"]: r["status"] for r in out.rows}
    assert statuses == {"fail": "FAILED", "diverge": "FAILED", "crash": "FAILED", "ok": "FINISHED"}
    assert "FAILED" in out.csv_path.read_text()


def test_ctrl_c_kills_child_and_parent_and_rerun_completes(tmp_path, uri, monkeypatch):
    spec = write(tmp_path, SMALL.replace("[alpha, beta]", "[alpha, beta, gamma]").replace(
        "images: [astronaut, chelsea]", "images: [astronaut]"))
    kw = dict(tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE)
    monkeypatch.setenv("FAKE_INTERRUPT_AT", "beta")
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, **kw)
    by = {r.data.tags["variant"]: r for r in children(uri, "small")}
    assert set(by) == {"alpha", "beta"}  # gamma never started
    assert by["alpha"].info.status == "FINISHED" and by["beta"].info.status == "KILLED"
    (parent,) = parents(uri, "small")
    assert parent.info.status == "KILLED"
    summary = json.loads((tmp_path / "out" / "small" / "summary.json").read_text())
    assert [r["status"] for r in summary["rows"]] == ["FINISHED", "KILLED", "PENDING"]
    monkeypatch.delenv("FAKE_INTERRUPT_AT")
    CALLS.clear()
    out = run_study(spec, **kw)
    assert out.exit_code == 0 and len(CALLS) == 2
    finished = [r for r in children(uri, "small") if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["variant"] for r in finished) == ["alpha", "beta", "gamma"]
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in children(uri, "small"))


def test_sigterm_kills_child_and_parent(tmp_path):
    """A real SIGTERM to a study process: child and parent KILLED, exit 130, a re-run finishes."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = write(tmp_path, SMALL.replace("[alpha, beta]", "[alpha, beta, gamma]").replace(
        "images: [astronaut, chelsea]", "images: [astronaut]"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "FAKE_SLEEP_AT": "beta"}
    client(uri).search_experiments()  # create the store first: two processes migrating one sqlite file race
    proc = subprocess.Popen(
        [sys.executable, "-m", "suite.cli", "study", str(spec), "--tracking-uri", uri, "--out",
         str(tmp_path / "out"), "--runner", FAKE], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            running = [r for r in children(uri, "small") if r.data.tags.get("variant") == "beta"]
            if running and running[0].info.status == "RUNNING":
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("beta never started")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    by = {r.data.tags["variant"]: r for r in children(uri, "small")}
    assert by["alpha"].info.status == "FINISHED"
    assert by["beta"].info.status == "KILLED" and by["beta"].data.tags["error"] == "terminated (SIGTERM)"
    assert "gamma" not in by
    assert parents(uri, "small")[0].info.status == "KILLED"
    out = run_study(spec, tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE)
    assert out.counts == {"FINISHED": 3}
    finished = [r for r in children(uri, "small") if r.info.status == "FINISHED"]
    assert len(finished) == 3


def test_slurm_needs_http_tracking_and_sbatch(tmp_path, uri):
    from suite.execution.executors import check_tracking, plan
    from suite.studies import ExecutorBlock

    if not any((Path(d) / "sbatch").exists() for d in os.environ.get("PATH", "").split(os.pathsep)):
        with pytest.raises(GistressError, match="no sbatch"):
            plan("slurm")
    block = ExecutorBlock(slurm_partition="gpu", gpus_per_node=1, timeout_min=90, slurm_array_parallelism=4)
    from suite.execution.executors import Plan, slurm_parameters

    params = slurm_parameters({**block.model_dump(exclude_none=True), "timeout_min": 30})
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 30 and params["nodes"] == 1
    import submitit

    # submitit validates slurm parameter names even off-cluster: a misspelt one would raise here
    submitit.AutoExecutor(folder=str(tmp_path / "sub"), cluster="debug").update_parameters(**params)
    with pytest.raises(GistressError, match="http tracking server"):
        check_tracking(Plan(kind="slurm", cluster="slurm", parameters=params), uri)
    check_tracking(Plan(kind="slurm", cluster="slurm"), "http://127.0.0.1:5000")  # fine
    with pytest.raises(GistressError, match="unknown executor 'slrum'.*slurm"):
        plan("slrum")
    with pytest.raises(GistressError, match="--workers 0"):
        plan("local", workers=0)


def test_ui_command(tmp_path, capsys):
    from suite.cli.commands import ui

    argv = ui.server_argv(f"sqlite:///{tmp_path / 'mlflow.db'}", port=5123)
    assert argv[1:4] == ["-m", "mlflow", "server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "5123"
    assert "--allowed-hosts" not in argv
    args = argparse.Namespace(port=5000, host="127.0.0.1", tracking_uri="http://10.0.0.1:5000")
    assert ui.run(args) == 0 and "already a server: open http://10.0.0.1:5000" in capsys.readouterr().out
    args.tracking_uri = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(GistressError, match="no MLflow database"):
        ui.run(args)


def test_figure_with_failed_and_pending_rows(tmp_path):
    from suite.reports.figures import study_figure, summary_records

    png = tmp_path / "t.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(png)
    rows = [
        {"row_label": "a seed=0", "image": "x", "status": "FINISHED", "metrics": {"psnr": 20.0, "lpips": 0.05},
         "artifacts": {"target": str(png), "reconstruction": str(png)}, "axes": {"bn": "train"}, "seed": 0,
         "variant": "a", "run_id": "r1"},
        {"row_label": "b seed=0", "image": "x", "status": "FAILED", "metrics": {}, "artifacts": {},
         "axes": {"bn": "eval"}, "seed": 0, "variant": "b", "error": "boom"},
        {"row_label": "b seed=0", "image": "y", "status": "PENDING", "metrics": {}, "artifacts": {},
         "axes": {"bn": "eval"}, "seed": 0, "variant": "b"},
    ]
    path = study_figure(rows, tmp_path / "f.png", title="t")
    assert path.is_file()
    recs = summary_records(rows)
    assert recs[0]["lpips"] == "0.050" and recs[1]["lpips"] == "" and recs[1]["error"] == "boom"
    assert recs[0]["bn"] == "train" and recs[0]["control_psnr"] == ""


# ---------------------------------------------------------------------------------------------
# scale-out: submitit LocalExecutor workers logging to a real mlflow server
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (tmp store), stopped afterwards."""
    import urllib.request

    from suite.cli.commands.ui import server_argv, server_env, stop_group

    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    log = (store / "server.log").open("w")
    proc = subprocess.Popen(server_argv(f"sqlite:///{store / 'mlflow.db'}", port=port), cwd=store,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail("mlflow server did not start: " + (store / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url
    finally:
        try:
            stop_group(proc)  # the group we started (server + its workers), as `gistress ui` does
        finally:
            log.close()


@pytest.mark.slow
def test_submitit_local_workers_log_to_one_server(tmp_path, mlflow_server, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    spec = write(tmp_path, SMALL.replace("[alpha, beta]", "[alpha, beta, fail]").replace(
        "images: [astronaut, chelsea]", "images: [astronaut]"))
    out = run_study(spec, profile="smoke", executor="local", workers=2, tracking_uri=mlflow_server,
                    out_root=tmp_path / "out", runner=FAKE)
    assert (tmp_path / "out" / "small" / "submitit").is_dir()  # really went through submitit
    c = client(mlflow_server)
    assert c.get_run(out.parent_run_id).info.status == "FINISHED"
    by = {r.data.tags["variant"]: r for r in children(mlflow_server, "small")}
    assert by["alpha"].info.status == "FINISHED" and by["beta"].info.status == "FINISHED"
    assert by["fail"].info.status == "FAILED" and "on purpose" in by["fail"].data.tags["error"]
    assert {r.data.tags["mlflow.parentRunId"] for r in by.values()} == {out.parent_run_id}
    assert {r["status"] for r in out.rows} == {"FINISHED", "FAILED"} and out.exit_code == 1
    run = c.get_run(by["alpha"].info.run_id)
    assert run.data.metrics["score/psnr"] > 0 and run.data.params["variant"] == "alpha"
    assert "figures" in {a.path for a in c.list_artifacts(run.info.run_id)}
    # steps logged from the worker process
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss/matching"))
    assert steps == [0, 2]  # step 0 from on_step (iterations=2, log_every=2), final value at step 2
    # resume through the server: nothing finished re-runs
    again = run_study(spec, profile="smoke", executor="local", workers=2, tracking_uri=mlflow_server,
                      out_root=tmp_path / "out", runner=FAKE)
    assert sum(r["reused"] for r in again.rows) == 2
    finished = [r for r in children(mlflow_server, "small") if r.info.status == "FINISHED"]
    assert len(finished) == 2


# ---------------------------------------------------------------------------------------------
# the shipped specs, and the real runner end to end
# ---------------------------------------------------------------------------------------------

SPECS = sorted((REPO / "runs").glob("*.yaml"))


def test_shipped_specs_exist():
    names = {p.name for p in SPECS}
    assert {"quickstart.yaml", "fig1_modern_224.yaml", "fig2_resnet_bn.yaml", "fig4_noisy_init.yaml",
            "fig5_yolo.yaml", "dlg_lenet.yaml", "microdesign_convnet.yaml", "skip_cuts_resnet.yaml"} <= names


def test_leak_sentence_names_which_settings_leaked():
    from suite.studies import leak_sentence

    rows = [
        {"variant": "lenet", "name": "lenet bn=train", "axes": {"variant": "lenet"}, "seed": 0, "image": "astronaut",
         "status": "FINISHED", "metrics": {"psnr": 41.2, "brr": 1.0, "leaked": 1.0}, "leak_rule": "RULE"},
        # the verdict is the run's own leaked flag, never re-derived from another column
        {"variant": "resnet18", "axes": {"variant": "resnet18"}, "seed": 0, "image": "astronaut",
         "status": "FINISHED", "metrics": {"psnr": 9.1, "brr": 1.0, "leaked": 0.0}, "leak_rule": "RULE"},
        {"variant": "yolov8n", "axes": {"variant": "yolov8n"}, "seed": 0, "image": "bus", "status": "FAILED",
         "metrics": {}},
    ]
    text = leak_sentence(rows)
    assert text == "leaked: lenet bn=train (41.20 dB). did not leak: resnet18 (9.10 dB). leak rule: RULE."
    assert leak_sentence(rows[1:]) == "no setting leaked. did not leak: resnet18 (9.10 dB). leak rule: RULE."
    assert leak_sentence(rows[2:]) == ""


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_is_valid_with_smoke_and_paper(spec):
    text = spec.read_text()
    assert text.startswith("#"), "each spec starts with a comment naming its figure/table"
    parsed = parse_spec(text, str(spec))
    assert {"smoke", "paper"} <= set(parsed.profiles)
    smoke = expand_settings(parsed, "smoke")
    paper = expand_settings(parsed, "paper")
    assert 1 <= len(smoke) <= 16
    assert len(paper) >= len(smoke)
    assert len({s.seed for s in smoke}) == 1 and len({s.image for s in smoke}) <= 2
    # CI-sized: Adam budgets up to 60 steps; DLG's L-BFGS needs ~100 steps for its textbook leak
    assert all(s.config.attack.iterations <= (100 if s.config.attack.optimizer == "lbfgs" else 60) for s in smoke)
    assert max(s.config.attack.iterations for s in paper) >= 300


def test_real_runner_tiny_setting_end_to_end(tmp_path, uri):
    spec = write(tmp_path, """
name: tiny_real
base:
  variant: lenet
  size: 32
  attack: {preset: dlg, iterations: 5, log_every: 2}
images: [astronaut]
""")
    out = run_study(spec, tracking_uri=uri, out_root=tmp_path / "out")
    assert out.counts == {"FINISHED": 1}, out.rows
    (kid,) = children(uri, "tiny_real")
    c = client(uri)
    assert kid.info.status == "FINISHED" and "score/psnr" in kid.data.metrics
    assert len(c.get_metric_history(kid.info.run_id, "loss/matching")) >= 2
    images = {Path(a.path).name for a in c.list_artifacts(kid.info.run_id, "figures")}
    # 32 px images also come 8x larger (nearest neighbour), and the grid says what it holds
    assert {"target.png", "reconstruction.png", "reconstruction_x8.png", "target_x8.png",
            "comparison_target_init_reconstruction.png"} <= images
    from PIL import Image

    with Image.open(c.download_artifacts(kid.info.run_id, "figures/reconstruction_x8.png", str(tmp_path))) as im:
        assert im.size == (256, 256)
    # MLflow images for its image grids: per key, the image steps (percent of the budget) and 100
    # (the scored images), nearest-neighbour enlarged to 256 px
    logged: dict[str, set[int]] = {}
    for a in c.list_artifacts(kid.info.run_id, "images"):
        key, _, step, *_ = Path(a.path).stem.split("+")
        logged.setdefault(key, set()).add(int(step))
    assert set(logged) == {"target", "start", "reconstruction"}  # no control in this setting
    assert logged["reconstruction"] == logged["target"] and {0, 100} <= logged["reconstruction"]
    assert len(logged["reconstruction"]) <= 9
    final = next(a.path for a in c.list_artifacts(kid.info.run_id, "images")
                 if a.path.split("/")[-1].startswith("reconstruction+step+100+") and a.path.endswith(".png"))
    with Image.open(c.download_artifacts(kid.info.run_id, final, str(tmp_path))) as im:
        assert im.size == (256, 256)
    assert out.figure_path.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_spec_smoke_profile_runs(spec, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_study(spec, profile="smoke", tracking_uri=uri, out_root=tmp_path / "out")
    bad = [(r["name"], r["status"], r.get("error")) for r in out.rows if r["status"] != "FINISHED"]
    assert not bad
    assert out.figure_path is not None and out.figure_path.is_file()
    if spec.stem == "quickstart":  # the demo shows a textbook leak and a modern architecture leaking
        by_variant = {r["variant"]: r["metrics"] for r in out.rows}
        assert by_variant["vit_b_16"]["psnr"] > 60 and by_variant["vit_b_16"]["brr"] == 1.0
        assert by_variant["vit_b_16"]["closed_form_residual"] < 1e-5
        assert by_variant["lenet"]["brr"] == 1.0


@pytest.mark.parametrize("name", ["fig1_modern_224", "fig2_resnet_bn", "fig4_noisy_init", "fig5_yolo"])
def test_figure_specs_have_a_cpu_profile_with_the_control(name):
    parsed = parse_spec((REPO / "runs" / f"{name}.yaml").read_text(), name)
    cpu = expand_settings(parsed, "cpu")
    smoke = expand_settings(parsed, "smoke")
    assert all(s.config.attack.control or s.config.attack.init == "noisy_target" for s in cpu)
    assert min(s.config.attack.iterations for s in cpu) >= 300 > max(s.config.attack.iterations for s in smoke)
    assert len({s.image for s in cpu}) == 1


def test_profile_zip_over_grid_axes_steps_them_together(tmp_path):
    p = write(tmp_path, """
name: pairs
base: {attack: {iterations: 3}, size: 32}
grid:
  variant: [resnet18, preact_resnet18, convnet]
  threat.bn_mode: [eval, train]
  seed: [0, 1]
profiles:
  cpu:
    zip: {variant: [resnet18, convnet], threat.bn_mode: [train, eval]}
""")
    assert len(expand_settings(p)) == 3 * 2 * 2
    cpu = expand_settings(p, "cpu")
    pairs = sorted({(s.config.variant, s.config.threat.bn_mode) for s in cpu})
    assert pairs == [("convnet", "eval"), ("resnet18", "train")]
    assert len(cpu) == 2 * 2  # the remaining grid axis (seed) still crosses the pairs
    bad = write(tmp_path, p.read_text().replace("[resnet18, convnet], threat", "[resnet18], threat"))
    with pytest.raises(GistressError, match=r"zip axes in .*spec.yaml:\d+ \(profile 'cpu' zip\) have different"):
        expand(bad)  # refused when the spec loads, naming the profile's line


def test_profile_zip_mixing_grid_and_zip_axes_is_refused(tmp_path):
    p = write(tmp_path, """
name: mixed
base: {attack: {iterations: 3}, size: 32}
grid: {threat.bn_mode: [eval, train]}
zip: {variant: [resnet18, convnet], seed: [0, 1]}
profiles:
  cpu: {zip: {variant: [convnet], threat.bn_mode: [train]}}
""")
    with pytest.raises(GistressError, match=r"mixes grid axes \(threat.bn_mode\) with zip axes"):
        expand(p, "cpu")
