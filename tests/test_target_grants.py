"""Every target-derived input is a counted grant: shown, tagged, an upper bound; refused in audits."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from suite.cli.main import main
from suite.config import RunConfig


@pytest.mark.parametrize("attack", [dict(init="noisy_target", noise_p=0.5), dict(init="file", init_file="x.png")])
def test_target_derived_starts_make_the_setting_an_upper_bound(attack):
    cfg = RunConfig(variant="lenet", attack=attack)
    assert cfg.upper_bound and not cfg.threat.upper_bound
    assert "upper bound" in cfg.attack_grants()["init"]
    assert not RunConfig(variant="lenet").upper_bound and "init" not in RunConfig(variant="lenet").attack_grants()


def test_a_noisy_target_with_every_pixel_replaced_grants_nothing():
    """p = 1 replaces every pixel by noise (Fig. 4's end point): no target is left in the start."""
    cfg = RunConfig(variant="lenet", attack=dict(init="noisy_target", noise_p=1.0))
    assert not cfg.upper_bound and not cfg.attack.oracle_init
    assert "nothing of the target left" in cfg.attack_grants()["init"]
    assert RunConfig(variant="lenet", attack=dict(init="noisy_target", noise_p=1.0, noise_sigma=0.1)).upper_bound


def test_calibrated_weights_count_at_the_data_distribution_level():
    bn = dict(variant="resnet18", variant_options={"stem": "cifar"}, attack=dict(preset="ig"))
    assert RunConfig(**bn).assumption_level("classification", has_bn=True) == 1
    assert RunConfig(**bn, weights="calibrated").assumption_level("classification", has_bn=True) == 2
    # calibration leaves a model without BN unchanged, so it grants nothing there
    assert RunConfig(variant="lenet", weights="calibrated").assumption_level("classification", has_bn=False) == 1
    assert "SoK level 2" in RunConfig(**bn, weights="calibrated").attack_grants()["weights"]


def test_attack_cli_shows_a_noisy_target_grant_and_tags_it(workdir, capsys):
    rc = main(["attack", "--variant", "lenet", "--image", "astronaut", "--iterations", "2", "--init", "noisy_target",
               "--noise-p", "0.5", "--quiet", "--json", "--out", "out"])
    out = capsys.readouterr().out
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("grants: "))
    assert "init: noisy_target (p=0.5): built from the client's images" in line
    assert line.endswith("(an upper bound: the start is target-derived)")
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("gistress-attack").experiment_id])
    assert run.data.tags["upper_bound"] == "true" and run.data.tags["oracle_init"] == "true"
    assert json.loads(run.data.tags["grants"])["init"].startswith("noisy_target (p=0.5)")


@pytest.mark.parametrize("item", ["attack.init=noisy_target", "attack.noise_p=0.3", "attack.init_file=a.png"])
def test_audit_refuses_a_target_derived_set_in_one_line_and_writes_nothing(workdir, capsys, item):
    rc = main(["audit", "--variant", "lenet", "--image", "astronaut", "--level", "quick", "--set", item,
               "--out", "out"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: --set {item.split('=')[0]} would hand the attacker a start derived from")
    assert not (workdir / "out").exists() and not (workdir / "mlflow.db").exists()
