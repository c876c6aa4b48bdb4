"""attack.tv_choices: the server tries several prior weights and keeps the lowest matching loss."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import variants
from suite import data
from suite.attack.attacker import Attacker
from suite.config import AttackSpec, RunConfig
from suite.threat.client import Client
from suite.threat.threat_model import ThreatModel


@pytest.fixture(scope="module")
def shared():
    batch = data.load("samples", task="classification", size=32, images=["astronaut"], num_classes=10)
    v = variants.build("lenet", seed=0)
    return v, Client(v.model, v.task, ThreatModel()).share(batch)


def test_every_weight_runs_every_restart_and_the_matching_loss_picks(shared):
    v, obs = shared
    spec = dict(preset="ig", iterations=10, restarts=2, restart_mode="sequential", log_every=5)
    both = Attacker(v, obs, AttackSpec(tv_choices=[0.2, 1e-6], **spec), seed=0).reconstruct()
    assert both.restart_tv == [0.2, 0.2, 1e-6, 1e-6] and len(both.restart_images) == 4
    assert both.chosen == min(range(4), key=lambda i: both.restart_losses[i])
    assert both.chosen_tv == both.restart_tv[both.chosen]
    # each group is exactly the single-weight attack from the same starts: the weight was applied
    for i, weight in enumerate((0.2, 1e-6)):
        alone = Attacker(v, obs, AttackSpec(tv=weight, **spec), seed=0).reconstruct()
        assert both.restart_losses[2 * i:2 * i + 2] == pytest.approx(alone.restart_losses, rel=1e-6)
        assert alone.restart_tv is None and alone.chosen_tv is None
    assert both.restart_losses[:2] != pytest.approx(both.restart_losses[2:], rel=1e-3)


def test_tv_choices_are_validated_and_leave_other_hashes_alone():
    for bad in ([0.1], [-1.0, 0.1], [0.1, 0.1]):
        with pytest.raises(ValidationError):
            AttackSpec(tv_choices=bad)
    plain = RunConfig(variant="lenet")
    assert plain.config_hash() == RunConfig(variant="lenet", attack={"tv_choices": None}).config_hash()
    assert plain.config_hash() != RunConfig(variant="lenet", attack={"tv_choices": [0.2, 1e-6]}).config_hash()
    assert AttackSpec(tv_choices=[0.2, 0.0]).tv_weights == [0.2, 0.0] and AttackSpec(tv=0.5).tv_weights == [0.5]


def test_the_run_logs_the_chosen_weight(tmp_path):
    from suite.execution.runner import run_setting

    cfg = RunConfig(variant="lenet", size=32, images=["astronaut"],
                    attack={"preset": "ig", "iterations": 4, "tv_choices": [0.2, 1e-6], "control": True})
    res = run_setting(cfg, out_dir=tmp_path, progress=False)
    assert res.metrics["chosen_tv"] in (0.2, 1e-6) and res.metrics["control_chosen_tv"] in (0.2, 1e-6)
    assert len(res.reconstruction.restart_images) == 2
    assert torch.isfinite(res.reconstruction.images).all()


def test_audit_levels_try_both_weights_unless_the_user_sets_one():
    from suite.audit.plan import apply_to_levels, plan_audit

    plan = plan_audit(RunConfig(variant="convnet", size=32), "quick")
    by = {pl.number: pl for pl in plan.levels}
    assert by[1].config.attack.tv_choices == [0.2, 1e-6] and by[6].config.attack.tv_choices == [0.052, 1e-6]
    assert by[7].config.attack.tv_choices is None  # DLG has no prior to weigh
    assert by[1].control.attack.tv_choices == [0.2, 1e-6]  # the positive control runs the same attack
    assert "TV weights 0.2 and 1e-06 (lowest matching loss kept)" in plan.battery_lines()[0]
    apply_to_levels(plan, {"attack.tv": 0.01})
    assert (by[1].config.attack.tv_choices, by[1].config.attack.tv) == (None, 0.01)
    assert by[1].control.attack.tv_choices is None


def test_eval_mode_on_fresh_bn_statistics_runs_and_is_tagged(tmp_path):
    """What Geiping et al.'s code attacks on an untrained net: eval mode on 0/1 BN statistics.
    Allowed (SoK Tab. 4 / Fig. 9 reproductions need it), flagged as an upper bound and tagged."""
    from suite.execution.runner import run_setting

    cfg = RunConfig(variant="resnet18", variant_options={"stem": "cifar", "width": 8}, size=32, images=["astronaut"],
                    threat={"bn_mode": "eval"}, attack={"preset": "ig", "iterations": 3})
    res = run_setting(cfg, out_dir=tmp_path, progress=False)
    assert "fresh in 20 BN layer(s)" in res.tags["bn_statistics"] and cfg.threat.upper_bound
    calibrated = RunConfig(**{**cfg.model_dump(), "weights": "calibrated"})
    assert "bn_statistics" not in run_setting(calibrated, out_dir=tmp_path / "c", progress=False).tags
