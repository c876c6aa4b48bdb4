"""Federated-learning realism end to end: Client -> Observation -> Attacker (and the runner).

The primitives (defense semantics, label counting, BN-statistics inversion) have unit tests in
tests/test_fl.py. These tests check that each realism knob of the ThreatModel reaches the
attacker as specified, and that the study specs built on them (runs/sok_local_updates.yaml,
runs/defenses.yaml, runs/fig2_resnet_bn.yaml) expand to the SoK's tables and grids. Their smoke
profiles run end to end in tests/test_study.py::test_shipped_spec_smoke_profile_runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import variants
from suite import data
from suite.attack.attacker import Attacker
from suite.config import AttackSpec, RunConfig
from suite.execution.runner import run_setting
from suite.model.bnstats import batch_stats, count_per_channel, recover_batch_stats, running_stats
from suite.studies import expand_settings
from suite.threat.client import Client
from suite.threat.defenses import SOK_GRIDS
from suite.threat.threat_model import ThreatModel

RUNS = Path(__file__).resolve().parents[1] / "runs"
FOUR = ["astronaut", "chelsea", "coffee", "rocket"]


def _batch(names=FOUR, num_classes: int = 10):
    return data.load("samples", task="classification", size=32, images=list(names), num_classes=num_classes)


def _resnet(width: int = 8, seed: int = 0):
    """The CIFAR-stem ResNet18 (post-activation, train-mode BN) at a test-friendly width."""
    return variants.build("resnet18", stem="cifar", width=width, num_classes=10, seed=seed)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


def _attacker(v, obs, **spec) -> Attacker:
    return Attacker(v, obs, AttackSpec(**{"preset": "ig", "iterations": 1, **spec}), seed=0)


# ---------------------------------------------------------------- FedAvg: K local steps


def test_fedavg_one_step_is_lr_times_the_gradient_for_a_train_mode_bn_resnet():
    """tests/test_attack.py checks this on the BN-free LeNet; here BN normalizes with the batch's
    own statistics and the client's running buffers move during the step."""
    v, batch = _resnet(), _batch()
    grad = Client(v.model, v.task, ThreatModel(bn_mode="train")).share(batch)
    delta = Client(v.model, v.task, ThreatModel(bn_mode="train", update="fedavg", local_steps=1,
                                                local_lr=0.05)).share(batch)
    assert delta.param_names == grad.param_names and len(delta.update) == len(grad.update)
    for d, g in zip(delta.update, grad.update):
        torch.testing.assert_close(d, 0.05 * g, rtol=1e-4, atol=1e-7)
    assert delta.training == dict(local_steps=1, local_lr=0.05, local_batch_size=None, local_epochs=1)


@pytest.mark.parametrize("variant", ["lenet", "resnet18"])
def test_attacker_knowing_the_training_reproduces_the_delta_at_the_true_images(variant):
    """K = 4 mini-batch steps (two mini-batches of 2, two epochs' worth): the attacker that knows
    lr, K and the mini-batch size unrolls the same steps, so at the true images its candidate
    update IS the client's delta (matching loss 0 up to float32 rounding, cosine and l2). The
    attacker that does not know them matches the delta as one full-batch gradient, which the
    true images no longer reproduce (measured cosine distance: LeNet 0.37, ResNet18 0.90)."""
    v = variants.build("lenet", seed=0) if variant == "lenet" else _resnet()
    batch = _batch()
    threat = dict(bn_mode="train", update="fedavg", local_steps=4, local_batch_size=2, local_lr=0.1)
    known = Client(v.model, v.task, ThreatModel(**threat)).share(batch)
    unknown = Client(v.model, v.task, ThreatModel(**threat, attacker_knows_training=False)).share(batch)
    # the same client round; only the grant differs
    torch.testing.assert_close(_flat(known.update), _flat(unknown.update), rtol=0, atol=0)
    assert known.grants.get("training") == "known" and "training" not in unknown.grants
    assert unknown.training is None

    cos_known = _attacker(v, known).matching_loss(batch.images)
    l2_known = _attacker(v, known, objective="l2").matching_loss(batch.images)
    assert abs(cos_known) < 1e-6
    assert l2_known <= 1e-9 * float(_flat(known.update).pow(2).sum())
    assert _attacker(v, unknown).matching_loss(batch.images) > 0.1


def test_at_one_local_step_the_uninformed_attacker_matches_exactly_too():
    """K = 1: one gradient step is what the uninformed attacker assumes, so it loses nothing
    (SoK Tab. 2 has no best-case entry for one mini-batch)."""
    v, batch = variants.build("lenet", seed=0), _batch()
    obs = Client(v.model, v.task, ThreatModel(update="fedavg", local_steps=1, local_lr=0.01,
                                              attacker_knows_training=False)).share(batch)
    assert abs(_attacker(v, obs).matching_loss(batch.images)) < 1e-6


# ---------------------------------------------------------------- BN statistics (running)


def _randomize_running_stats(model: nn.Module, seed: int) -> None:
    # away from the fresh 0/1 buffers, so that the server's 'before' matters in the inversion
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


# float32 buffers of size ~1 carry ~6e-8 rounding, amplified tenfold by the inversion at m = 0.1
# (tests/test_fl.py measured 3e-6 on means, 1.5e-6 on variances)
MEAN_ATOL = 1e-5
VAR_ATOL, VAR_RTOL = 1e-5, 1e-4


def _assert_stats_close(recovered, truth, mean_atol=MEAN_ATOL, var_atol=VAR_ATOL, var_rtol=VAR_RTOL):
    assert len(recovered) == len(truth) > 0
    for (rm, rv), (_, tm, tv) in zip(recovered, truth):
        assert float((rm.cpu() - tm).abs().max()) <= mean_atol
        assert bool(((rv.cpu() - tv).abs() <= var_atol + var_rtol * tv.abs()).all())


def test_running_stats_grant_gives_the_attacker_the_clients_batch_statistics():
    """bn_stats=running on a full-width CIFAR ResNet18 (20 BN layers, batch 4, 4x4 maps in the
    last stage): the statistics the Attacker recovers from the Observation's before/after
    buffers equal the true train-mode batch statistics of the client's images, means within
    1e-5 and variances within 1e-5 + 1e-4 relative."""
    v, batch = _resnet(width=64, seed=1), _batch()
    _randomize_running_stats(v.model, seed=2)
    truth = batch_stats(v.model, batch.images)
    obs = Client(v.model, v.task, ThreatModel(bn_mode="train", bn_stats="running")).share(batch)
    assert obs.grants["bn_stats"] == "running" and obs.bn_stats is None
    att = _attacker(v, obs, preset="gia_bn")
    assert len(truth) == 20
    _assert_stats_close(att.bn_reference, truth)


def test_running_stats_after_several_known_local_steps_are_inverted_over_all_steps():
    """FedAvg with K = 3 full-batch steps moves the buffers three times. An attacker that knows
    K inverts all three (effective momentum 1 - 0.9^3); at a tiny local lr every step sees the
    same statistics, so the result is the batch statistics again. A one-step inversion of the
    same buffers is off by a factor of about (1 - 0.9^3) / 0.1 = 2.7."""
    v, batch = _resnet(seed=3), _batch()
    _randomize_running_stats(v.model, seed=4)
    truth = batch_stats(v.model, batch.images)
    threat = ThreatModel(bn_mode="train", update="fedavg", local_steps=3, local_lr=1e-6, bn_stats="running")
    obs = Client(v.model, v.task, threat).share(batch)
    _assert_stats_close(_attacker(v, obs, preset="gia_bn").bn_reference, truth,
                        mean_atol=1e-4, var_atol=1e-4, var_rtol=1e-3)

    before = running_stats(v.model)
    after = [(n, obs.running_after[n + ".running_mean"], obs.running_after[n + ".running_var"]) for n, _, _ in before]
    one_step = recover_batch_stats(before, after, 0.1, count_per_channel(v.model, tuple(batch.images.shape)))
    assert max(float((m - tm).abs().max()) for (_, m, _), (_, tm, _) in zip(one_step, truth)) > 0.1


# ---------------------------------------------------------------- labels not shared


def _run(cfg: RunConfig, tmp_path: Path):
    return run_setting(cfg, out_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    "threat, num_classes, expected",
    [
        (dict(), 3, [0, 0, 1, 2]),  # rocket wraps to class 0: a repeated label is counted
        # FedAvg shares lr x gradient: the delta is brought back to gradient units before counting
        (dict(update="fedavg", local_steps=1, local_lr=0.01), 10, [0, 1, 2, 3]),
        (dict(update="fedavg", local_steps=1, local_lr=0.01, attacker_knows_training=False), 10, [0, 1, 2, 3]),
    ],
    ids=["fedsgd-repeated", "fedavg-known", "fedavg-unknown"],
)
def test_runner_reports_label_accuracy_and_inferred_labels_when_labels_are_not_shared(
        threat, num_classes, expected, tmp_path):
    cfg = RunConfig(variant="lenet", variant_options=dict(num_classes=num_classes), images=FOUR, size=32,
                    threat=ThreatModel(shares_labels=False, **threat),
                    attack=AttackSpec(preset="ig", iterations=1, log_every=1))
    result = _run(cfg, tmp_path)
    assert sorted(result.target.labels.tolist()) == expected
    assert result.tags["inferred_labels"] == ",".join(map(str, expected))
    assert result.metrics["label_accuracy"] == 1.0
    assert "labels" not in json.loads(result.tags["grants"])
    assert json.loads((tmp_path / "metrics.json").read_text())["label_accuracy"] == 1.0


def test_label_accuracy_is_absent_when_labels_are_shared(tmp_path):
    cfg = RunConfig(variant="lenet", images=FOUR[:2], size=32, attack=AttackSpec(preset="ig", iterations=1))
    result = _run(cfg, tmp_path)
    assert "label_accuracy" not in result.metrics and "inferred_labels" not in result.tags


# ---------------------------------------------------------------- defenses reach the attacker


@pytest.fixture(scope="module")
def lenet_case():
    v, batch = variants.build("lenet", seed=0), _batch(["chelsea"])
    clean = Client(v.model, v.task, ThreatModel()).share(batch).update
    return v, batch, clean


def _check_defended(spec: str, clean: list[torch.Tensor], shared: list[torch.Tensor]) -> None:
    """``shared`` is ``clean`` post-processed as ``spec`` says (suite.threat.defenses' semantics)."""
    kind, _, param = spec.partition(":")
    c, s = _flat(clean), _flat(shared)
    if kind == "none":
        assert torch.equal(c, s)
    elif kind == "sign":
        assert torch.equal(s, torch.sign(c))
    elif kind == "qsgd":
        levels = 2 ** int(param) - 1
        for ct, st in zip(clean, shared):  # one bucket per tensor: integer multiples of |t| / s
            q = st.double() / (ct.double().norm() / levels)
            assert float((q - q.round()).abs().max()) < 1e-3 and float(q.abs().max()) <= levels + 1e-3
            assert bool(((torch.sign(st) == torch.sign(ct)) | (st == 0)).all())
        assert not torch.equal(c, s)
    elif kind == "topk":
        kept = s != 0
        assert int(kept.sum()) == round(float(param) * c.numel())
        assert torch.equal(s[kept], c[kept])
        assert float(c[kept].abs().min()) >= float(c[~kept].abs().max())
    elif kind == "clip":
        bound = float(param)
        assert float(c.norm()) > bound  # the setting actually clips
        torch.testing.assert_close(s, c * (bound / c.norm()), rtol=1e-5, atol=1e-9)
    elif kind == "noise":
        sigma, d = float(param), s - c
        assert abs(float(d.std()) / sigma - 1) < 0.05
        assert abs(float(d.mean())) < 5 * sigma / math.sqrt(d.numel())
    else:  # pragma: no cover - a new family needs its check here
        raise AssertionError(f"no check for defense {spec}")


ONE_PER_FAMILY = ["none", "qsgd:4", "qsgd:1", "sign", "topk:0.1", "clip:0.1", "noise:0.1"]


@pytest.mark.parametrize("spec", ONE_PER_FAMILY)
def test_each_defense_changes_the_update_the_attacker_matches(spec, lenet_case):
    """Client -> Observation -> Attacker: the update the attacker matches is the clean gradient
    post-processed as specified. At the true image a cosine-matching attacker still sees a
    perfect match after flat clipping (one global factor) and without a defense; every other
    family moves the observed direction away from the true image's gradient."""
    v, batch, clean = lenet_case
    obs = Client(v.model, v.task, ThreatModel(defense=spec), seed=5).share(batch)
    _check_defended(spec, clean, obs.update)
    att = _attacker(v, obs)
    assert all(torch.equal(a.cpu(), o) for a, o in zip(att.target_update, obs.update))
    loss = att.matching_loss(batch.images)
    if spec in ("none", "clip:0.1"):
        assert abs(loss) < 1e-6
    else:
        assert loss > 1e-3


def test_every_sok_grid_setting_reaches_the_observation(lenet_case):
    """The whole ResNet-18 grid of runs/defenses.yaml, through the client."""
    v, batch, clean = lenet_case
    for spec in (s for family in SOK_GRIDS["resnet18"].values() for s in family):
        obs = Client(v.model, v.task, ThreatModel(defense=spec), seed=0).share(batch)
        _check_defended(spec, clean, obs.update)


def test_defenses_act_on_the_fedavg_delta_not_the_gradient(lenet_case):
    v, batch, _ = lenet_case
    threat = dict(update="fedavg", local_steps=2, local_lr=0.01)
    delta = Client(v.model, v.task, ThreatModel(**threat)).share(batch).update
    shared = Client(v.model, v.task, ThreatModel(**threat, defense="clip:0.1")).share(batch).update
    _check_defended("clip:0.1", delta, shared)


# ---------------------------------------------------------------- the study specs


def _axis(settings, key: str) -> list:
    def get(cfg, dotted):
        node = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    return [get(s.config, key) for s in settings]


def test_sok_local_updates_spec_covers_tables_1_and_2():
    paper = expand_settings(RUNS / "sok_local_updates.yaml", "paper")
    assert {s.config.variant for s in paper} == {"resnet18"}
    assert {s.config.threat.update for s in paper} == {"fedavg"}
    assert {s.config.attack.iterations for s in paper} == {8000}
    columns = {(s.config.threat.local_steps, s.config.threat.local_batch_size, len(s.config.images))
               for s in paper}
    # Tab. 1: K full-batch steps; Tab. 2: one epoch of K mini-batches of N / K images
    assert {k for k, bs, _ in columns if bs is None} == {1, 2, 4, 6, 8}
    minibatch = {(k, bs, n) for k, bs, n in columns if bs is not None}
    assert {k for k, _, _ in minibatch} == {2, 4, 8} and all(k * bs == n for k, bs, n in minibatch)
    for k, _, _ in columns:
        rows = [s for s in paper if s.config.threat.local_steps == k]
        assert {s.config.threat.attacker_knows_training for s in rows} == {True, False}
    assert {s.config.threat.local_epochs for s in paper} == {1}


def test_defenses_spec_is_the_sok_resnet18_grid_plus_the_baseline():
    grid = [d for family in SOK_GRIDS["resnet18"].values() for d in family]
    paper = expand_settings(RUNS / "defenses.yaml", "paper")
    assert list(dict.fromkeys(_axis(paper, "threat.defense"))) == ["none", *grid]
    assert {s.config.variant for s in paper} == {"resnet18"}
    assert {s.config.threat.update for s in paper} == {"gradient"}
    smoke = list(dict.fromkeys(_axis(expand_settings(RUNS / "defenses.yaml", "smoke"), "threat.defense")))
    assert smoke[0] == "none"
    families = {name: set(specs) for name, specs in SOK_GRIDS["resnet18"].items()}
    assert all(any(d in specs for d in smoke) for specs in families.values())


def test_fig2_has_the_bn_statistics_levels_as_an_axis():
    for profile in ("smoke", "paper"):
        settings = expand_settings(RUNS / "fig2_resnet_bn.yaml", profile)
        pairs = {(s.config.variant, s.config.threat.bn_stats) for s in settings}
        assert pairs == {(v, b) for v in ("preact_resnet18", "resnet18") for b in ("none", "running", "exact")}
        assert {s.config.threat.bn_mode for s in settings} == {"train"}
