"""Tests for suite.scoring.metrics: PSNR/SSIM/LPIPS scoring, matching, content regions, leak rates."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from suite.errors import GistressError
from suite.results import Scores
from suite.scoring import metrics
from suite.scoring.leak_rule import LeakRule

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision AlexNet_Weights.IMAGENET1K_V1


def _images(b=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def _pm_noise(shape, amp, seed=1):
    """Noise of exactly +-amp per pixel: MSE is amp**2 by construction."""
    g = torch.Generator().manual_seed(seed)
    return amp * (torch.randint(0, 2, shape, generator=g).float() * 2 - 1)


class _FixedLpips(torch.nn.Module):
    """Stands in for the LPIPS network: returns preset distances, one per call."""

    def __init__(self, values):
        super().__init__()
        self.values = list(values)

    def forward(self, a, b, normalize=False):
        assert normalize, "score() must ask LPIPS to rescale [0, 1] inputs"
        return torch.tensor([[[[self.values.pop(0)]]]])


@pytest.fixture
def no_network(monkeypatch):
    """Any connection, DNS lookup or hub download fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty TORCH_HOME and a fresh LPIPS cache for this test."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so get_dir() follows TORCH_HOME
    monkeypatch.setattr(metrics, "_LPIPS_CACHE", {})
    return home


# --------------------------------------------------------------------------- PSNR / SSIM


def test_identical_images_cap_psnr_and_ssim_one():
    x = _images()
    s = metrics.score(x, x.clone(), use_lpips=False)
    assert s.psnr == [metrics.PSNR_CAP] * 3
    assert all(math.isfinite(p) for p in s.psnr)
    assert s.ssim == pytest.approx([1.0] * 3, abs=1e-5)
    assert metrics.psnr_per_sample(x, x) == [metrics.PSNR_CAP] * 3


def test_known_noise_psnr_matches_formula_and_ssim_drops():
    # Targets in [0.2, 0.8] so +-amp noise is never clamped; a different level per sample.
    x = 0.2 + 0.6 * _images()
    amps = [0.01, 0.05, 0.1]
    noisy = torch.stack([x[i] + _pm_noise(x[i].shape, a, seed=i) for i, a in enumerate(amps)])
    s = metrics.score(x, noisy, use_lpips=False)
    assert s.order == [0, 1, 2]
    for i, a in enumerate(amps):
        mse = float(((noisy[i] - x[i]) ** 2).mean())
        assert mse == pytest.approx(a**2, rel=1e-4)
        assert s.psnr[i] == pytest.approx(10 * math.log10(1 / mse), abs=0.01)
        assert s.ssim[i] < 0.999
    assert s.psnr[0] > s.psnr[1] > s.psnr[2]
    assert s.ssim[0] > s.ssim[1] > s.ssim[2]
    quick = metrics.psnr_per_sample(noisy, x)
    assert quick == pytest.approx(s.psnr, abs=0.01)


def test_per_step_scores_read_the_content_region_as_the_final_score():
    # a letterboxed target: grey padding the attack need not match, content in the middle rows.
    # The per-step curves (and the best-snapshot oracle built on them) must score the same pixels
    # as the result, or the last snapshot and the returned image disagree (8.85 vs 8.47 dB measured)
    g = torch.Generator().manual_seed(0)
    x = torch.full((2, 3, 16, 16), 0.5)
    x[:, :, 4:12] = torch.rand(2, 3, 8, 16, generator=g)
    recon = torch.rand(2, 3, 16, 16, generator=g)
    content = torch.tensor([[0, 4, 16, 12]] * 2)
    final = [metrics.score(x[i : i + 1], recon[i : i + 1], content=content[i : i + 1], use_lpips=False)
             for i in range(2)]  # one target each: no matching between them
    assert metrics.psnr_per_sample(recon, x, content) == pytest.approx([f.psnr[0] for f in final], abs=1e-4)
    assert metrics.ssim_per_sample(recon, x, content) == pytest.approx([f.ssim[0] for f in final], abs=1e-4)
    whole = metrics.psnr_per_sample(recon, x)
    assert all(abs(w - f.psnr[0]) > 0.1 for w, f in zip(whole, final))


def test_recon_is_clamped_and_nan_does_not_crash():
    x = _images(b=2)
    s = metrics.score(x, x + 5.0, use_lpips=False)  # clamps to all-ones
    ones = torch.ones_like(x[0])
    for i in range(2):
        assert s.psnr[i] == pytest.approx(10 * math.log10(1 / float(((ones - x[i]) ** 2).mean())), abs=0.01)
    bad = x.clone()
    bad[1] = float("nan")
    s = metrics.score(x, bad, use_lpips=False)
    assert all(math.isfinite(p) for p in s.psnr + s.ssim)
    assert not s.leaked[1]


# --------------------------------------------------------------------------- matching


def test_hungarian_recovers_permutation():
    x = _images(b=3)
    perm = [2, 0, 1]  # recon j is target perm[j]; not its own inverse
    recon = x[perm] + _pm_noise(x.shape, 0.01)
    s = metrics.score(x, recon, use_lpips=False)
    expected = [perm.index(i) for i in range(3)]  # recon index holding target i
    assert s.order == expected == [1, 2, 0]
    assert all(p > 35 for p in s.psnr)
    assert all(v > 0.95 for v in s.ssim)


def test_shape_and_content_errors():
    x = _images(b=2)
    with pytest.raises(GistressError):
        metrics.score(x, x[:1], use_lpips=False)
    with pytest.raises(GistressError):
        metrics.score(x, x, content=torch.tensor([[0, 0, 32, 32]]), use_lpips=False)
    with pytest.raises(GistressError):
        metrics.score(x, x, content=torch.tensor([[0, 0, 33, 32], [0, 0, 8, 8]]), use_lpips=False)
    with pytest.raises(GistressError):
        metrics.score(x, x, content=torch.tensor([[4, 0, 4, 32], [0, 0, 8, 8]]), use_lpips=False)


# --------------------------------------------------------------------------- content regions


def test_differences_outside_content_region_do_not_change_scores():
    x = 0.2 + 0.6 * _images(b=2)
    recon = x + _pm_noise(x.shape, 0.05)
    content = torch.tensor([[4, 8, 28, 24], [0, 0, 16, 32]])  # a different region per sample
    base = metrics.score(x, recon, content=content, use_lpips=False)

    inside = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(content.tolist()):
        inside[i, :, y0:y1, x0:x1] = True
    garbage = torch.rand(x.shape, generator=torch.Generator().manual_seed(9))
    x2 = torch.where(inside, x, garbage)
    recon2 = torch.where(inside, recon, 1 - garbage)
    changed = metrics.score(x2, recon2, content=content, use_lpips=False)
    assert changed.psnr == pytest.approx(base.psnr, abs=1e-6)
    assert changed.ssim == pytest.approx(base.ssim, abs=1e-6)
    # the padding does count when no region is given
    full = metrics.score(x2, recon2, use_lpips=False)
    assert full.psnr[0] < base.psnr[0] - 3


def test_matching_uses_content_region_only():
    x = _images(b=2)
    content = torch.tensor([[0, 0, 16, 32], [0, 0, 16, 32]])  # left half is content
    # recon 0 copies target 0 inside the region but target 1 on the (larger-looking) padding side
    recon = x.clone()
    recon[0, :, :, 16:] = x[1, :, :, 16:]
    recon[1, :, :, 16:] = x[0, :, :, 16:]
    s = metrics.score(x, recon, content=content, use_lpips=False)
    assert s.order == [0, 1]
    assert s.psnr == [metrics.PSNR_CAP] * 2


def test_tiny_content_region_scores():
    x = _images(b=2)
    content = torch.tensor([[0, 0, 3, 2], [10, 10, 11, 11]])
    s = metrics.score(x, x.clone(), content=content, use_lpips=False)
    assert s.psnr == [metrics.PSNR_CAP] * 2
    assert s.ssim == pytest.approx([1.0, 1.0], abs=1e-5)


# --------------------------------------------------------------------------- leak rule, BRR, WSRR


def _content_gain_by_hand(recon: torch.Tensor, target: torch.Tensor) -> float:
    """Content gain without shifts, by numpy least squares: psnr of the per-channel affine fit
    minus psnr of the per-channel mean colour (an independent computation of the rule's input)."""
    import numpy as np

    r, t = recon[0].double().numpy().reshape(3, -1), target[0].double().numpy().reshape(3, -1)
    fit_err, mean_err = 0.0, 0.0
    for c in range(3):
        a = np.stack([r[c], np.ones_like(r[c])], 1)
        coef, *_ = np.linalg.lstsq(a, t[c], rcond=None)
        fit_err += ((np.clip(a @ coef, 0, 1) - t[c]) ** 2).mean() / 3
        mean_err += ((t[c] - t[c].mean()) ** 2).mean() / 3
    return 10 * math.log10(mean_err / fit_err)


def test_content_gain_matches_a_hand_computation_and_sets_the_threshold():
    x = 0.2 + 0.6 * _images(b=1)
    recon = x + _pm_noise(x.shape, 0.05)
    expected = _content_gain_by_hand(recon, x)
    assert expected > 5
    s = metrics.score(x, recon, rule=LeakRule(max_shift=0), use_lpips=False)
    assert s.content_gain[0] == pytest.approx(expected, abs=0.05)
    at = metrics.score(x, recon, rule=LeakRule(gain_db=expected - 0.1, max_shift=0), use_lpips=False)
    above = metrics.score(x, recon, rule=LeakRule(gain_db=expected + 0.1, max_shift=0), use_lpips=False)
    assert at.leaked == [True] and above.leaked == [False]
    assert at.lpips is None and at.lpips_missing  # says why, never silent
    assert at.leak_rule.startswith("content gain>=") and "lpips" in at.leak_rule
    assert "lpips" not in at.summary() and at.summary()["leaked"] == 1.0 and above.summary()["leaked"] == 0.0


def test_content_gain_is_blind_to_levels_and_to_colour_only_estimates():
    """A washed-out negative of the target is content; its mean colour and a shuffled copy
    (the same colours, no layout) are not, although the mean colour has the higher raw PSNR."""
    x = 0.2 + 0.6 * _images(b=1, h=24, w=24, seed=3)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)  # some spatial structure
    washed_negative = 0.9 - 0.3 * x
    mean = x.mean((2, 3), keepdim=True).expand_as(x).clone()
    shuffled = x.flatten(2)[..., torch.randperm(24 * 24, generator=torch.Generator().manual_seed(0))].reshape(x.shape)
    s = metrics.score(torch.cat([x] * 3), torch.cat([washed_negative, mean, shuffled]), use_lpips=False)
    assert s.order == [0, 1, 2] or sorted(s.order) == [0, 1, 2]
    gains = dict(zip(s.order, s.content_gain))
    assert gains[0] > 40 and gains[1] < 0.5 and gains[2] < 1.0
    assert s.psnr[s.order.index(1)] > s.psnr[s.order.index(0)]  # raw PSNR prefers the colour-only image


def test_a_leak_needs_a_gain_over_the_prior_only_control():
    x = _images(b=2, seed=4)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    recon = x + _pm_noise(x.shape, 0.03)
    mean = x.mean((2, 3), keepdim=True).expand_as(x).clone()
    control_blank = metrics.score(x, mean, use_lpips=False)
    control_same = metrics.score(x, x + _pm_noise(x.shape, 0.03), use_lpips=False)
    assert control_same.leaked == [True, True]  # a target-derived control would itself "leak"
    assert metrics.score(x, recon, control=control_blank, use_lpips=False).leaked == [True, True]
    over_same = metrics.score(x, recon, control=control_same, use_lpips=False)
    assert over_same.leaked == [False, False]  # the gradient added nothing the start did not have
    assert "over the control" in over_same.leak_rule
    with pytest.raises(GistressError, match="control has 2 scored samples for 1 targets"):
        metrics.score(x[:1], recon[:1], control=control_blank, use_lpips=False)


def test_lpips_is_an_or_so_the_offline_rule_is_stricter(monkeypatch):
    x = torch.nn.functional.avg_pool2d(_images(b=3, seed=6), 3, 1, 1)
    mean = x.mean((2, 3), keepdim=True).expand_as(x).clone()
    recon = torch.cat([x[:1] + _pm_noise(x[:1].shape, 0.03), mean[1:]])
    # Per sample: (content, LPIPS high), (no content, LPIPS low), (no content, LPIPS high)
    monkeypatch.setattr(metrics, "_load_lpips", lambda: (_FixedLpips([0.5, 0.05, 0.5]), None))
    online = metrics.score(x, recon)
    assert online.order == [0, 1, 2]
    assert online.leaked == [True, True, False]
    assert online.leak_rule.endswith("or lpips<=0.1") and online.lpips_missing is None
    offline = metrics.score(x, recon, use_lpips=False)
    assert offline.leaked == [True, False, False]
    assert all(on or not off for on, off in zip(online.leaked, offline.leaked))


def _run(*leaked):
    n = len(leaked)
    return Scores(psnr=[20.0] * n, ssim=[0.5] * n, lpips=None, leaked=list(leaked), order=list(range(n)))


def test_brr_wsrr_on_hand_made_scores():
    runs = [_run(False, False), _run(True, False), _run(True, True), _run(False, False)]
    assert [r.brr for r in runs] == [0.0, 0.5, 1.0, 0.0]
    assert metrics.wsrr(runs) == 0.5
    assert metrics.mean_brr(runs) == pytest.approx(0.375)
    assert metrics.wsrr([_run(False, False, True)]) == 1.0
    assert metrics.wsrr([_run(False)] * 3) == 0.0
    with pytest.raises(GistressError):
        metrics.wsrr([])
    with pytest.raises(GistressError):
        metrics.mean_brr([])


# --------------------------------------------------------------------------- LPIPS offline


def test_lpips_offline_missing_then_stand_in(torch_home, no_network):
    expected = os.path.join(str(torch_home), "hub", "checkpoints", ALEXNET_FILE)
    assert metrics.alexnet_checkpoint_path() == expected

    # 1) empty cache: LPIPS is missing, named precisely, PSNR alone decides leaks
    x = _images(b=2)
    s = metrics.score(x, x.clone())
    assert s.lpips is None
    assert expected in s.lpips_missing and "\n" not in s.lpips_missing
    assert "download.pytorch.org" in s.lpips_missing
    assert "lpips missing" in s.leak_rule and s.leak_rule.startswith("content gain>=")
    assert s.leaked == [True, True]
    assert metrics.lpips_status() == (False, s.lpips_missing)
    assert not os.path.exists(expected)

    # 2) a seeded stand-in backbone at that exact path loads from the cache, no network
    import torchvision

    torch.manual_seed(0)
    os.makedirs(os.path.dirname(expected))
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), expected)
    assert metrics.lpips_status() == (True, expected)

    same = metrics.score(x, x.clone())
    assert same.lpips_missing is None
    assert same.lpips == pytest.approx([0.0, 0.0], abs=1e-6)
    assert same.leak_rule.endswith("or lpips<=0.1")
    assert "lpips" in same.summary()
    diff = metrics.score(x, _images(b=2, seed=5))
    assert all(v > 0 for v in diff.lpips)
    assert str(torch_home / "hub") in metrics._LPIPS_CACHE  # loaded once, cached per hub dir

    # crops smaller than AlexNet's receptive field still score
    small = metrics.score(x, _images(b=2, seed=5), content=torch.tensor([[0, 0, 12, 8], [3, 3, 30, 20]]))
    assert all(v > 0 for v in small.lpips)


def test_use_lpips_false_never_loads(monkeypatch):
    def boom():
        raise AssertionError("LPIPS loaded although use_lpips=False")

    monkeypatch.setattr(metrics, "_load_lpips", boom)
    s = metrics.score(_images(b=1), _images(b=1), use_lpips=False)
    assert s.lpips is None and "disabled" in s.lpips_missing
    assert "lpips missing" in s.leak_rule


def test_psnr_affine_sees_a_contrast_lost_copy_and_not_noise():
    """A washed-out copy (gain 0.3, offset 0.4) has low PSNR but is exact up to levels; noise
    stays near the target's mean-colour PSNR however the six numbers are fitted."""
    from skimage import data as skdata

    target = torch.from_numpy(skdata.astronaut()[::16, ::16].copy()).permute(2, 0, 1)[None].float() / 255
    washed = 0.3 * target + 0.4
    noise = torch.rand(target.shape, generator=torch.Generator().manual_seed(0))
    sc = metrics.score(target, washed, use_lpips=False)
    assert sc.psnr[0] < 15 and sc.psnr_affine[0] > 60
    mean_only = metrics.score(target, target.mean((2, 3), keepdim=True).expand_as(target).clone(),
                              use_lpips=False).psnr[0]
    noisy = metrics.score(target, noise, use_lpips=False)
    assert noisy.psnr_affine[0] < mean_only + 0.5 and noisy.psnr_affine[0] < 15
    assert sc.leaked[0] and not noisy.leaked[0]  # a person sees the washed-out astronaut, not the noise
    assert "psnr_affine" in sc.summary() and sc.summary()["psnr_affine"] == pytest.approx(sc.psnr_affine[0])
