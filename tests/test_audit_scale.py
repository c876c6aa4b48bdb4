"""Sensitivity at the audited scale: each level's budget is set by its positive control (doubling
up to the cap), and the control runs on a reference at the audited model's input size."""

from __future__ import annotations

import pytest
from test_audit import _fake_runner, _runs

import suite.audit as audit
from suite.audit.positive_control import REFERENCE, reference_for
from suite.config import RunConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module's audits."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def searched_plan():
    """A quick plan with no --iterations: every level with a control searches its budget."""
    base = RunConfig(variant="convnet", variant_options={"width": 4}, images=["astronaut"])
    return audit.plan_audit(base, "quick")


def test_budget_doubles_until_the_control_leaks_and_the_level_runs_there(workdir, store, searched_plan):
    calls: list = []
    result = audit.run_audit(searched_plan, out_dir=workdir / "out", tracking_uri=store,
                             runner=_fake_runner({}, control_leaks_from=400, calls=calls))
    rows = {r["key"]: r for r in result.to_json()["rows"]}
    ig = rows["realistic"]
    assert ig["iterations"] == 400 and ig["verdict"] == "no leak at this budget"
    assert [(a["iterations"], a["leaked"]) for a in ig["positive_control_attempts"]] == \
        [(100, False), (200, False), (400, True)]
    assert ig["positive_control_search"] == "leaked at 400 after missing at 100, 200"
    assert rows["dlg"]["iterations"] == 400 and rows["strongest"]["iterations"] == 400
    assert result.to_json()["budgets"] == {"realistic": 400, "labels_inferred": 400, "fedavg": 400,
                                           "strongest": 400, "dlg": 400}
    # the control runs first, at each budget in turn; then the audited model at the budget it set
    assert calls[:4] == [("mlp", "ig", 100), ("mlp", "ig", 200), ("mlp", "ig", 400), ("convnet", "ig", 400)]
    assert ("convnet", "ig", 100) not in calls
    table = audit.format_table(result.to_json()["rows"])
    assert "budget (iterations)" in table and "40.0 dB, leaked at 400 after missing at 100, 200" in table
    md = (workdir / "out" / "report.md").read_text()
    assert "Budget: 400 iterations (set by its positive control)" in md
    assert "budgets set by sensitivity" in md

    # MLflow: one control child per attempt, the level's run at 400, the search recorded
    client, parent, children = _runs(store, result.parent_run_id)
    controls = [c for c in children if c.data.tags["gistress.kind"] == "audit_positive_control"
                and c.data.tags["audit.level"] == "realistic"]
    assert sorted(int(c.data.params["iterations"]) for c in controls) == [100, 200, 400]
    level = next(c for c in children if c.data.tags["gistress.kind"] == "audit_level"
                 and c.data.tags["audit.level"] == "realistic")
    assert level.data.params["iterations"] == "400" and level.data.tags["audit.iterations"] == "400"
    assert level.data.tags["audit.control_attempts"] == "100:missed,200:missed,400:leaked"
    assert "1:400" in parent.data.tags["audit.iterations"]


def test_a_control_that_never_leaks_stops_at_the_cap_and_the_level_is_inconclusive(workdir, store, searched_plan):
    calls: list = []
    result = audit.run_audit(searched_plan, out_dir=workdir / "out", tracking_uri=store,
                             runner=_fake_runner({}, control_leaks_from=10**6, calls=calls))
    rows = {r["key"]: r for r in result.to_json()["rows"]}
    assert rows["realistic"]["iterations"] == 1600 and rows["realistic"]["verdict"] == "inconclusive"
    assert [a["iterations"] for a in rows["realistic"]["positive_control_attempts"]] == [100, 200, 400, 800, 1600]
    assert rows["dlg"]["iterations"] == 400  # DLG's own cap (L-BFGS steps)
    assert rows["realistic"]["positive_control_search"] == \
        "missed at every budget up to 1,600 (100, 200, 400, 800, 1,600)"
    assert "at any budget up to 1,600 iterations" in result.verdict
    assert [c for c in calls if c[0] == "convnet" and c[1] == "ig"] == [("convnet", "ig", 1600)] * 3
    # a level that leaks by itself is a leak whatever its control did
    leaky = audit.run_audit(searched_plan, out_dir=workdir / "b", tracking_uri=store,
                            runner=_fake_runner({"fedavg": 30.0}, control_leaks_from=10**6))
    assert {r["key"]: r["verdict"] for r in leaky.to_json()["rows"]}["fedavg"] == "leak"


def test_iterations_override_fixes_the_budget_without_a_search(workdir, store):
    base = RunConfig(variant="convnet", variant_options={"width": 4}, images=["astronaut"])
    plan = audit.plan_audit(base, "quick", iterations=7)
    assert {p.budgets for p in plan.levels} == {()}
    calls: list = []
    result = audit.run_audit(plan, out_dir=workdir / "out", tracking_uri=store,
                             runner=_fake_runner({}, control_leaks_from=400, calls=calls))
    assert {c[2] for c in calls} == {7}
    rows = [r for r in result.to_json()["rows"] if r["status"] == "finished"]
    assert {r["iterations"] for r in rows} == {7} and {len(r["positive_control_attempts"]) for r in rows} == {1}
    assert {r["verdict"] for r in rows} == {"inconclusive"}


def test_reference_is_chosen_by_task_attack_and_nearest_size():
    assert reference_for("classification", 32, "dlg").label == "lenet at 32 px"
    assert reference_for("classification", 32, "ig").label == "mlp at 32 px"
    assert reference_for("classification", 224, "ig").label == "mlp at 224 px"
    assert reference_for("classification", 224, "dlg").label == "lenet at 32 px"  # none leaks under DLG at 224
    assert reference_for("classification", 200, "gia_bn").size == 224
    assert reference_for("classification", 128, "ig").size == 224  # a tie goes to the larger size
    assert reference_for("classification", 64, "ig").size == 32
    assert reference_for("detection", 256, "ig").label == "yolo-ref at 32 px"
    assert reference_for("detection", 256, "ig", "fedavg").label == "yolo-ref at 32 px"
    assert reference_for("detection", 256, "dlg") is None
    # FedAvg at 224 px: the 224 px MLP is too slow to unroll, so its control stays at 32 px
    assert reference_for("classification", 224, "ig", "fedavg").label == "mlp at 32 px"


def test_a_224_px_model_gets_the_224_px_control_and_a_128_px_one_is_told_the_scales_differ():
    plan = audit.plan_audit(RunConfig(variant="lenet", variant_options={"input_size": 224}, images=["astronaut"]),
                            "quick")
    assert plan.size == 224
    controls = {p.level.key: (p.control.variant, p.control.size) for p in plan.levels}
    assert controls.pop("dlg") == ("lenet", 32) and controls.pop("fedavg") == ("mlp", 32)
    assert set(controls.values()) == {("mlp", 224)}
    assert {p.control.variant_options["input_size"] for p in plan.levels if p.control.size == 224} == {224}
    # only DLG's control is at another scale, and the plan says so
    assert [n for n in plan.notes if "audited model at" in n][0].startswith(
        "positive control at 32 px, audited model at 224 px (level(s) 5, 7)")

    odd = audit.plan_audit(RunConfig(variant="resnet18", variant_options={"stem": "cifar", "width": 8}, size=128,
                                     images=["astronaut"]), "quick")
    assert {p.level.key: p.control.size for p in odd.levels if p.control is not None} == {
        "realistic": 224, "bn_running": 224, "bn_eval": 224, "labels_inferred": 224, "fedavg": 32,
        "strongest": 224, "dlg": 32}
    assert any(n.startswith("positive control at 32, 224 px, audited model at 128 px") for n in odd.notes)


def test_lenet_and_mlp_scale_to_224_px_and_refuse_a_bad_size():
    import torch

    import variants
    from suite.errors import GistressError

    for name, opts in (("lenet", {"input_size": 224}), ("mlp", {"input_size": 224, "num_classes": 3})):
        v = variants.build(name, **opts)
        assert v.input_size == 224 and v.options["input_size"] == 224
        assert v.model(torch.rand(1, 3, 224, 224)).shape == (1, opts.get("num_classes", 10))
    with pytest.raises(GistressError, match="input_size=30 must be a multiple of 4"):
        variants.build("lenet", input_size=30)


def test_an_interrupt_during_a_control_leaves_its_level_not_run(workdir, store, searched_plan):
    with pytest.raises(KeyboardInterrupt):
        audit.run_audit(searched_plan, out_dir=workdir / "out", tracking_uri=store,
                        runner=_fake_runner({}, interrupt="positive_control"))
    import json

    rows = {r["key"]: r for r in json.loads((workdir / "out" / "verdict.json").read_text())["rows"]}
    assert rows["realistic"]["status"] == "not run (audit interrupted)"
    assert rows["realistic"]["positive_control_status"].startswith("killed")


# DLG's LeNet is checked by tests/test_attack.py (test_dlg_lenet_recovers_image_above_30db)
@pytest.mark.parametrize("ref, preset", [(r, p) for r in REFERENCE["classification"]
                                         if r.size == 32 and r.variant != "lenet" for p in r.presets])
def test_every_32_px_reference_leaks_at_the_base_budget(workdir, ref, preset):
    """The claim REFERENCE makes, checked with the real attack: the quick base budget (100
    iterations, one image, the audit's seed) recovers each 32 px reference under each preset it lists."""
    from suite.execution.runner import run_setting

    cfg = RunConfig(variant=ref.variant, variant_options={**ref.variant_options, "num_classes": 10},
                    size=ref.size, images=["astronaut"], device="cpu",
                    attack={"preset": preset, "iterations": 100, "control": True})
    res = run_setting(cfg, out_dir=workdir / "out", progress=False)
    assert res.scores.leaked == [True], (ref.label, preset, res.scores.psnr)
    assert res.metrics["gain_psnr"] > 5  # far above its prior-only control, not a smooth-image fluke
