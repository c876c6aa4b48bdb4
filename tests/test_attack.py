"""The classification attack engine: client honesty, the attacker, controls and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import variants
from suite import data
from suite.attack.attacker import Attacker
from suite.config import AttackSpec, RunConfig
from suite.errors import GistressError
from suite.scoring.metrics import score
from suite.threat.client import Client
from suite.threat.threat_model import ThreatModel


def _psnr(a, b):
    return float(10 * torch.log10(1 / ((a.clamp(0, 1) - b) ** 2).mean()))


@pytest.fixture(scope="module")
def astronaut32():
    return data.load("samples", task="classification", size=32, images=["astronaut"], num_classes=10)


def test_dlg_lenet_recovers_image_above_30db(astronaut32):
    """The textbook DLG claim: sigmoid LeNet, one 32x32 natural image, label known, L-BFGS.

    The attacker runs its whole budget and chooses what to return by its own objective; only
    the returned reconstruction is scored against the target.
    """
    torch.manual_seed(0)
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(astronaut32)
    spec = AttackSpec(preset="dlg", iterations=300, log_every=300)
    recon = Attacker(v, obs, spec, seed=0).reconstruct()
    assert _psnr(recon.images, astronaut32.images) > 30


def test_train_mode_client_gradient_equals_training_step_and_stats_move():
    v = variants.build("resnet18", stem="cifar", num_classes=10, seed=1)
    batch = data.load("samples", task="classification", size=32, images=["astronaut", "coffee"], num_classes=10)
    reference = copy.deepcopy(v.model).train()
    loss = F.cross_entropy(reference(batch.images), batch.labels)
    expected = torch.autograd.grad(loss, [p for p in reference.parameters()])

    before = {k: t.clone() for k, t in v.model.state_dict().items() if "running_mean" in k}
    client = Client(v.model, v.task, ThreatModel(bn_mode="train"), num_classes=10)
    obs = client.share(batch)
    assert len(obs.update) == len(expected)
    for got, want in zip(obs.update, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the server's state is what it sent; the client's running statistics moved in its round
    for k, t in before.items():
        torch.testing.assert_close(obs.model_state[k], t)
    obs_running = Client(v.model, v.task, ThreatModel(bn_mode="train", bn_stats="running"), num_classes=10).share(batch)
    moved = [k for k in before if not torch.allclose(obs_running.running_after[k], before[k])]
    assert len(moved) == len(before)
    assert obs.labels is not None and "bn_stats" not in obs.grants


def test_observation_carries_only_granted_side_information(astronaut32):
    v = variants.build("lenet")
    obs = Client(v.model, v.task, ThreatModel(shares_labels=False)).share(astronaut32)
    assert obs.labels is None and obs.running_after is None and obs.bn_stats is None
    assert not hasattr(obs, "images")
    assert set(obs.grants) == {"update"}


def _run(cfg):
    import tempfile
    from pathlib import Path

    from suite.execution.runner import run_setting

    with tempfile.TemporaryDirectory() as d:
        return run_setting(cfg, out_dir=Path(d), progress=False)


def test_ig_attack_beats_random_init_and_prior_only_control_where_gradients_inform():
    """Sigmoid LeNet: a short ig attack gains over its random start and over the TV-only control."""
    cfg = RunConfig(variant="lenet", images=["chelsea"], size=32,
                    attack=AttackSpec(preset="ig", iterations=100, tv=0.05, control=True, log_every=50))
    m = _run(cfg).metrics
    # measured here: psnr 19.1, init 7.1, control 16.0
    assert m["psnr"] > m["init_psnr"] + 8.0
    assert m["psnr"] > m["control_psnr"] + 2.0
    assert m["gain_psnr"] == pytest.approx(m["psnr"] - m["control_psnr"])


def test_ig_on_cifar_resnet18_eval_mode_uses_the_gradient():
    """CIFAR-stem ResNet18, eval-mode BN on calibrated weights: the gradient term lowers the
    matching loss well below the prior-only control's. At this budget the PSNR does NOT beat
    the control (measured at this budget: attack 11.2 dB, control 14.8 dB, init 11.0 dB; matching
    loss 0.61 vs 0.73; docs/findings.md has longer budgets): a randomly initialised
    BN ResNet amplifies 1% input noise into a 15% logit change, so the cosine landscape is
    nearly flat away from the target. See the issue note; the finding matches the first paper's
    post-activation ResNet18 result."""
    cfg = RunConfig(variant="resnet18", variant_options=dict(stem="cifar", width=16), weights="calibrated",
                    images=["chelsea"], size=32, threat=ThreatModel(bn_mode="eval"),
                    attack=AttackSpec(preset="ig", iterations=60, lr=0.01, tv=0.05, control=True, log_every=30))
    m = _run(cfg).metrics
    assert m["matching_loss"] < m["control_matching_loss"] - 0.05
    assert all(k in m for k in ("psnr", "control_psnr", "init_psnr", "gain_psnr", "wsrr"))


def test_restarts_choose_by_matching_loss_not_ground_truth(astronaut32):
    """Three restarts from starts where the one closest to the target (a noisy copy of it) is not
    the one with the lowest matching loss (flat gray; measured 12.6 dB / 0.027 against 11.0 dB /
    0.019): the attacker returns the latter, by the matching loss recomputed here."""
    v = variants.build("lenet")
    obs = Client(v.model, v.task, ThreatModel()).share(astronaut32)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=5, restarts=3), seed=0)
    noise = torch.randn(astronaut32.images.shape, generator=torch.Generator().manual_seed(5))
    starts = [astronaut32.images + 0.3 * noise, torch.full_like(astronaut32.images, 0.5),
              att.initial_images()[0]]
    rec = att.reconstruct(starts)
    losses = [att.matching_loss(im) for im in rec.restart_images]
    # the API has no target: scores of every restart are computed afterwards, by the caller
    psnr = [score(astronaut32.images, im, use_lpips=False).psnr[0] for im in rec.restart_images]
    by_loss = min(range(3), key=losses.__getitem__)
    assert max(range(3), key=psnr.__getitem__) != by_loss, (psnr, losses)  # the case tells the rules apart
    assert rec.chosen == by_loss and torch.equal(rec.images, rec.restart_images[by_loss])
    assert rec.restart_losses == pytest.approx(losses, rel=1e-4)


def test_prior_only_control_ignores_gradients(astronaut32):
    v = variants.build("lenet")
    obs = Client(v.model, v.task, ThreatModel()).share(astronaut32)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=10, tv=0.1), seed=0)
    init = att.initial_images()
    a = att.reconstruct(init, control=True)
    obs.update = [torch.randn_like(u) for u in obs.update]  # a different update changes nothing
    b = Attacker(v, obs, AttackSpec(preset="ig", iterations=10, tv=0.1), seed=0).reconstruct(init, control=True)
    torch.testing.assert_close(a.images, b.images)


def test_label_inference_idlg_when_labels_not_shared(astronaut32):
    v = variants.build("lenet")
    obs = Client(v.model, v.task, ThreatModel(shares_labels=False)).share(astronaut32)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=1), seed=0)
    assert att.inferred_labels.tolist() == astronaut32.labels.tolist()


def test_joint_soft_labels_run_when_labels_not_shared(astronaut32):
    v = variants.build("lenet")
    obs = Client(v.model, v.task, ThreatModel(shares_labels=False)).share(astronaut32)
    rec = Attacker(v, obs, AttackSpec(preset="dlg", iterations=3), seed=0).reconstruct()
    # the jointly optimized soft labels come back as the recovered labels (their arg-max)
    assert torch.isfinite(rec.images).all() and rec.labels.shape == (1,) and 0 <= int(rec.labels) < 10


def test_jointly_recovered_labels_are_scored_and_tagged(tmp_path):
    from suite.execution.runner import run_setting

    cfg = RunConfig(variant="lenet", size=32, device="cpu", threat={"shares_labels": False},
                    attack={"preset": "dlg", "iterations": 40, "log_every": 40})
    res = run_setting(cfg, out_dir=tmp_path / "out", progress=False)
    assert res.tags["recovered_labels"] == str(int(res.reconstruction.labels[0]))
    truth = int(res.target.labels[0])
    assert res.metrics["label_accuracy"] == float(int(res.reconstruction.labels[0]) == truth)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "convnext_t", "maxvit_t"])
def test_modern_224_attack_step_gives_finite_nonzero_input_gradient(name):
    v = variants.build(name, seed=0)
    assert v.input_size == 224
    x = torch.rand(1, 3, 224, 224)
    batch = data.Batch(images=x, labels=torch.tensor([1]))
    obs = Client(v.model, v.task, ThreatModel(bn_mode="train"), num_classes=v.num_classes).share(batch)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=1), seed=0)
    start = torch.rand(1, 3, 224, 224, requires_grad=True)
    from suite.attack.attacker import math_attention

    with math_attention():
        total, _ = att.objective(start, att.labels, control=False)
        (grad,) = torch.autograd.grad(total, start)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


def test_fedavg_one_step_equals_lr_times_gradient(astronaut32):
    v = variants.build("lenet")
    g = Client(v.model, v.task, ThreatModel()).share(astronaut32).update
    d = Client(v.model, v.task, ThreatModel(update="fedavg", local_steps=1, local_lr=0.05)).share(astronaut32).update
    for gi, di in zip(g, d):
        torch.testing.assert_close(di, 0.05 * gi, rtol=1e-4, atol=1e-7)


def test_fedavg_attack_simulating_local_steps_lowers_matching_loss():
    batch = data.load("samples", task="classification", size=32, images=["astronaut", "coffee"], num_classes=10)
    v = variants.build("lenet")
    threat = ThreatModel(update="fedavg", local_steps=2, local_batch_size=1, local_lr=0.1)
    obs = Client(v.model, v.task, threat).share(batch)
    assert obs.training["local_steps"] == 2
    rec = Attacker(v, obs, AttackSpec(preset="ig", iterations=30, tv=0.0, log_every=29), seed=0).reconstruct()
    assert rec.history[-1]["matching_loss"] < rec.history[0]["matching_loss"]


# ----- bad input ---------------------------------------------------------------------------

def test_unknown_preset_and_objective_are_one_line_errors():
    from suite.config import parse_attack

    with pytest.raises(GistressError, match="unknown preset 'igg'.*did you mean ig"):
        parse_attack(preset="igg")
    with pytest.raises(GistressError, match="objective"):
        parse_attack(objective="cos")


def test_labels_out_of_range_error(astronaut32):
    v = variants.build("lenet", num_classes=2)
    bad = data.Batch(images=astronaut32.images, labels=torch.tensor([5]))
    with pytest.raises(GistressError, match="label 5 out of range"):
        Client(v.model, v.task, ThreatModel(), num_classes=2).share(bad)
