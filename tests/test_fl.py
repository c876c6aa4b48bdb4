"""Federated-learning realism: update defenses, label inference, BN-statistics recovery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from suite.attack.labels import estimate_mean_probs, infer_labels, label_accuracy
from suite.errors import GistressError
from suite.model.bnstats import (
    batch_stats,
    bn_momentum,
    count_per_channel,
    recover_batch_stats,
    running_stats,
)
from suite.threat.defenses import SOK_GRIDS, SOK_TOPK_PRUNED, apply_defense, parse_defense
from suite.threat.threat_model import ThreatModel


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _update(seed: int = 0) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(16, 3, 3, 3, generator=g), torch.randn(16, generator=g), torch.randn(10, 64, generator=g)]


def cifar_resnet18(seed: int, num_classes: int = 10) -> nn.Module:
    """A fresh torchvision ResNet18 with the CIFAR stem (3x3 stride-1 conv, no max-pool)."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.train()


def _fc_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = F.cross_entropy(model(x), y)
    return torch.autograd.grad(loss, [model.fc.weight, model.fc.bias])


# ---------------------------------------------------------------- defenses: spec parsing


@pytest.mark.parametrize(
    "spec, expected",
    [("none", ("none", None)), ("sign", ("sign", None)), ("qsgd:3", ("qsgd", 3)),
     ("topk:0.1", ("topk", 0.1)), ("topk:1", ("topk", 1.0)), ("clip:0.05", ("clip", 0.05)),
     ("noise:0", ("noise", 0.0)), ("noise:1e-3", ("noise", 0.001))],
)
def test_parse_defense_accepts(spec, expected):
    assert parse_defense(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["qsgd:0", "qsgd:17", "qsgd:1.5", "qsgd", "topk:1.5", "topk:0", "topk:-0.2", "topk:",
     "clip:-1", "clip:0", "noise:abc", "noise:-0.1", "noise:nan", "clip:inf", "sign:1", "none:0",
     "gauss:0.1", "topK:0.1"],
)
def test_parse_defense_rejects(spec):
    with pytest.raises(GistressError) as err:
        parse_defense(spec)
    assert err.value.hint


def test_sok_grids_are_the_papers_grids_in_our_parameterization():
    for family in ("resnet18", "swin"):
        grid = SOK_GRIDS[family]
        for specs in grid.values():
            for spec in specs:
                parse_defense(spec)
                ThreatModel(defense=spec)
        keeps = [parse_defense(s)[1] for s in grid["sparsification"]]
        assert keeps == pytest.approx([1 - p for p in SOK_TOPK_PRUNED], abs=1e-12)
        assert [parse_defense(s)[1] for s in grid["quantization"][:4]] == [1, 2, 3, 4]
        assert grid["quantization"][4] == "sign"
    bounds = {f: [parse_defense(s)[1] for s in SOK_GRIDS[f]["clipping"]] for f in SOK_GRIDS}
    sigmas = {f: [parse_defense(s)[1] for s in SOK_GRIDS[f]["perturbation"]] for f in SOK_GRIDS}
    assert bounds == {"resnet18": [0.5, 0.3, 0.1, 0.05, 0.01], "swin": [1, 0.7, 0.5, 0.3, 0.1]}
    assert sigmas == {"resnet18": [0.05, 0.1, 0.15, 0.2, 0.25],
                      "swin": [0.005, 0.007, 0.01, 0.03, 0.05]}


# ---------------------------------------------------------------- defenses: semantics


@pytest.mark.parametrize("spec", ["none", "sign", "qsgd:2", "topk:0.3", "clip:0.1", "noise:0.1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_defense_keeps_shapes_and_dtypes_and_input(spec, dtype):
    update = [t.to(dtype) for t in _update()]
    before = [t.clone() for t in update]
    out = apply_defense(update, spec, generator=_gen(1))
    assert [(o.shape, o.dtype) for o in out] == [(t.shape, t.dtype) for t in update]
    assert all(torch.equal(t, b) for t, b in zip(update, before))  # input not modified
    assert all(o.data_ptr() != t.data_ptr() for o, t in zip(out, update))


def test_none_returns_equal_copies():
    update = _update()
    out = apply_defense(update, "none")
    assert all(torch.equal(o, t) for o, t in zip(out, update))
    out[0].zero_()
    assert update[0].abs().sum() > 0


@pytest.mark.parametrize("keep", [0.05, 0.2, 0.5, 0.9])
def test_topk_keeps_the_global_largest_fraction(keep):
    g = _gen(2)
    update = [torch.randn(1000, generator=g), torch.randn(37, 5, generator=g),
              1e-3 * torch.randn(64, 8, generator=g)]  # a layer of tiny entries
    total = sum(t.numel() for t in update)
    out = apply_defense(update, f"topk:{keep}")
    flat_in, flat_out = torch.cat([t.reshape(-1) for t in update]), torch.cat([o.reshape(-1) for o in out])
    kept = flat_out != 0
    assert abs(int((~kept).sum()) - (1 - keep) * total) <= 1
    assert torch.equal(flat_out[kept], flat_in[kept])
    assert flat_in[kept].abs().min() >= flat_in[~kept].abs().max()
    if keep <= 0.5:  # global, not per-layer: the tiny layer is pruned entirely
        assert int(out[2].count_nonzero()) == 0


def test_topk_ties_keep_exactly_k():
    out = apply_defense([torch.ones(10, 10)], "topk:0.37")
    assert int(out[0].count_nonzero()) == 37


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_qsgd_takes_at_most_2s_plus_1_values_on_the_norm_grid(bits):
    s = 2**bits - 1
    update = [t * 10 for t in _update(3)] + [torch.zeros(5)]
    out = apply_defense(update, f"qsgd:{bits}", generator=_gen(4))
    for t, o in zip(update, out):
        assert torch.unique(o).numel() <= 2 * s + 1
        norm = float(t.norm())
        if norm == 0:
            assert int(o.count_nonzero()) == 0
            continue
        level = o.abs() / norm * s
        assert torch.allclose(level, level.round(), atol=1e-4) and float(level.max()) <= s + 1e-4
        nz = o != 0
        assert torch.equal(torch.sign(o[nz]), torch.sign(t[nz]))


@pytest.mark.parametrize("bits", [1, 2])
def test_qsgd_is_unbiased(bits):
    s, draws = 2**bits - 1, 4000
    v = torch.randn(64, generator=_gen(5))
    out = torch.stack(apply_defense([v] * draws, f"qsgd:{bits}", generator=_gen(6)))
    # per entry the std of one draw is at most ||v|| / (2s); allow 5 standard errors of the mean
    tol = 5 * float(v.norm()) / (2 * s * math.sqrt(draws))
    assert float((out.mean(0) - v).abs().max()) < tol
    # the tolerance is far below the up-to ||v||/(2s) bias of deterministic rounding
    assert tol < 0.1 * float(v.norm()) / (2 * s)
    assert float(out.var(0).max()) > 0  # stochastic, not deterministic rounding


def test_sign_values():
    update = _update() + [torch.tensor([0.0, -0.0, 2.0, -3e-9])]
    out = apply_defense(update, "sign")
    for t, o in zip(update, out):
        assert set(torch.unique(o).tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(o, torch.sign(t))


@pytest.mark.parametrize("bound", [0.01, 0.5, 3.0])
def test_clip_bounds_the_global_norm(bound):
    update = _update()
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in update))
    assert norm > 3.0
    out = apply_defense(update, f"clip:{bound}")
    out_norm = math.sqrt(sum(float(o.double().pow(2).sum()) for o in out))
    assert out_norm <= bound + 1e-6
    assert out_norm == pytest.approx(bound, rel=1e-5)
    factor = bound / norm  # one factor for all layers: flat clipping keeps the direction
    assert all(torch.allclose(o, t * factor, rtol=1e-5, atol=1e-9) for o, t in zip(out, update))


def test_clip_leaves_a_small_update_unchanged():
    update = [t * 1e-3 for t in _update()]
    out = apply_defense(update, "clip:1")
    assert all(torch.equal(o, t) for o, t in zip(out, update))


def test_noise_has_the_requested_variance():
    sigma = 0.1
    x = torch.randn(1000, 1000, generator=_gen(7))
    (out,) = apply_defense([x], f"noise:{sigma}", generator=_gen(8))
    diff = (out - x).double()
    assert float(diff.var()) == pytest.approx(sigma**2, rel=0.05)
    assert abs(float(diff.mean())) < 5 * sigma / 1000  # 5 standard errors of the mean


@pytest.mark.parametrize("spec", ["qsgd:2", "noise:0.1"])
def test_seeded_generator_is_deterministic(spec):
    update = _update()
    a = apply_defense(update, spec, generator=_gen(11))
    b = apply_defense(update, spec, generator=_gen(11))
    c = apply_defense(update, spec, generator=_gen(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    apply_defense(update, spec)  # the global RNG works too


@pytest.mark.parametrize("update", [torch.ones(3), [torch.ones(3, dtype=torch.int64)], [[1.0, 2.0]]])
def test_apply_defense_rejects_bad_updates(update):
    with pytest.raises(GistressError):
        apply_defense(update, "sign")


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("seed, label", [(0, 0), (1, 7), (2, 3)])
def test_idlg_is_exact_for_one_sample(seed, label):
    model = cifar_resnet18(seed)
    x = torch.rand(1, 3, 32, 32, generator=_gen(100 + seed))
    gw, gb = _fc_grads(model, x, torch.tensor([label]))
    assert infer_labels(gw, gb, 1).tolist() == [label]
    assert infer_labels(gw, None, 1).tolist() == [label]  # row sums: ReLU features are >= 0
    assert infer_labels(gw, gb, 1, method="idlg").dtype == torch.int64


@pytest.mark.parametrize("seed", [3, 4])
def test_label_inference_is_exact_on_distinct_labels_for_a_fresh_cifar_resnet18(seed):
    # seeds where the uniform-probability estimate (no mean_probs) miscounts at B = 8: 0.75
    batch = 8
    model = cifar_resnet18(seed)
    g = _gen(100 + seed)
    x = torch.rand(batch, 3, 32, 32, generator=g)
    y = torch.randperm(10, generator=g)[:batch]
    probs = estimate_mean_probs(model, torch.rand(batch, 3, 32, 32, generator=g))
    gw, gb = _fc_grads(model, x, y)
    assert infer_labels(gw, gb, batch, mean_probs=probs).tolist() == y.sort().values.tolist()
    assert infer_labels(gw, gb, batch, mean_probs=probs, method="distinct").tolist() == y.sort().values.tolist()


def test_label_counting_without_probability_estimate_is_exact_at_batch_4():
    for seed in (0, 1):
        model = cifar_resnet18(seed)
        g = _gen(200 + seed)
        x = torch.rand(4, 3, 32, 32, generator=g)
        y = torch.randperm(10, generator=g)[:4]
        gw, gb = _fc_grads(model, x, y)
        assert infer_labels(gw, gb, 4).tolist() == y.sort().values.tolist()


@pytest.mark.parametrize("seed", [5])
def test_label_counts_are_exact_with_repeated_labels_for_a_fresh_cifar_resnet18(seed):
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    model = cifar_resnet18(seed)
    g = _gen(300 + seed)
    x = torch.rand(len(y), 3, 32, 32, generator=g)
    probs = estimate_mean_probs(model, torch.rand(len(y), 3, 32, 32, generator=g))
    gw, gb = _fc_grads(model, x, y)
    inferred = infer_labels(gw, gb, len(y), mean_probs=probs)
    assert label_accuracy(inferred, y) == 1.0
    # without a bias the row-sum estimate is rougher (measured 0.875-1.0 over 6 seeds)
    assert label_accuracy(infer_labels(gw, None, len(y), mean_probs=probs), y) >= 0.75


def test_label_counts_are_exact_with_true_mean_probs_on_a_confident_model():
    # the counting identity itself: with the true batch-mean softmax every count is exact,
    # however confident the model, and a summed loss gives the same answer
    g = _gen(9)
    batch, classes, dim = 32, 10, 20
    w, b = 3 * torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g)
    h = torch.rand(batch, dim, generator=g)
    y = torch.randint(0, 6, (batch,), generator=g)
    w.requires_grad_(True)
    b.requires_grad_(True)
    logits = h @ w.T + b
    for reduction in ("mean", "sum"):
        gw, gb = torch.autograd.grad(F.cross_entropy(logits, y, reduction=reduction), [w, b], retain_graph=True)
        inferred = infer_labels(gw, gb, batch, mean_probs=logits.softmax(1).mean(0), reduction=reduction)
        assert inferred.tolist() == y.sort().values.tolist()


def test_label_accuracy_is_multiset_overlap():
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([2, 1, 2])) == pytest.approx(2 / 3)
    assert label_accuracy(torch.tensor([3, 0, 5]), torch.tensor([5, 3, 0])) == 1.0
    assert label_accuracy(torch.tensor([4, 4]), torch.tensor([1, 2])) == 0.0
    with pytest.raises(GistressError):
        label_accuracy(torch.tensor([1, 2]), torch.tensor([1]))


@pytest.mark.parametrize(
    "kwargs",
    [dict(batch_size=2, method="idlg"), dict(batch_size=0), dict(batch_size=11, method="distinct"),
     dict(batch_size=2, method="magic"), dict(batch_size=2, bias_grad=torch.zeros(9)),
     dict(batch_size=2, mean_probs=torch.zeros(10)), dict(batch_size=2, reduction="max")],
)
def test_infer_labels_rejects_bad_input(kwargs):
    args = dict(weight_grad=torch.randn(10, 4), bias_grad=torch.randn(10), batch_size=2) | kwargs
    with pytest.raises(GistressError):
        infer_labels(args.pop("weight_grad"), args.pop("bias_grad"), args.pop("batch_size"), **args)


# ---------------------------------------------------------------- BN statistics


def small_bn_cnn(seed: int, momentum: float) -> nn.Module:
    """Two conv-BN blocks and a BatchNorm1d on a linear layer (4 elements per channel at B=4)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32, momentum=momentum),
        nn.ReLU(), nn.Linear(32, 10),
    )


def _randomize_running_stats(model: nn.Module, g: torch.Generator) -> None:
    # away from the 0/1 init so that 'before' matters in the inversion
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 1, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)


def _one_step_recovery(model: nn.Module, momentum: float, seed: int):
    g = _gen(seed)
    _randomize_running_stats(model, g)
    x = torch.rand(4, 3, 32, 32, generator=g)
    counts = count_per_channel(model, tuple(x.shape))
    truth = batch_stats(model, x)
    before = running_stats(model)
    model.train()
    with torch.no_grad():
        model(x)
    after = running_stats(model)
    return truth, before, after, counts


# float32 buffers of size ~1 carry ~6e-8 rounding, which the division by m = 0.1 amplifies
# tenfold; measured max errors: means 3.0e-6, variances 1.5e-6 (absolute) over both models
MEAN_ATOL = 1e-5
VAR_ATOL, VAR_RTOL = 1e-5, 1e-4


def _assert_close(recovered, truth):
    assert [r[0] for r in recovered] == [t[0] for t in truth]
    for (_, rm, rv), (_, tm, tv) in zip(recovered, truth):
        assert float((rm - tm).abs().max()) <= MEAN_ATOL
        assert bool(((rv - tv).abs() <= VAR_ATOL + VAR_RTOL * tv.abs()).all())


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_recovered_bn_stats_match_the_batch_small_cnn(momentum):
    model = small_bn_cnn(0, momentum)
    truth, before, after, counts = _one_step_recovery(model, momentum, seed=5)
    assert list(counts.values()) == [4 * 32 * 32, 4 * 16 * 16, 4]
    _assert_close(recover_batch_stats(before, after, momentum, counts), truth)
    _assert_close(recover_batch_stats(before, after, momentum, list(counts.values())), truth)
    # without the (n-1)/n correction the 4-element BatchNorm1d is a third off
    _, _, unbiased = recover_batch_stats(before, after, momentum)[-1]
    assert float(unbiased.sum() / truth[-1][2].sum()) == pytest.approx(4 / 3, rel=1e-3)


def test_recovered_bn_stats_match_the_batch_cifar_resnet18():
    model = cifar_resnet18(0)
    truth, before, after, counts = _one_step_recovery(model, 0.1, seed=6)
    assert len(truth) == 20 and min(counts.values()) == 4 * 4 * 4
    _assert_close(recover_batch_stats(before, after, 0.1, counts), truth)
    # the first paper's 10*after - 9*before is the same inversion at m = 0.1
    for (_, mean, var), (_, mb, vb), (_, ma, va) in zip(recover_batch_stats(before, after, 0.1), before, after):
        assert torch.allclose(mean, 10 * ma - 9 * mb, atol=1e-5)
        assert torch.allclose(var, 10 * va - 9 * vb, atol=1e-5)


def test_batch_stats_is_the_normalizing_statistic_and_leaves_the_model_untouched():
    model = small_bn_cnn(1, 0.1).eval()
    _randomize_running_stats(model, _gen(7))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 32, 32, generator=_gen(8))
    stats = batch_stats(model, x)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the first BN sees conv1's output: compare with a direct biased mean/var
    first = model[0](x).detach().double()
    assert torch.allclose(stats[0][1].double(), first.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(stats[0][2].double(), first.var((0, 2, 3), unbiased=False), atol=1e-6)
    # the BatchNorm1d sees 4 values per channel, where biased and unbiased differ by 4/3:
    # normalizing with the returned variance reproduces train-mode BN
    model.train()
    with torch.no_grad():
        inp = model[:9](x)
    bn = model[9]
    _, mean, var = stats[-1]
    manual = (inp - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(manual, F.batch_norm(inp, None, None, bn.weight, bn.bias, training=True, eps=bn.eps),
                          atol=1e-5)


@pytest.mark.parametrize("momentum", [None, 0, 0.0, -0.1, 1.5, "0.1", True])
def test_recover_rejects_uninvertible_momentum(momentum):
    stats = running_stats(small_bn_cnn(0, 0.1))
    with pytest.raises(GistressError) as err:
        recover_batch_stats(stats, stats, momentum)
    assert err.value.hint


@pytest.mark.parametrize("n", [1, [4096, 1024], {"1": 4096}, 2.5])
def test_recover_rejects_bad_counts(n):
    stats = running_stats(small_bn_cnn(0, 0.1))
    with pytest.raises(GistressError):
        recover_batch_stats(stats, stats, 0.1, n)


def test_recover_rejects_mismatched_layers():
    a = running_stats(small_bn_cnn(0, 0.1))
    with pytest.raises(GistressError):
        recover_batch_stats(a, a[:-1], 0.1)


def test_bn_momentum_reads_the_models_momentum():
    model = small_bn_cnn(0, 0.3)
    assert bn_momentum(model) == 0.3
    model[4].momentum = 0.1
    with pytest.raises(GistressError):
        bn_momentum(model)
    model[4].momentum = None
    with pytest.raises(GistressError):
        bn_momentum(model)
    with pytest.raises(GistressError):
        bn_momentum(nn.Linear(2, 2))
