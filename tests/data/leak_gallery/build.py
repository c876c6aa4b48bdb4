"""Rebuild the labelled leak gallery: ``python tests/data/leak_gallery/build.py [RUN_DIR ...]``.

The gallery calibrates ``suite.scoring.leak_rule`` (tests/test_leak_gallery.py). Each case is a
target PNG, an image PNG, an optional prior-only control PNG and a label a person would give:
``leak`` (the target is recognisable), ``no leak`` (nothing of it is) or ``ambiguous`` (listed,
not counted). Synthetic cases are altered copies of the sample photographs; real cases are the
reconstructions of ``gistress attack ... --control --out RUN_DIR`` runs, labelled by hand in
``REAL`` below (pass their folders to copy them in). Images are 8-bit PNGs, as the suite writes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

HERE = Path(__file__).resolve().parent
TARGETS = {32: ("astronaut", "chelsea", "coffee", "rocket", "motorcycle"), 64: ("astronaut", "chelsea")}

# real reconstructions: run folder name -> (case name, label of the reconstruction, label of the control)
REAL = {
    "convnext_astronaut": ("convnext_t cifar, gia_bn 300 it: washed-out astronaut", "leak", "no leak"),
    "convnet_chelsea": ("convnet, ig 100 it: chelsea at 19.3 dB, control 16.8 dB", "no leak", "no leak"),
}


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    k = int(2 * round(3 * sigma) + 1)
    return gaussian_blur(x, [k, k], [sigma, sigma])


def _shift(x: torch.Tensor, px: int) -> torch.Tensor:
    # the image moved px to the right and down, edges repeated (what a misaligned recon looks like)
    padded = F.pad(x, (px, 0, px, 0), mode="replicate")
    return padded[..., : x.shape[-2], : x.shape[-1]]


def _smooth_field(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # a smooth random field in the target's colours: what a TV prior alone converges to
    noise = torch.randn(x.shape, generator=g)
    field = _blur(noise, x.shape[-1] / 8)
    field = (field - field.mean()) / field.std().clamp_min(1e-6)
    return x.mean((-2, -1), keepdim=True) + 0.08 * field


def synthetic(target: torch.Tensor, other: torch.Tensor, g: torch.Generator) -> dict[str, tuple[torch.Tensor, str]]:
    """The altered copies of one target, each with its label."""
    mean = target.mean((-2, -1), keepdim=True)
    gray = (0.299 * target[:, :1] + 0.587 * target[:, 1:2] + 0.114 * target[:, 2:]).expand_as(target)
    return {
        "exact": (target, "leak"),
        "noise_0.03": (target + 0.03 * torch.randn(target.shape, generator=g), "leak"),
        "noise_0.1": (target + 0.1 * torch.randn(target.shape, generator=g), "leak"),
        "contrast_0.5": (mean + 0.5 * (target - mean), "leak"),
        "contrast_0.25": (mean + 0.25 * (target - mean), "leak"),
        "brightness_+0.25": (target + 0.25, "leak"),
        "washed_out": (0.35 * target + 0.45, "leak"),
        "negative": (1 - target, "leak"),
        "grayscale": (gray, "leak"),
        "blur_1": (_blur(target, 1.0), "leak"),
        "blur_1.5": (_blur(target, 1.5), "leak"),
        "shift_1": (_shift(target, 1), "leak"),
        "shift_2": (_shift(target, 2), "leak"),
        "blur_4": (_blur(target, 4.0), "ambiguous"),
        "mean_colour": (mean.expand_as(target), "no leak"),
        "smooth_field": (_smooth_field(target, g), "no leak"),
        "noise_uniform": (torch.rand(target.shape, generator=g), "no leak"),
        "noise_around_mean": (mean + 0.1 * torch.randn(target.shape, generator=g), "no leak"),
        "other_photo": (other, "no leak"),
        "other_photo_blur_1": (_blur(other, 1.0), "no leak"),
    }


def _save(img: torch.Tensor, rel: str) -> str:
    path = HERE / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(img.clamp(0, 1), path)
    return rel


def build(run_dirs: list[Path]) -> list[dict]:
    """Write every PNG and gallery.json; returns the cases."""
    from suite.data.load import load

    cases = []
    g = torch.Generator().manual_seed(0)
    for size, names in TARGETS.items():
        batch = load("samples", task="classification", size=size, images=list(names))
        for i, name in enumerate(names):
            target = batch.images[i : i + 1]
            other = batch.images[(i + 1) % len(names)][None]
            t_rel = _save(target, f"targets/{name}_{size}.png")
            for kind, (img, label) in synthetic(target, other, g).items():
                rel = _save(img, f"synthetic/{name}_{size}_{kind}.png")
                cases.append(dict(case=f"{name} {size} px: {kind}", kind=kind, target=t_rel, image=rel,
                                  control=None, label=label))
    for run in run_dirs:
        title, label, control_label = REAL[run.name]
        t_rel = shutil.copy(run / "target.png", HERE / f"real/{run.name}_target.png")
        r_rel = shutil.copy(run / "reconstruction.png", HERE / f"real/{run.name}_reconstruction.png")
        c_rel = shutil.copy(run / "control.png", HERE / f"real/{run.name}_control.png")
        t_rel, r_rel, c_rel = (str(Path(p).relative_to(HERE)) for p in (t_rel, r_rel, c_rel))
        cases.append(dict(case=f"{title}: reconstruction", kind="real", target=t_rel, image=r_rel, control=c_rel,
                          label=label))
        cases.append(dict(case=f"{title}: prior-only control", kind="real", target=t_rel, image=c_rel,
                          control=None, label=control_label))
    (HERE / "gallery.json").write_text(json.dumps(cases, indent=1) + "\n")
    return cases


if __name__ == "__main__":
    (HERE / "real").mkdir(exist_ok=True)
    print(f"{len(build([Path(p) for p in sys.argv[1:]]))} cases written to {HERE / 'gallery.json'}")
