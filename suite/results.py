"""Result records passed from attack -> scoring -> tracking/studies (data flows one way)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Scores:
    """Per-sample scores of a reconstruction against its target (after Hungarian matching).

    ``lpips`` is None when the LPIPS backbone is unavailable; ``lpips_missing`` then says why
    and which file to place. ``leaked`` is the leak decision per sample
    (``suite.scoring.leak_rule``), named in words by ``leak_rule``.
    ``order[i]`` is the reconstruction index matched to target i.
    """

    psnr: list[float]
    ssim: list[float]
    lpips: list[float] | None
    leaked: list[bool]
    order: list[int]
    leak_rule: str = "content gain>=2.5 dB (+-2 px); lpips missing (stricter)"
    lpips_missing: str | None = None
    # PSNR after the least-squares gain and offset per colour channel: high where the content
    # leaked but the contrast did not (docs/findings.md, Fig. 4)
    psnr_affine: list[float] | None = None
    # psnr_affine over the colour-only estimate's PSNR, best of +-2 px shifts: what the leak rule reads
    content_gain: list[float] | None = None

    @property
    def brr(self) -> float:
        """Batch reconstruction rate: fraction of samples leaked."""
        return sum(self.leaked) / max(len(self.leaked), 1)

    @property
    def any_leaked(self) -> bool:
        """Whether any sample leaked: the batch-level verdict every output reads (metric ``leaked``)."""
        return any(self.leaked)

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Mean scores as flat metrics (LPIPS omitted when missing, never reported as 0)."""
        out = {
            f"{prefix}psnr": sum(self.psnr) / len(self.psnr),
            f"{prefix}ssim": sum(self.ssim) / len(self.ssim),
            f"{prefix}brr": self.brr,
            f"{prefix}leaked": float(self.any_leaked),
        }
        if self.lpips is not None:
            out[f"{prefix}lpips"] = sum(self.lpips) / len(self.lpips)
        if self.psnr_affine is not None:
            out[f"{prefix}psnr_affine"] = sum(self.psnr_affine) / len(self.psnr_affine)
        if self.content_gain is not None:
            out[f"{prefix}content_gain"] = sum(self.content_gain) / len(self.content_gain)
        return out


@dataclass
class Reconstruction:
    """What the attacker returns: the chosen images and how it got there (no target inside)."""

    images: torch.Tensor                      # (B, 3, H, W) in [0, 1], chosen restart
    matching_loss: float                      # final gradient-matching loss of the chosen restart
    restart_images: list[torch.Tensor]        # every restart's final images
    restart_losses: list[float]               # every restart's final matching loss
    chosen: int                               # index of the chosen restart (lowest matching loss)
    init: torch.Tensor | None                 # the start of the chosen restart (None: closed form)
    labels: torch.Tensor | None = None        # labels used or recovered
    history: list[dict] = field(default_factory=list)  # step metrics of the chosen restart
    diverged: str | None = None               # which restarts NaN/inf stopped, and where
    restarts_diverged: int = 0                # how many restarts diverged (their loss is inf)
    # closed forms: |update rebuilt from the solution - observed update| / |observed| for the first
    # layer, a self-check that needs no target (None for optimization attacks)
    residual: float | None = None
    # the step a mid-run checkpoint had reached when this run resumed it (None: ran from step 0)
    resumed_from: int | None = None
    # attack.tv_choices: the prior weight of every attempt and of the chosen one (None: one weight)
    restart_tv: list[float] | None = None
    chosen_tv: float | None = None


@dataclass
class RunResult:
    """One finished setting: reconstruction, optional control, scores and written artifacts."""

    config: object                            # suite.config.RunConfig
    target: object                            # suite.data.Batch
    reconstruction: Reconstruction
    scores: Scores
    control: Reconstruction | None = None
    control_scores: Scores | None = None
    restart_scores: list[Scores] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Path] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def jsonable(obj):
    """``obj`` with non-finite floats as None and unknown types as strings (for JSON output)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
