"""Reconstruction metrics: PSNR, SSIM, LPIPS and content gain per sample, leak flags, BRR and WSRR.

Scoring compares a reconstruction with its target after matching them (Hungarian assignment on
content-region MSE), inside each target's letterbox content region only.

Conventions:

- PSNR is capped at ``PSNR_CAP`` (100 dB): identical images have infinite PSNR, and a finite cap
  keeps means, MLflow metrics and JSON well defined. Any pair with MSE < 1e-10 reports 100 dB.
- LPIPS uses ``lpips.LPIPS(net="alex")``. Its AlexNet backbone is torchvision's ImageNet
  checkpoint, read from the torch hub cache. When that file is absent, LPIPS is *missing*:
  ``Scores.lpips`` is None and ``Scores.lpips_missing`` names the file to place. Nothing is ever
  downloaded and a missing LPIPS is never reported as 0.
- ``psnr_affine``: PSNR after fitting one gain and one offset per colour channel to the target.
- ``content_gain``: ``psnr_affine`` minus the PSNR of the target's per-channel mean colour, at the
  best shift up to 2 px: what the leak decision reads (``suite.scoring.leak_rule``).
- Content regions shorter than 32 px on a side are resized up (bilinear) for LPIPS only, because
  AlexNet's stride-4 stem and two max-pools need about 31 px of input.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from suite.errors import GistressError
from suite.results import Scores
from suite.scoring.leak_rule import DEFAULT_RULE, LeakRule, content_gain, fit_levels

PSNR_CAP = 100.0
"""PSNR reported for (near-)identical images, in dB; all PSNRs are capped here."""

# AlexNet's stem and pools need ~31 px; smaller crops are resized up to this for LPIPS.
_LPIPS_MIN_SIDE = 32

# One loaded LPIPS module per torch hub dir (tests and users may switch TORCH_HOME mid-process).
_LPIPS_CACHE: dict[str, torch.nn.Module] = {}


# --------------------------------------------------------------------------- LPIPS backbone


def _alexnet_url() -> str:
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights.IMAGENET1K_V1.url


def alexnet_checkpoint_path() -> str:
    """Where torchvision looks for the AlexNet ImageNet weights LPIPS needs (hub dir, this call).

    The file name is taken from torchvision's own URL the same way ``torch.hub`` names its cache
    files, so the path matches what ``load_state_dict_from_url`` will read.
    """
    from urllib.parse import urlparse

    name = os.path.basename(urlparse(_alexnet_url()).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def _missing_message(path: str) -> str:
    return (
        f"LPIPS unavailable: AlexNet backbone not found at {path}; place torchvision's "
        f"AlexNet_Weights.IMAGENET1K_V1 file there (from {_alexnet_url()}) "
        "or point TORCH_HOME at a torch cache that has it"
    )


def lpips_status() -> tuple[bool, str]:
    """(available, detail) for ``gistress doctor``: the checkpoint path, or why LPIPS is missing.

    Cheap: checks that the ``lpips`` package is installed and that the backbone file exists; it does
    not load the model.
    """
    import importlib.util

    if importlib.util.find_spec("lpips") is None:  # found, not imported: importing it takes seconds
        return False, "LPIPS unavailable: the lpips package is not installed"
    path = alexnet_checkpoint_path()
    if not os.path.isfile(path):
        return False, _missing_message(path)
    return True, path


def _load_lpips() -> tuple[torch.nn.Module | None, str | None]:
    """The cached LPIPS module for the current hub dir, or (None, reason) when unavailable."""
    hub_dir = torch.hub.get_dir()
    if hub_dir in _LPIPS_CACHE:
        return _LPIPS_CACHE[hub_dir], None
    ok, detail = lpips_status()
    if not ok:
        return None, detail
    import lpips

    try:
        # The file is present, so torchvision reads it from the hub cache instead of downloading.
        # lpips still calls torchvision's deprecated ``pretrained=`` API: silence that warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net="alex", verbose=False)
    except Exception as exc:  # a truncated or foreign checkpoint: report, never fall back to random
        reason = " ".join(str(exc).split())[:200]
        return None, f"LPIPS unavailable: could not load AlexNet backbone {detail} ({type(exc).__name__}: {reason})"
    model.eval().requires_grad_(False)
    _LPIPS_CACHE[hub_dir] = model
    return model, None


# --------------------------------------------------------------------------- helpers


def _check_pair(target: torch.Tensor, recon: torch.Tensor) -> None:
    if target.dim() != 4 or recon.dim() != 4:
        raise GistressError(
            f"score() needs (B, C, H, W) images, got target {tuple(target.shape)} and recon {tuple(recon.shape)}",
            "pass batched image tensors",
        )
    if target.shape != recon.shape:
        raise GistressError(
            f"target {tuple(target.shape)} and reconstruction {tuple(recon.shape)} differ in shape",
            "reconstruct the same number of images at the target's size",
        )


def _prepare(target: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.isfinite(target).all():
        raise GistressError("target images contain NaN or inf", "check the data pipeline that built the Batch")
    target = target.detach().float().clamp(0, 1)
    # A diverged attack may return NaN/inf; map it into range so it scores badly instead of crashing.
    recon = torch.nan_to_num(recon.detach().float().to(target.device), nan=0.0, posinf=1.0, neginf=0.0)
    return target, recon.clamp(0, 1)


def _regions(content: torch.Tensor | None, b: int, h: int, w: int) -> list[tuple[int, int, int, int]]:
    if content is None:
        return [(0, 0, w, h)] * b
    content = torch.as_tensor(content)
    if tuple(content.shape) != (b, 4):
        raise GistressError(
            f"content must be ({b}, 4) xyxy regions, got {tuple(content.shape)}",
            "pass Batch.content (one region per target image)",
        )
    regions = []
    for i, (x0, y0, x1, y1) in enumerate(content.long().tolist()):
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise GistressError(
                f"content region {i} = {[x0, y0, x1, y1]} is empty or outside the {w}x{h} image",
                "use xyxy pixel coordinates with x0 < x1 <= W and y0 < y1 <= H",
            )
        regions.append((x0, y0, x1, y1))
    return regions


def _crop(img: torch.Tensor, region: tuple[int, int, int, int]) -> torch.Tensor:
    x0, y0, x1, y1 = region
    return img[..., y0:y1, x0:x1]


def _cap(psnr: float) -> float:
    return min(psnr, PSNR_CAP)  # inf (identical images) -> cap


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return _cap(float(peak_signal_noise_ratio(a, b, data_range=1.0)))


def psnr_affine(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR of ``recon`` after the least-squares gain and offset per colour channel onto ``target``.

    Some models leave the input's contrast and brightness nearly unconstrained (LayerNorm right
    after the stem): the attack then recovers the content but not the levels, and raw PSNR misses
    it. Six fitted numbers cannot turn noise into an image, so this stays at the raw PSNR of noise.
    """
    fitted = fit_levels(recon.double().flatten(2), target.double().flatten(2))  # (1, C, N)
    return _psnr(fitted.float().reshape(recon.shape), target)


def _ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import structural_similarity_index_measure

    side = min(a.shape[-2:])
    # torchmetrics reflect-pads by 3.5 sigma; a very thin region needs a narrower Gaussian window.
    sigma = 1.5 if side >= 6 else max(0.1, (side - 1.5) / 3.5)
    return float(structural_similarity_index_measure(a, b, data_range=1.0, sigma=sigma))


def _lpips_pair(model: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape[1] == 1:  # grayscale: AlexNet wants three channels
        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
    h, w = a.shape[-2:]
    if min(h, w) < _LPIPS_MIN_SIDE:
        s = _LPIPS_MIN_SIDE / min(h, w)
        size = (max(_LPIPS_MIN_SIDE, round(h * s)), max(_LPIPS_MIN_SIDE, round(w * s)))
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
    # normalize=True maps our [0, 1] images to the [-1, 1] range LPIPS expects.
    return float(model(a, b, normalize=True).flatten()[0])


def _match(target: torch.Tensor, recon: torch.Tensor, regions) -> list[int]:
    b = target.shape[0]
    if b == 1:
        return [0]
    from scipy.optimize import linear_sum_assignment

    cost = torch.empty(b, b, dtype=torch.float64)
    for i, region in enumerate(regions):
        t = _crop(target[i], region)
        r = _crop(recon, region)  # every reconstruction, seen through target i's content region
        cost[i] = ((r - t) ** 2).flatten(1).mean(1).double().cpu()
    rows, cols = linear_sum_assignment(cost.numpy())
    order = [0] * b
    for i, j in zip(rows.tolist(), cols.tolist()):
        order[i] = j
    return order


# --------------------------------------------------------------------------- public API


@torch.no_grad()
def score(
    target: torch.Tensor,
    recon: torch.Tensor,
    *,
    content: torch.Tensor | None = None,
    rule: LeakRule = DEFAULT_RULE,
    control: Scores | None = None,
    use_lpips: bool = True,
) -> Scores:
    """Score a reconstruction against its target batch, sample by sample, and decide each leak.

    Args:
        target: (B, C, H, W) target images in [0, 1].
        recon: (B, C, H, W) reconstruction; clamped to [0, 1] (NaN/inf mapped into range).
        content: (B, 4) int xyxy content region per target (letterbox content); target i and the
            reconstruction matched to it are compared inside target i's region only.
        rule: the leak decision (``suite.scoring.leak_rule``): content gain, over the control's
            where ``control`` is given, or LPIPS where its backbone is installed.
        control: the prior-only control's Scores on the same targets; a sample then leaks only
            if the reconstruction beats the control's content gain on that target.
        use_lpips: False skips LPIPS (it is then reported as missing, with the reason).

    Returns:
        ``Scores`` in target order; ``order[i]`` is the reconstruction index matched to target i
        (Hungarian assignment on content-region MSE). PSNR is capped at ``PSNR_CAP``.
    """
    _check_pair(target, recon)
    target, recon = _prepare(target, recon)
    b, _, h, w = target.shape
    regions = _regions(content, b, h, w)
    order = _match(target, recon, regions)
    if control is not None and len(control.psnr) != b:
        raise GistressError(f"the control has {len(control.psnr)} scored samples for {b} targets",
                            "score the control on the same target batch")

    pairs = [(_crop(recon[j : j + 1], reg), _crop(target[i : i + 1], reg)) for i, (j, reg) in enumerate(zip(order, regions))]
    psnr = [_psnr(r, t) for r, t in pairs]
    ssim = [_ssim(r, t) for r, t in pairs]
    aligned = [psnr_affine(r, t) for r, t in pairs]
    gains = [content_gain(r, t, rule.max_shift) for r, t in pairs]

    lpips_vals: list[float] | None = None
    missing: str | None = None
    if use_lpips:
        model, missing = _load_lpips()
        if model is not None:
            model = model.to(target.device)
            lpips_vals = [_lpips_pair(model, r, t) for r, t in pairs]
    else:
        missing = "LPIPS disabled (use_lpips=False)"

    leaked = [
        rule.decide(gains[i],
                    control_gain=control.content_gain[i] if control is not None and control.content_gain else None,
                    lpips=lpips_vals[i] if lpips_vals is not None else None,
                    control_lpips=control.lpips[i] if control is not None and control.lpips else None)
        for i in range(b)
    ]
    return Scores(
        psnr=psnr,
        ssim=ssim,
        lpips=lpips_vals,
        leaked=leaked,
        order=order,
        leak_rule=rule.describe(lpips_vals is not None, control=control is not None),
        lpips_missing=missing,
        psnr_affine=aligned,
        content_gain=gains,
    )


def _unmatched_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a (an iterate; NaN/inf mapped into range) and b, both clamped to [0, 1], for the per-step
    per-sample scores that compare a[i] with b[i] without matching."""
    _check_pair(b, a)
    a = torch.nan_to_num(a.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
    return a, b.detach().float().to(a.device).clamp(0, 1)


def _unmatched_crops(a: torch.Tensor, b: torch.Tensor, content) -> list[tuple[torch.Tensor, torch.Tensor]]:
    a, b = _unmatched_pair(a, b)
    regions = _regions(content, a.shape[0], a.shape[-2], a.shape[-1])
    return [(_crop(a[i : i + 1], r), _crop(b[i : i + 1], r)) for i, r in enumerate(regions)]


@torch.no_grad()
def psnr_per_sample(a: torch.Tensor, b: torch.Tensor, content: torch.Tensor | None = None) -> list[float]:
    """PSNR (dB, capped at ``PSNR_CAP``) of the iterate a[i] vs the target b[i]; no matching, no LPIPS.

    Cheap enough for the attacker's every-k-steps callback. Both inputs are clamped to [0, 1].
    ``content``: (B, 4) xyxy regions (``Batch.content``) to score inside, as ``score`` does, so a
    step's PSNR and the final one read the same pixels (letterboxed detection images); None: whole images.
    """
    return [_psnr(x, t) for x, t in _unmatched_crops(a, b, content)]


@torch.no_grad()
def ssim_per_sample(a: torch.Tensor, b: torch.Tensor, content: torch.Tensor | None = None) -> list[float]:
    """SSIM of the iterate a[i] vs the target b[i], no matching, inside ``content`` as
    ``psnr_per_sample``: what the papers' ground-truth snapshot selection reads (an oracle: the
    runner logs it per step, nothing decides with it)."""
    return [_ssim(x, t) for x, t in _unmatched_crops(a, b, content)]


def best_snapshot(history: Sequence[dict]) -> dict[str, float] | None:
    """The logged step with the highest SSIM against the ground truth, the selection rule of
    LeakPro's attack loop (best-SSIM snapshot): an ORACLE upper bound, reported beside the
    attack's own result and never used for a leak decision. None when no step logged SSIM."""
    logged = [r for r in history if r.get("ssim") is not None]
    if not logged:
        return None
    best = max(logged, key=lambda r: r["ssim"])
    return {"oracle_best_snapshot_ssim": best["ssim"], "oracle_best_snapshot_psnr": best["psnr"],
            "oracle_best_snapshot_step": best["step"]}


def wsrr(runs: Sequence[Scores]) -> float:
    """Worst-sample reconstruction rate: fraction of repeated attacks where any sample leaked.

    SoK Appx. C (ii). Each element of ``runs`` is the Scores of one independent attack.
    """
    if not runs:
        raise GistressError("wsrr needs at least one run", "score one or more repeated attacks first")
    return sum(s.any_leaked for s in runs) / len(runs)


def mean_brr(runs: Sequence[Scores]) -> float:
    """Mean batch reconstruction rate (fraction of samples leaked) over repeated attacks."""
    if not runs:
        raise GistressError("mean_brr needs at least one run", "score one or more repeated attacks first")
    return sum(s.brr for s in runs) / len(runs)
