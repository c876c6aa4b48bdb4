"""Batched restarts, the optimization loop's bookkeeping and the allocator tuning.

Timings live in ``python -m bench``; these tests check behaviour: batched restarts give the
sequential results, the loop leaves the model's parameters alone, and the switches work.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import variants
from suite import data
from suite.attack.attacker import Attacker
from suite.attack.batched_bn import vmappable_batch_norm
from suite.attack.objectives import UpdateMatcher
from suite.config import AttackSpec, parse_attack
from suite.data.batch import Batch
from suite.errors import GistressError
from suite.threat.client import Client
from suite.threat.threat_model import ThreatModel


@pytest.fixture(scope="module")
def pair32():
    return data.load("samples", task="classification", size=32, images=["astronaut", "coffee"], num_classes=10)


def _both_modes(variant, obs, **spec):
    out = {}
    for mode in ("sequential", "batched"):
        att = Attacker(variant, obs, AttackSpec(restart_mode=mode, **spec), seed=0)
        out[mode] = att.reconstruct()
    return out["sequential"], out["batched"]


def test_batched_restarts_reproduce_sequential_restarts_on_lenet(pair32):
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(pair32)
    seq, bat = _both_modes(v, obs, preset="ig", iterations=12, restarts=3, log_every=4)
    assert bat.restart_losses == pytest.approx(seq.restart_losses, rel=1e-4, abs=1e-6)
    assert bat.chosen == seq.chosen
    for a, b in zip(seq.restart_images, bat.restart_images):
        assert torch.allclose(a, b, atol=1e-4)
    # the same logged steps for the chosen restart, with the same values
    assert [r["step"] for r in bat.history] == [r["step"] for r in seq.history] == [0, 4, 8, 11]
    # the trajectory's logged value: signed steps amplify float differences of the two reduction
    # orders (measured 1.1-1.3e-4 relative at step 11 since the unclamped reference start)
    assert bat.history[-1]["matching_loss"] == pytest.approx(seq.history[-1]["matching_loss"], rel=5e-4)


def test_batched_prior_only_control_reproduces_sequential_control(pair32):
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(pair32)
    runs = [Attacker(v, obs, AttackSpec(preset="ig", iterations=6, restarts=2, restart_mode=mode), seed=0)
            .reconstruct(control=True) for mode in ("sequential", "batched")]
    for a, b in zip(runs[0].restart_images, runs[1].restart_images):
        assert torch.allclose(a, b, atol=1e-5)
    assert runs[1].history[-1]["matching_loss"] == 0.0 and runs[1].history[-1]["tv"] > 0


def test_batched_joint_labels_reproduce_sequential_per_restart_soft_labels(pair32):
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel(shares_labels=False)).share(pair32)
    seq, bat = _both_modes(v, obs, preset="ig", labels="joint", tv=0.0, iterations=8, restarts=2)
    assert bat.restart_losses == pytest.approx(seq.restart_losses, rel=1e-4, abs=1e-6)
    assert bat.restart_losses[0] != pytest.approx(bat.restart_losses[1])  # distinct soft labels per restart


def test_batched_objective_gradient_matches_sequential_in_train_mode_bn_with_bn_prior(pair32):
    """Train-mode BN with the BN prior and shared statistics: the vmapped objective's image
    gradient is each restart's own (float32 rounding only)."""
    v = variants.build("resnet18", stem="cifar", width=8, num_classes=10, seed=0)
    obs = Client(v.model, v.task, ThreatModel(bn_mode="train", bn_stats="exact")).share(pair32)
    att = Attacker(v, obs, AttackSpec(preset="gia_bn", iterations=1, restarts=2), seed=0)
    starts = torch.stack(att.initial_images())
    expected = []
    for r in range(2):
        x = starts[r].clone().requires_grad_(True)
        total, _ = att.objective(x, att.labels, control=False)
        expected.append(torch.autograd.grad(total, [x])[0])
    xs = starts.clone().requires_grad_(True)
    functional = (dict(zip(att.names, att.params)), dict(att.model.named_buffers()))
    with vmappable_batch_norm(att.model):
        totals, parts = torch.func.vmap(lambda x: att.objective(x, att.labels, False, functional=functional))(xs)
    assert "bn_prior" in parts and parts["bn_prior"].shape == (2,)
    got = torch.autograd.grad(totals.sum(), [xs])[0]
    for r in range(2):
        rel = float((got[r] - expected[r]).norm() / expected[r].norm())
        assert rel < 5e-5, rel


def test_vmapped_train_mode_batch_norm_double_backward_is_exact_in_float64():
    """The composite BN used under vmap: second-order gradients equal the sequential ones."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 5)).double().train()
    names = [n for n, _ in net.named_parameters()]
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    labels = torch.tensor([0, 3])
    target = [torch.randn_like(p) for p in params.values()]

    def match(grads):
        return -sum((g * t).sum() for g, t in zip(grads, target))

    xs = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    with vmappable_batch_norm(net):
        expected = torch.stack([torch.autograd.grad(match(torch.autograd.grad(
            F.cross_entropy(net(xs[r]), labels), list(params.values()), create_graph=True)), [xs])[0][r]
            for r in range(3)])

        def one(x):
            g = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(net, (p, buffers), (x,)),
                                                          labels))(params)
            return match([g[n] for n in names])

        got = torch.autograd.grad(torch.func.vmap(one)(xs).sum(), [xs])[0]
    assert float((got - expected).norm() / expected.norm()) < 1e-10
    assert "forward" not in vars(net[1])  # the layer's own forward is back


def test_restart_mode_auto_batches_on_cuda_only_and_batched_is_refused_where_unsupported(pair32):
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(pair32)
    att = Attacker(v, obs, AttackSpec(iterations=1, restarts=4), seed=0)
    assert att.why_not_batched() is None
    assert not att.batches_restarts(4)          # auto on CPU: sequential
    att.device = torch.device("cuda")           # the decision only, nothing runs
    assert att.batches_restarts(4) and not att.batches_restarts(1)

    with pytest.raises(GistressError, match="restart_mode=batched needs optimizer=adam"):
        parse_attack(preset="dlg", restart_mode="batched")

    yolo = variants.build("yolov8n", seed=0)
    det = data.load("samples", task="detection", size=64, images=["bus"])
    dobs = Client(yolo.model, yolo.task, ThreatModel(bn_mode="train")).share(det)
    with pytest.raises(GistressError, match="restart_mode=batched is not available here: the detection loss"):
        Attacker(yolo, dobs, AttackSpec(iterations=1, restarts=2, restart_mode="batched"), seed=0)
    auto = Attacker(yolo, dobs, AttackSpec(iterations=1, restarts=2), seed=0)
    auto.device = torch.device("cuda")
    assert not auto.batches_restarts(2)         # auto falls back to sequential


def test_attack_step_leaves_the_model_parameters_without_gradients(pair32):
    """The image is the only thing optimized: no second-order terms are pushed into the model."""
    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(pair32)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=3), seed=0)
    att.reconstruct()
    assert all(p.grad is None for p in att.params)


def test_cosine_matcher_equals_the_concatenated_formula_with_layer_weights():
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 16)]
    names = ["conv.weight", "conv.bias", "fc.weight"]
    target = [torch.randn(s) for s in shapes]
    cand = [torch.randn(s) for s in shapes]
    weights = {"conv.bias": 0.0, "fc.*": 2.0}
    got = UpdateMatcher(target, names, "cosine", weights)(cand)
    w = [1.0, 0.0, 2.0]
    dot = sum(wi * (c * t).sum() for wi, c, t in zip(w, cand, target))
    cn = sum(wi * c.pow(2).sum() for wi, c in zip(w, cand)).sqrt()
    tn = sum(wi * t.pow(2).sum() for wi, t in zip(w, target)).sqrt()
    assert float(got) == pytest.approx(float(1 - dot / (cn * tn)), rel=1e-6)
    # a parameter whose candidate gradient is exactly zero (an unused layer) gives no NaN
    partly_zero = [c.clone().requires_grad_(True) for c in cand[:2]] + [torch.zeros(10, 16, requires_grad=True)]
    g = torch.autograd.grad(UpdateMatcher(target, names, "cosine")(partly_zero), partly_zero)
    assert all(torch.isfinite(gi).all() for gi in g)


def test_divergence_in_one_batched_restart_fails_the_attack_at_its_step(pair32, monkeypatch):
    from suite.errors import DivergenceError

    v = variants.build("lenet", seed=0)
    obs = Client(v.model, v.task, ThreatModel()).share(pair32)
    att = Attacker(v, obs, AttackSpec(iterations=6, restarts=2, restart_mode="batched"), seed=0)
    real = att.matcher.__call__
    calls = {"n": 0}

    def poisoned(candidate):
        calls["n"] += 1
        value = real(candidate)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(att, "matcher", poisoned)
    with pytest.raises(DivergenceError, match="diverged at step 2: matching_loss=nan"):
        att.reconstruct()


def _allocator_probe(env_extra: dict[str, str]) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GISTRESS_MALLOC"))}
    env.update(env_extra)
    code = "from suite.attack.allocator import tune_allocator; print(tune_allocator(), tune_allocator())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_applies_once_and_yields_to_the_user():
    assert _allocator_probe({}) == "True True"
    assert _allocator_probe({"GISTRESS_MALLOC_TUNING": "0"}) == "False False"
    assert _allocator_probe({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False False"


def test_batch_of_detection_is_still_sequential_and_runs():
    """Detection restarts stay sequential under auto and still pick the lowest matching loss."""
    yolo = variants.build("yolov8n", seed=0)
    x = torch.rand(1, 3, 64, 64)
    batch = Batch(images=x, boxes=[torch.tensor([[8.0, 8.0, 40.0, 48.0]])], classes=[torch.tensor([0])])
    obs = Client(yolo.model, yolo.task, ThreatModel(bn_mode="train")).share(batch)
    rec = Attacker(yolo, obs, AttackSpec(iterations=2, restarts=2), seed=0).reconstruct()
    assert len(rec.restart_losses) == 2 and rec.chosen == min(range(2), key=lambda i: rec.restart_losses[i])


def test_cosine_matcher_hand_written_backward_passes_gradcheck():
    torch.manual_seed(0)
    shapes = [(3, 2, 3, 3), (3,), (4, 5)]
    names = ["conv.weight", "conv.bias", "fc.weight"]
    target = [torch.randn(s, dtype=torch.float64) for s in shapes]
    cand = tuple(torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes)
    matcher = UpdateMatcher(target, names, "cosine", {"fc.*": 2.0})
    assert torch.autograd.gradcheck(lambda *c: matcher(list(c)), cand)


def test_grouped_conv_derivative_passes_gradgradcheck_with_stride_padding_dilation():
    from suite.attack.convgrad import GroupedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return GroupedConv2d.apply(x, w, b, (2, 1), (1, 2), (1, 2), 2)

    assert torch.allclose(f(x, w, b), F.conv2d(x, w, b, (2, 1), (1, 2), (1, 2), 2))
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_attacker_switches_only_grouped_convs_and_keeps_the_image_gradient():
    from timm.layers.conv2d_same import Conv2dSame

    from suite.attack.convgrad import use_grouped_conv_derivative

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.Conv2d(8, 8, 5, padding=2, groups=8),
                        Conv2dSame(8, 8, 3, stride=2, groups=8), nn.Conv2d(8, 8, 3, stride=2, groups=2),
                        nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    net(x)
    params = [p for p in net.parameters()]
    target = [torch.randn_like(p) for p in params]

    def image_grad():
        xr = x.clone().requires_grad_(True)
        grads = torch.autograd.grad(F.cross_entropy(net(xr), torch.tensor([0, 2])), params, create_graph=True)
        return torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, target)), [xr])[0]

    expected = image_grad()
    assert use_grouped_conv_derivative(net) == 3
    assert torch.allclose(image_grad(), expected, rtol=1e-10, atol=1e-12)
