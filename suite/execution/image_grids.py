"""The images behind MLflow's image grids: a run's target, start, control and reconstruction,
kept at a few steps of the attack and logged with ``log_image(key=..., step=...)``.

The chart view's image grid puts one column per run and one row per key; its slider shows the
images logged at one step. Steps are percentages of each run's budget (``IMAGE_FINAL`` = 100 is
the scored result), so runs with different budgets line up on the slider.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from suite.execution.mlflow_names import IMAGE_FINAL, IMAGE_FRACTIONS, one_line_error


def image_steps(iterations: int, log_interval: int, fractions: int = IMAGE_FRACTIONS) -> dict[int, int]:
    """iteration -> image step (percent of the budget) for the iterates kept for MLflow's image
    grids: the logged iteration nearest to each ``1/fractions`` of the budget (the attack logs
    every ``log_interval`` steps and its last step), each iteration once. The scored
    reconstruction takes ``IMAGE_FINAL`` (100)."""
    iterations = max(1, int(iterations))
    logged = sorted({s for s in range(0, iterations, max(1, int(log_interval)))} | {iterations - 1})
    out: dict[int, int] = {}
    for k in range(fractions):
        want = k * iterations / fractions
        nearest = min(logged, key=lambda s: (abs(s - want), s))
        out.setdefault(nearest, round(k * IMAGE_FINAL / fractions))
    return out


def grid_image(images, *, boxes=None):
    """A batch (B, 3, H, W) in [0, 1] as one RGB row, boxes drawn, enlarged by nearest neighbour
    to a legible size (the long side of one image at least ``LEGIBLE_PX``)."""
    from PIL import Image

    from suite.reports.images import draw_boxes, tile, upscale_factor

    img = tile(images)
    if boxes is not None:
        img = draw_boxes(img, boxes, images.shape[-1])
    scale = upscale_factor((images.shape[-1], images.shape[-2]))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


class ImageGrids:
    """Iterates kept in memory at the image steps of one run, logged with its result for the
    chosen restart only."""

    def __init__(self, cfg):
        attack = getattr(cfg, "attack", None)
        self._steps = image_steps(attack.iterations, attack.log_interval) if attack is not None else {}
        # what -> image step -> one uint8 batch per restart; what -> (previous step, restart, repeat)
        self._frames: dict[str, dict[int, list]] = {}
        self._order: dict[str, tuple[int, int, int]] = {}
        self.seconds = 0.0  # time spent keeping and logging images (measured cost)

    def keep(self, what: str, step: int, images) -> None:
        """Keep the iterate of the attack or its control (``what``) when ``step`` is an image step.

        The attacker logs every restart: one after another (the step falls back to 0 when the
        next restart starts) or all at once (each step repeated once per restart), so the
        restart is the count of fall-backs plus the repeats of the current step."""
        import torch

        t0 = time.perf_counter()
        step = int(step)
        prev, restart, repeat = self._order.get(what, (-1, 0, 0))
        if step < prev:
            restart, repeat = restart + 1, 0
        elif step == prev:
            repeat += 1
        else:
            repeat = 0
        self._order[what] = (step, restart, repeat)
        label = self._steps.get(step)
        if label is not None:
            frames = self._frames.setdefault(what, {}).setdefault(label, [])
            index = restart + repeat
            frames.extend([None] * (index + 1 - len(frames)))
            frames[index] = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        self.seconds += time.perf_counter() - t0

    def log(self, client, run_id: str, result) -> None:
        """Target, start, control and reconstruction as MLflow images, at the kept steps and at
        ``IMAGE_FINAL`` (the scored images, each matched to its target); never raises."""
        t0 = time.perf_counter()
        try:
            batch, recon = result.target, result.reconstruction
            boxes = getattr(batch, "boxes", None)
            final: dict[str, Any] = {"target": batch.images, "reconstruction": recon.images[result.scores.order]}
            if recon.init is not None:  # a closed form has no start
                final["start"] = recon.init
            chosen = {"reconstruction": (getattr(recon, "chosen", 0), result.scores.order)}
            if result.control is not None and result.control_scores is not None:
                final["control"] = result.control.images[result.control_scores.order]
                chosen["control"] = (getattr(result.control, "chosen", 0), result.control_scores.order)
            steps: dict[int, dict[str, Any]] = {IMAGE_FINAL: final}
            for what, (restart, order) in chosen.items():
                for label, frames in self._frames.get(what, {}).items():
                    if restart < len(frames) and frames[restart] is not None:
                        steps.setdefault(label, {})[what] = frames[restart][order].float() / 255
            for label, row in sorted(steps.items()):
                if label != IMAGE_FINAL:  # the constant rows beside each iterate: the grid reads whole
                    row = {k: final[k] for k in ("target", "start") if k in final} | row
                for what, images in row.items():
                    img = grid_image(images, boxes=boxes if what == "target" else None)
                    client.log_image(run_id, img, key=what, step=label)
        except Exception as exc:  # the grids are a view; the scores and files are the result
            print(f"warning: images for MLflow's image grids not logged ({one_line_error(exc, 200)})",
                  file=sys.stderr)
        finally:
            self._frames.clear()
            self.seconds += time.perf_counter() - t0
