"""An attack with no ground truth, as a real deployment's server runs it.

Only what needs no client image is logged: the reconstruction (PNG and tensor), the matching
loss, and for a closed form its residual, rank and unknowns. No PSNR, no leak verdict: whoever
holds the data judges the images.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def attack_blind(cfg, variant, obs, *, device: torch.device, out_dir: Path, tracking=None) -> dict:
    """Reconstruct from ``obs`` under ``cfg.attack``; write ``reconstruction.png``,
    ``reconstruction.pt`` and ``metrics.json`` to ``out_dir`` and, with ``tracking`` (a
    ``SettingRun``), log the metrics, the grants and the files. Returns the metrics."""
    from suite.execution.runner import attacker_for
    from suite.reports.images import save_png

    t0 = time.perf_counter()
    variant.model.to(device)
    attacker = attacker_for(cfg, variant, obs, device)
    callback = None
    if tracking is not None:
        def callback(step, record, x):
            tracking.log_step(step, record)
    recon = attacker.reconstruct(None, callback=callback)
    metrics = {"matching_loss": recon.matching_loss, "restarts_diverged": recon.restarts_diverged,
               "seconds": time.perf_counter() - t0}
    solution = getattr(attacker, "solution", None)  # a closed form's solve
    if solution is not None:
        metrics.update(solution.metrics())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [save_png(recon.images, out_dir / "reconstruction.png")]
    torch.save({"reconstruction": recon.images}, out_dir / "reconstruction.pt")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    files += [out_dir / "reconstruction.pt", out_dir / "metrics.json"]
    if tracking is not None:
        from suite.execution.mlflow_names import mlflow_metrics

        tracking.flush()
        for key, value in mlflow_metrics(metrics).items():
            tracking.client.log_metric(tracking.run_id, key, value)
        tracking.client.set_tag(tracking.run_id, "grants", json.dumps(obs.grants, sort_keys=True))
        tracking.client.set_tag(tracking.run_id, "scoring", "none: no ground truth on the server")
        for path in files:
            tracking.log_artifact(path)
    return metrics
