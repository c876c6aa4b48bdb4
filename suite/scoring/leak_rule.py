"""The leak decision: one function that says whether a reconstruction shows its target's content.

A person calls a reconstruction a leak when they can see the target in it, whatever its contrast,
brightness or exact colours. Raw PSNR disagrees with that in both directions: it misses content
that is exact up to a per-channel gain and offset (ConvNeXt-T's washed-out reconstructions), and
it rewards images that carry only the target's colours (a smooth field the right shade of brown
reaches 17 dB on a smooth photograph). The rule therefore scores *content gain*:

    content gain = PSNR after the best per-channel gain and offset (``psnr_affine``)
                   - PSNR of the best content-free estimate (the target's per-channel mean colour)

taken at the best of the shifts up to ``max_shift`` pixels (a reconstruction off by a pixel or
two still shows the image). Six fitted numbers cannot make noise or a smooth field look like the
target, so content-free images stay near 0 dB whatever their colours. A sample leaked when

- its content gain is at least ``gain_db``, and, where a prior-only control ran, at least
  ``over_control_db`` above the control's content gain on the same target (the update, not the
  image prior or a target-derived start, must explain it); or
- LPIPS, where its backbone is installed, is at most ``lpips`` (and the control's is not).

Without LPIPS the second branch is simply absent, so the offline rule never calls a leak that the
online rule would not: it is at least as strict. The thresholds were calibrated on the labelled
gallery in ``tests/data/leak_gallery`` (its confusion table is in docs/audit.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_GAIN_DB = 2.5
DEFAULT_OVER_CONTROL_DB = 1.5
DEFAULT_LPIPS = 0.1
DEFAULT_MAX_SHIFT = 2


@dataclass(frozen=True)
class LeakRule:
    """The thresholds of the leak decision (see the module docstring); defaults are calibrated."""

    gain_db: float = DEFAULT_GAIN_DB
    over_control_db: float = DEFAULT_OVER_CONTROL_DB
    lpips: float = DEFAULT_LPIPS
    max_shift: int = DEFAULT_MAX_SHIFT

    def describe(self, lpips_available: bool, control: bool = False) -> str:
        """The rule in one line, as every output names it (tag ``leak_rule``, reports, summaries)."""
        text = f"content gain>={self.gain_db:g} dB (+-{self.max_shift} px)"
        if control:
            text += f", >={self.over_control_db:g} dB over the control"
        if lpips_available:
            text += f"; or lpips<={self.lpips:g}"
            if control:
                text += " (control above)"
        else:
            text += "; lpips missing (stricter)"
        return text

    def decide(self, gain: float, *, control_gain: float | None = None, lpips: float | None = None,
               control_lpips: float | None = None) -> bool:
        """Did one sample leak? ``gain``: its content gain (dB); ``control_gain``: the prior-only
        control's on the same target (None: no control ran); ``lpips``/``control_lpips``: None
        where LPIPS is unavailable."""
        by_content = gain >= self.gain_db and (
            control_gain is None or gain - control_gain >= self.over_control_db)
        by_lpips = lpips is not None and lpips <= self.lpips and (
            control_lpips is None or control_lpips > self.lpips)
        return by_content or by_lpips


DEFAULT_RULE = LeakRule()


def _psnr_db(mse: torch.Tensor) -> float:
    # MSE floored at 1e-10: 100 dB, the cap every PSNR in the suite uses (metrics.PSNR_CAP)
    return float(-10.0 * torch.log10(mse.clamp_min(1e-10)))


def fit_levels(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``recon`` after the least-squares gain and offset per channel onto ``target``, clamped to
    [0, 1] like the images themselves (``(..., N)`` inputs, channels in the leading dimensions;
    a flat channel gets gain 0, i.e. the target's mean). What ``metrics.psnr_affine`` scores."""
    rc = recon - recon.mean(-1, keepdim=True)
    var = (rc * rc).mean(-1, keepdim=True)
    cov = (rc * (target - target.mean(-1, keepdim=True))).mean(-1, keepdim=True)
    gain = torch.where(var > 1e-12, cov / var.clamp_min(1e-12), torch.zeros_like(var))
    return (target.mean(-1, keepdim=True) + gain * rc).clamp(0, 1)


@torch.no_grad()
def content_gain(recon: torch.Tensor, target: torch.Tensor, max_shift: int = DEFAULT_MAX_SHIFT) -> float:
    """Content gain (dB) of one reconstruction over the best content-free estimate of its target.

    ``recon`` and ``target`` are (1, C, H, W) or (C, H, W) in [0, 1], already cropped to the
    content region. For every shift of ``recon`` up to ``max_shift`` pixels (fewer on images under
    16 px a side), both are cut to their overlap; the gain is ``psnr_affine`` there minus the PSNR
    of the target's per-channel mean colour there. The best shift counts.
    """
    r = recon.detach().double().reshape(-1, *recon.shape[-2:]).clamp(0, 1)
    t = target.detach().double().reshape(-1, *target.shape[-2:]).clamp(0, 1)
    h, w = t.shape[-2:]
    s = max(0, min(max_shift, (min(h, w) - 1) // 8))
    best = float("-inf")
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            rr = r[:, max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].flatten(1)
            tt = t[:, max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)].flatten(1)
            trivial = ((tt - tt.mean(-1, keepdim=True)) ** 2).mean()
            best = max(best, _psnr_db(((fit_levels(rr, tt) - tt) ** 2).mean()) - _psnr_db(trivial))
    return best
