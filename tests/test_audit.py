"""``gistress audit``: the battery end to end (classifier and YOLO), the verdict logic, failing and
interrupted levels, and bad input that must leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

import suite.audit as audit
from suite.cli.main import main
from suite.config import RunConfig
from suite.data.batch import Batch
from suite.execution.runner import leak_rule
from suite.results import Reconstruction, RunResult, Scores
from suite.scoring.metrics import score

HEADERS = [h for _, h in audit.COLUMNS]
KEYS = [k for k, _ in audit.COLUMNS]



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module's audits (creating a store costs seconds), in a temp dir."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _output(capsys) -> tuple[str, dict]:
    """Everything printed, and the --json summary (the last line)."""
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


def _runs(store, parent_run_id):
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return client, parent, children


def _check_report_files(out):
    for name in ("report.md", "report.html", "verdict.csv", "verdict.json", "audit.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for header in HEADERS:
        assert f"| {header} " in md or f"| {header} |" in md, header
        assert f"<th>{header}</th>" in html, header
    assert "data:image/png;base64," in html  # images embedded: the page stands alone
    figures = [line for line in md.splitlines() if line.startswith("![")]
    assert figures  # best and median reconstructions per level, beside the report
    for line in figures:
        assert (out / line.split("](", 1)[1].rstrip(")")).is_file(), line
    header_line = (out / "verdict.csv").read_text().splitlines()[0].split(",")
    assert header_line[: len(KEYS)] == KEYS
    return md, json.loads((out / "verdict.json").read_text())


def test_classifier_quick_audit_runs_the_whole_battery(workdir, store, capsys):
    rc = main(["audit", "--variant", "resnet18", "--stem", "cifar", "--opt", "width=8", "--image", "astronaut",
               "--level", "quick", "--iterations", "4", "--out", "out", "--json", "--quiet", "--tracking-uri", store])
    printed, summary = _output(capsys)
    assert rc == 0 and summary["exit_code"] == 0
    md, verdict = _check_report_files(workdir / "out")
    lines = printed.splitlines()  # the verdict table the terminal shows: a header, a row per level
    start = next(i for i, line in enumerate(lines) if line.startswith("#  threat level"))
    assert [line.split()[0] for line in lines[start + 1 : start + 1 + len(audit.BATTERY)]] == \
        [str(n) for n in range(1, len(audit.BATTERY) + 1)]

    # the verdict table: every battery level, in battery order, with every column
    assert verdict["columns"] == KEYS
    rows = verdict["rows"]
    assert [r["key"] for r in rows] == [lv.key for lv in audit.BATTERY]
    # a 3x3 convolution first: no closed form applies, and the level says why instead of running
    assert rows[-1]["key"] == "closed_form" and rows[-1]["status"].startswith(
        "not applicable: neither closed form fits the first layer (net.conv1: a 3x3 convolution")
    assert "not applicable: neither closed form fits" in printed
    rows = rows[:-1]
    for r in rows:
        assert set(KEYS) <= set(r) and r["status"] == "finished"
        assert r["lpips"] == "missing" or 0 <= r["lpips"] <= 1  # never a silent 0 for "missing"
        assert isinstance(r["leaked"], bool) and 0 <= r["brr"] <= 1 and 0 <= r["wsrr"] <= 1
    by_key = {r["key"]: r for r in rows}
    assert by_key["realistic"]["assumption_level"] == 1 and not by_key["realistic"]["upper_bound"]
    assert by_key["bn_running"]["assumption_level"] == 4
    assert by_key["fedavg"]["assumption_level"] == 3
    assert by_key["bn_eval"]["upper_bound"] and by_key["strongest"]["upper_bound"]
    assert summary["rows"][:-1] == json.loads(json.dumps(rows))
    # random weights: the eval-mode levels calibrate BN, and the report says so; the override too
    assert "calibrated on data" in md and "--iterations 4" in md
    assert verdict["iterations_override"] == 4 and verdict["budget"] == "quick"

    # every level ran its positive control at 32 px (the MLP; DLG's LeNet for level 7), once: --iterations
    # fixes the budget, so there is no search; the control is shown beside the level's verdict
    for r in rows:
        assert r["positive_control_status"] == "finished" and isinstance(r["positive_control_leaked"], bool)
        assert r["verdict"] in ("leak", "no leak at this budget", "inconclusive")
        assert r["verdict"] != "no leak at this budget" or r["positive_control_leaked"]
        assert r["iterations"] == 4 and [a["iterations"] for a in r["positive_control_attempts"]] == [4]
        assert r["positive_control_size"] == 32
        assert r["positive_control_variant"] == ("lenet" if r["key"] == "dlg" else "mlp")
    assert summary["positive_control"] == "mlp, lenet"
    assert "fixed: no search by the positive control" in md

    # MLflow: one parent, one FINISHED child per level and one per positive control
    client, all_children = _runs(store, summary["parent_run_id"])[0], _runs(store, summary["parent_run_id"])[2]
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["gistress.kind"] == "audit"
    children = [c for c in all_children if c.data.tags["gistress.kind"] == "audit_level"]
    controls = [c for c in all_children if c.data.tags["gistress.kind"] == "audit_positive_control"]
    assert len(children) == len(audit.BATTERY) - 1 == len(controls)
    assert {c.data.params["variant"] for c in controls} == {"mlp", "lenet"}
    assert {c.data.params["size"] for c in controls} == {"32"}
    assert {c.info.status for c in children} == {"FINISHED"}
    params = {c.data.params["audit_level"]: c.data.params for c in children}
    assert params["bn_running"]["bn_stats"] == "running" and params["bn_running"]["preset"] == "gia_bn"
    assert params["bn_eval"]["bn_mode"] == "eval" and params["bn_eval"]["weights"] == "calibrated"
    assert params["labels_inferred"]["shares"] == "none"
    assert params["fedavg"]["update"] == "fedavg" and params["fedavg"]["local_steps"] == "4"
    assert params["strongest"]["restarts"] == "2" and params["strongest"]["bn_stats"] == "exact"
    assert params["dlg"]["preset"] == "dlg" and params["dlg"]["optimizer"] == "lbfgs"
    assert all(p["control"] == "True" and p["batch_size"] == "1" for p in params.values())
    for c in children:
        assert {"brr", "wsrr", "median_psnr", "leaked"} <= set(c.data.metrics)
        assert "weight/tv" in c.data.params and "tv" not in c.data.params  # the weight, not the loss value
        assert c.data.tags["mlflow.note.content"].startswith(f"**{c.data.params['variant']}**")
    # step curves are buffered and still all reach MLflow
    assert client.get_metric_history(children[0].info.run_id, "img0/matching_loss")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "report.html", "verdict.json", "verdict.csv", "audit.png"} <= artifacts


def test_yolo_quick_audit_skips_label_level_and_records_boxes(workdir, store, capsys):
    rc = main(["audit", "--variant", "yolov8n", "--image", "bus", "--size", "128", "--level", "quick",
               "--iterations", "2", "--out", "out", "--json", "--quiet", "--tracking-uri", store])
    _, summary = _output(capsys)
    assert rc == 0
    md, verdict = _check_report_files(workdir / "out")
    rows = {r["key"]: r for r in verdict["rows"]}
    assert rows["labels_inferred"]["status"].startswith("skipped: detection")
    assert rows["labels_inferred"]["run_id"] is None
    ran = [k for k, r in rows.items() if r["status"] == "finished"]
    assert ran == ["realistic", "bn_running", "bn_eval", "fedavg", "strongest"]
    assert "boxes and classes are shared" in md
    assert rows["dlg"]["status"].startswith("skipped: detection")
    # the boxes are a grant of the client's own batch: SoK level 4 at every detection level
    assert all(rows[k]["assumption_level"] == 4 for k in ran)
    # every gradient level, FedAvg included, ran its positive control on the reference detector,
    # and the report shows its PSNR; at 2 iterations it cannot leak, so a quiet level is inconclusive
    assert summary["positive_control"] == "yolo-ref"
    assert all(rows[k]["positive_control_status"] == "finished" for k in ran)
    assert all(isinstance(rows[k]["positive_control_psnr"], float) for k in ran)
    assert all(rows[k]["verdict"] in ("leak", "inconclusive") for k in ran)
    assert "ground-truth boxes and classes" in verdict["verdict"]
    _, parent, children = _runs(store, summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    controls = [c for c in children if c.data.tags["gistress.kind"] == "audit_positive_control"]
    children = [c for c in children if c.data.tags["gistress.kind"] == "audit_level"]
    assert len(children) == 5 and len(controls) == 5 and {c.info.status for c in children + controls} == {"FINISHED"}
    assert {(c.data.params["variant"], c.data.params["size"]) for c in controls} == {("yolo-ref", "32")}
    grants = {c.data.params["audit_level"]: json.loads(c.data.tags["grants"]) for c in children}
    assert all(g["labels"] == "boxes+classes" for g in grants.values())
    assert all(c.data.params["size"] == "128" for c in children)


# ---------------------------------------------------------------------------------------------
# the run loop with a stand-in runner (fast): leaks, failures, interrupts
# ---------------------------------------------------------------------------------------------


def _scored(psnr: float, cfg: RunConfig, control: Scores | None = None) -> Scores:
    """The suite's own scores (its leak rule, the config's thresholds, over ``control`` when given)
    of a reconstruction made to sit ``psnr`` dB from a textured target (std 0.1, so its mean colour
    is at 20 dB): the target plus an error of exactly +-10^(-psnr/20) per pixel. The rule then
    calls 25 dB over a 22 dB control a leak and 12 dB none (content gain 6.2 vs 0.6 dB)."""
    g = torch.Generator().manual_seed(0)
    target = 0.5 + 0.1 * 3 ** 0.5 * (2 * torch.rand(1, 3, 8, 8, generator=g) - 1)
    sign = torch.randint(0, 2, target.shape, generator=g).float() * 2 - 1
    recon = target + sign * 10 ** (-psnr / 20)
    return score(target, recon, rule=leak_rule(cfg), control=control, use_lpips=False)


def _fake_runner(psnr_by_level: dict[str, float], fail: str | None = None, interrupt: str | None = None,
                 control_leaks_from: int | None = None, calls: list | None = None):
    """A run_setting stand-in: fixed PSNR per level (key from the threat/attack), no attack.

    ``control_leaks_from``: the positive control scores 40 dB from that many iterations on, 12 dB
    below; ``calls`` collects (variant, preset, iterations) in the order the runner was called."""

    def key_of(cfg: RunConfig) -> str:
        t, a = cfg.threat, cfg.attack
        if cfg.variant in ("lenet", "mlp"):
            return "positive_control"
        if a.preset == "dlg":
            return "dlg"
        if a.restarts > 1:
            return "strongest"
        if t.bn_stats == "running":
            return "bn_running"
        if t.bn_mode == "eval":
            return "bn_eval"
        if not t.shares_labels:
            return "labels_inferred"
        return "fedavg" if t.update == "fedavg" else "realistic"

    def run(cfg, *, out_dir, progress=False, on_step=None):
        key = key_of(cfg)
        if key == fail:
            raise RuntimeError("out of memory in level " + key)
        if key == interrupt:
            raise KeyboardInterrupt
        on_step(0, {"matching_loss": 0.5, "psnr": 10.0})
        if calls is not None:
            calls.append((cfg.variant, cfg.attack.preset, cfg.attack.iterations))
        x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        p = psnr_by_level.get(key, 10.0)
        if key == "positive_control" and control_leaks_from is not None:
            p = 40.0 if cfg.attack.iterations >= control_leaks_from else 12.0
        ctrl = _scored(p - 3, cfg)
        sc = _scored(p, cfg, control=ctrl)  # leaked or not: the suite's leak rule decides
        rec = Reconstruction(images=x, matching_loss=0.1, restart_images=[x] * cfg.attack.restarts,
                             restart_losses=[0.1] * cfg.attack.restarts, chosen=0, init=x)
        return RunResult(config=cfg, target=Batch(images=x, labels=torch.tensor([0]), ids=cfg.images),
                         reconstruction=rec, scores=sc, control=rec, control_scores=ctrl,
                         restart_scores=[sc] * cfg.attack.restarts,
                         metrics={"psnr": p, "control_psnr": p - 3, "gain_psnr": 3.0},
                         tags={"assumption_level": "1", "upper_bound": str(cfg.threat.upper_bound)})

    return run


@pytest.fixture(scope="module")
def small_plan():
    base = RunConfig(variant="convnet", variant_options={"width": 4, "batchnorm": True}, images=["astronaut"])
    return audit.plan_audit(base, "quick", iterations=2)


def test_failing_level_is_failed_child_and_audit_goes_on(workdir, store, small_plan, capsys):
    runner = _fake_runner({"bn_eval": 25.0, "strongest": 30.0}, fail="fedavg")
    result = audit.run_audit(small_plan, out_dir=workdir / "out", tracking_uri=store, runner=runner)
    assert result.exit_code == 1
    _, verdict = _check_report_files(workdir / "out")
    rows = {r["key"]: r for r in verdict["rows"]}
    assert rows["fedavg"]["status"].startswith("failed: RuntimeError: out of memory")
    assert rows["fedavg"]["leaked"] is None
    assert rows["strongest"]["leaked"] is True and rows["realistic"]["leaked"] is False
    # the table shows the reason where the leak verdict would be
    assert "failed: RuntimeError: out of memory" in audit.format_table(verdict["rows"])

    _, parent, children = _runs(store, result.parent_run_id)
    levels = [c for c in children if c.data.tags["gistress.kind"] == "audit_level"]
    status = {c.data.tags["audit.level"]: c.info.status for c in levels}
    assert status.pop("fedavg") == "FAILED" and set(status.values()) == {"FINISHED"}
    failed = next(c for c in levels if c.data.tags["audit.level"] == "fedavg")
    assert "out of memory" in failed.data.tags["error"]
    assert parent.info.status == "FINISHED" and parent.data.tags["verdict"] == "leaks: bn_eval,strongest"
    # the verdict names the assumptions the leak needed and that it bounds only these attacks
    assert "Leaks only with inference-mode BN (an upper bound)" in result.verdict
    assert "every leaking level is an upper bound" in result.verdict
    assert "bounds only the attacks it ran" in result.verdict
    assert "did not finish (fedavg)" in result.verdict


def test_interrupted_audit_marks_runs_killed_and_writes_partial_report(workdir, store, small_plan):
    with pytest.raises(KeyboardInterrupt):
        audit.run_audit(small_plan, out_dir=workdir / "out", tracking_uri=store,
                        runner=_fake_runner({}, interrupt="bn_eval"))
    verdict = json.loads((workdir / "out" / "verdict.json").read_text())
    status = {r["key"]: r["status"] for r in verdict["rows"]}
    assert status["realistic"] == "finished" and status["bn_eval"].startswith("killed")
    assert status["strongest"] == "not run (audit interrupted)"
    _, parent, children = _runs(store, verdict["parent_run_id"])
    assert parent.info.status == "KILLED"
    levels = [c for c in children if c.data.tags["gistress.kind"] == "audit_level"]
    assert {c.data.tags["audit.level"]: c.info.status for c in levels}["bn_eval"] == "KILLED"


def test_conclusion_wording():
    plan = audit.AuditPlan(base=RunConfig(variant="lenet"), budget=audit.BUDGETS["quick"], images=["a", "b"],
                           size=32, task="classification", has_bn=True, levels=[], skipped=[], notes=[])

    def outcome(n, psnrs, gain=5.0, upper=False, content=3.0):
        lv = audit.BATTERY[n - 1]
        o = audit.LevelOutcome(n, lv, "FINISHED", assumption_level=1, upper_bound=upper)
        o.samples = [audit.Sample(f"i{j}", p, 0.5, None, p >= 18, gain, p - gain, content)
                     for j, p in enumerate(psnrs)]
        o.attempts_leaked = [s.leaked for s in o.samples]
        return o

    none = audit.conclusion(plan, [outcome(1, [10, 12]), outcome(6, [15, 16], upper=True)])
    assert none.startswith("No level leaked") and "not a proof of privacy" in none
    real = [outcome(1, [20, 12]), outcome(6, [25, 26], upper=True)]
    text = audit.conclusion(plan, real)
    assert text.startswith("Leaks under the realistic setting (level 1)") and "50%" in text
    assert "Also leaked: strongest" in text
    assert "colours or contrast are off" not in text
    # a leak below its control in PSNR (the rule found content the control lacks) is called out,
    # from the leaked images only
    odd = audit.conclusion(plan, [outcome(7, [19, 8], gain=-2.6, content=2.8)])
    assert ("At level 7 the leaked reconstructions score -2.6 dB against their prior-only control in PSNR"
            in odd and "content gain +2.8 dB over the control's" in odd)
    assert "the image prior, not the update" not in odd
    o = real[0]
    assert o.brr == 0.5 and o.median("psnr") == 16.0 and o.median("lpips") is None
    assert [label for label, _ in o.best_and_median()] == ["best", "median"]


@pytest.mark.parametrize("argv, message", [
    (["--variant", "resnet18", "--level", "quik"], "unknown audit level 'quik' (did you mean 'quick'?)"),
    (["--variant", "resnet81"], "unknown variant 'resnet81'"),
    (["--variant", "resnet18", "--stem", "cifar", "--image", "no_such_image"], "no_such_image"),
    (["--variant", "yolov8n", "--images", "5"], "--images 5 asked, the data has 2 images"),
])
def test_bad_input_is_one_line_and_leaves_nothing(workdir, capsys, argv, message):
    rc = main(["audit", *argv, "--out", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (workdir / "out").exists() and not (workdir / "gistress-out").exists()
    assert not (workdir / "mlflow.db").exists()  # no experiment, no parent run


def test_plan_skips_bn_levels_without_batchnorm_and_scales_budgets():
    plan = audit.plan_audit(RunConfig(variant="lenet", images=["astronaut", "coffee", "rocket"]), "quick")
    assert [n for n, _, _ in plan.skipped] == [2, 3, 8] and plan.size == 32
    assert plan.skipped[-1][2].startswith("not applicable: neither closed form fits the first layer (net.body.0")
    assert plan.images == ["astronaut", "coffee"]  # quick audits at most 2 images, and says so
    assert any("at most 2 images: rocket not attacked" in n for n in plan.notes)
    assert any("no BatchNorm" in n for n in plan.notes)
    strongest = next(p.config for p in plan.levels if p.level.key == "strongest")
    assert (strongest.threat.bn_mode, strongest.threat.bn_stats) == ("train", "none")
    assert (strongest.attack.preset, strongest.attack.restarts, strongest.attack.iterations) == ("gia_bn", 2, 100)
    # quick: each level's budget is searched by its positive control, doubling from 100 to the cap
    budgets = {p.level.key: p.budgets for p in plan.levels}
    assert budgets["realistic"] == budgets["strongest"] == (100, 200, 400, 800, 1600)
    assert budgets["dlg"] == (100, 200, 400)
    assert {p.level.key: p.reference.label for p in plan.levels} == {
        "realistic": "mlp at 32 px", "labels_inferred": "mlp at 32 px", "fedavg": "mlp at 32 px",
        "strongest": "mlp at 32 px", "dlg": "lenet at 32 px"}
    assert "100-1,600 iterations (doubling until the positive control leaks" in plan.battery_lines()[0]
    # --no-positive-control: the fixed base budget, nothing to search with
    unchecked = audit.plan_audit(RunConfig(variant="lenet", images=["astronaut"]), "quick", positive_control=False)
    assert {p.budgets for p in unchecked.levels} == {()}
    assert {p.config.attack.iterations for p in unchecked.levels} == {100}
    assert "2. bn_running: skipped (no BatchNorm layers)" in plan.battery_lines()

    quick = audit.plan_audit(RunConfig(variant="yolov8n", images=["bus"]), "quick")
    thorough = audit.plan_audit(RunConfig(variant="yolov8n", images=["bus"]), "thorough")
    assert (quick.size, thorough.size) == (256, 640)
    iters = {p.level.key: (p.config.attack.iterations, p.config.attack.restarts) for p in thorough.levels}
    assert "dlg" not in iters
    # every detection level checks its budget on the reference detector, at its own 32 px
    assert all(p.control is not None for p in thorough.levels)
    assert {(p.control.variant, p.control.size, p.control.attack.iterations) for p in thorough.levels} \
        == {("yolo-ref", 32, 24000), ("yolo-ref", 32, 10000)}
    assert iters == {"realistic": (24000, 1), "bn_running": (10000, 1), "bn_eval": (24000, 1),
                     "fedavg": (24000, 1), "strongest": (10000, 4)}
    assert all(len(p.budgets) <= 1 for p in thorough.levels)  # thorough keeps its fixed paper budgets
    assert {p.level.key: p.config.weights for p in thorough.levels}["bn_eval"] == "calibrated"


def test_positive_controls_decide_between_no_leak_and_inconclusive(workdir, store, small_plan):
    """A quiet level reads "no leak at this budget" only when the same attack and budget leaked
    the reference model; otherwise it is inconclusive, in the table, the JSON and the words."""
    caught = audit.run_audit(small_plan, out_dir=workdir / "a", tracking_uri=store,
                             runner=_fake_runner({"positive_control": 40.0}))
    rows = {r["key"]: r for r in caught.to_json()["rows"]}
    assert rows["realistic"]["verdict"] == "no leak at this budget"
    assert rows["realistic"]["positive_control_psnr"] == pytest.approx(40.0, abs=1e-3)
    assert rows["realistic"]["positive_control_leaked"]
    assert "No leak at this budget at level(s) 1" in caught.verdict and "reference mlp 40.0 dB at 2 iterations" in caught.verdict
    assert "40.0 dB, leaked" in audit.format_table(caught.to_json()["rows"])
    md = (workdir / "a" / "report.md").read_text()
    assert "this budget recovers the reference model mlp at 40.0 dB" in md and "your model: 10.0 dB" in md

    missed = audit.run_audit(small_plan, out_dir=workdir / "b", tracking_uri=store,
                             runner=_fake_runner({"positive_control": 12.0, "strongest": 30.0}))
    rows = {r["key"]: r for r in missed.to_json()["rows"]}
    assert rows["realistic"]["verdict"] == "inconclusive" and rows["strongest"]["verdict"] == "leak"
    assert missed.to_json()["inconclusive_levels"] == [k for k, r in rows.items()
                                                       if k != "strongest" and r["status"] == "finished"]
    assert "Inconclusive at level(s) 1" in missed.verdict
    assert "did not recover even the known-leaky reference model lenet, mlp at this budget" in missed.verdict
    assert "no leak at this budget" not in audit.format_table(missed.to_json()["rows"])
    _, parent, _ = _runs(store, missed.parent_run_id)
    assert parent.data.tags["verdict"] == "leaks: strongest"

    quiet = audit.run_audit(small_plan, out_dir=workdir / "c", tracking_uri=store,
                            runner=_fake_runner({"positive_control": 12.0}))
    _, parent, _ = _runs(store, quiet.parent_run_id)
    assert parent.data.tags["verdict"].startswith("inconclusive: realistic")


def test_no_positive_control_flag_says_no_leak_is_unchecked(workdir, store):
    base = RunConfig(variant="convnet", variant_options={"width": 4}, images=["astronaut"])
    plan = audit.plan_audit(base, "quick", iterations=2, positive_control=False)
    assert all(p.control is None for p in plan.levels)
    result = audit.run_audit(plan, out_dir=workdir / "out", tracking_uri=store, runner=_fake_runner({}))
    rows = result.to_json()["rows"]
    assert {r["verdict"] for r in rows if r["status"] == "finished"} == {"no leak (sensitivity not checked)"}
    assert "Positive controls were switched off" in result.verdict
    _, _, children = _runs(store, result.parent_run_id)
    assert {c.data.tags["gistress.kind"] for c in children} == {"audit_level"}


def test_lenet_quick_audit_on_astronaut_reports_a_leak(workdir, store, capsys):
    """The DLG LeNet, which DLG inverts above 30 dB, must be flagged by the quick budget."""
    rc = main(["audit", "--variant", "lenet", "--data", "samples", "--image", "astronaut", "--level", "quick",
               "--out", "out", "--json", "--quiet", "--tracking-uri", store, "--no-positive-control"])
    _, summary = _output(capsys)
    assert rc == 0 and summary["leaked"] is True
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows["dlg"]["leaked"] is True and rows["dlg"]["psnr"] > 30
    # only DLG leaks (the other levels reach 12-13 dB), and the verdict says so, naming its level
    assert summary["leaking_levels"] == ["dlg"] and [k for k, r in rows.items() if r["leaked"]] == ["dlg"]
    assert summary["verdict"].startswith("Leaks only with the DLG attack") and "(leaked levels: 7)" in summary["verdict"]


def test_audit_into_the_same_out_continues_from_saved_loops(workdir, store, capsys):
    """A second run of the same audit into the same --out reloads every finished attack loop
    (tag audit.resumed at the last step) and reproduces its numbers; another seed into that
    folder must not reuse them."""
    argv = ["audit", "--variant", "lenet", "--image", "astronaut", "--iterations", "3", "--out", "out",
            "--json", "--quiet", "--tracking-uri", store]
    assert main(argv) == 0
    printed, first = _output(capsys)
    assert "continuing in" not in printed
    saved = sorted((workdir / "out").glob("levels/*/*/checkpoints/*.pt"))
    assert saved  # the final state of every attack (and control) loop stays beside its run

    assert main(argv) == 0
    printed, second = _output(capsys)
    assert f"continuing in out: {len(saved)} saved loop(s)" in printed
    psnr = lambda s: {r["key"]: r["psnr"] for r in s["rows"] if r["status"] == "finished"}  # noqa: E731
    assert psnr(second) == psnr(first) and len(psnr(first)) >= 4
    _, _, children = _runs(store, second["parent_run_id"])
    # every level and every positive control continued (lenet has no closed-form level)
    kinds = {c.data.tags["gistress.kind"] for c in children}
    assert kinds == {"audit_level", "audit_positive_control"}
    resumed = [c.data.tags.get("audit.resumed") for c in children]
    assert len(resumed) >= 8 and set(resumed) == {"astronaut=2"}, resumed

    with pytest.warns(UserWarning, match="written for another setting"):
        assert main([*argv, "--seed", "1"]) == 0
    _, third = _output(capsys)
    _, _, children = _runs(store, third["parent_run_id"])
    assert all("audit.resumed" not in c.data.tags for c in children)
    assert psnr(third) != psnr(first)
