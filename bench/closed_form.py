"""``python -m bench closed-form``: how far the closed-form leak reaches (docs/findings.md).

For ViT-B/16 at 32 px (CIFAR configuration) and 224 px, random weights, train-mode client: the
APRIL closed form against the client's batch size, FedAvg local steps, every shipped defense over
its SoK grid, and a frozen position embedding; at batch > 1 also the repair (the ig preset started
from the closed-form estimate against ig from a random start). The attacker reads only the
Observation; the targets score the outcome afterwards. Writes JSON rows and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CONFIGS = {"32 px (cifar)": dict(variant_options={"stem": "cifar"}, size=32),
           "224 px": dict(variant_options={}, size=224)}
IMAGES = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "retina", "bus"]


def _observe(config: dict, images: list[str], **threat):
    """Build ViT-B/16, load ``images`` and let the client share its update."""
    import variants
    from suite import data
    from suite.threat.client import Client, freeze
    from suite.threat.threat_model import ThreatModel

    frozen = threat.pop("frozen", [])
    v = variants.build("vit_b_16", weights="random", seed=0, **config["variant_options"])
    if frozen:
        freeze(v.model, frozen)
    batch = data.load("samples", task="classification", size=config["size"], images=images,
                      num_classes=v.num_classes, seed=0)
    obs = Client(v.model, "classification", ThreatModel(**threat), num_classes=v.num_classes).share(batch)
    return v, batch, obs


def closed_form_row(config_name: str, axis: str, value, images: list[str], **threat) -> dict:
    """One closed-form measurement: the estimate scored against every image of the batch."""
    from suite.attack.closed_form import estimate
    from suite.errors import GistressError
    from suite.scoring.metrics import score

    config = CONFIGS[config_name]
    t0 = time.perf_counter()
    v, batch, obs = _observe(config, images, **threat)
    row = {"config": config_name, "axis": axis, "value": value, "batch": len(images)}
    try:
        pixels, solution, fit = estimate(v, obs)
    except GistressError as exc:
        return {**row, "applies": False, "reason": exc.message, "seconds": time.perf_counter() - t0}
    recon = pixels.clamp(0, 1).expand(len(images), -1, -1, -1)
    # each target against the one estimate (a mixture when the batch has several images)
    s = score(batch.images, recon, use_lpips=False)
    return {**row, "applies": fit.applies, "reason": fit.reason, "psnr": statistics.median(s.psnr),
            "psnr_max": max(s.psnr), "ssim": statistics.median(s.ssim), "brr": s.brr,
            "residual": solution.residual, "rank": solution.rank, "unknowns": solution.unknowns,
            "seconds": time.perf_counter() - t0}


def repair_row(batch_size: int, init: str, iterations: int) -> dict:
    """ig from the closed-form estimate (or a random start) on a batch of ViT-B/16 at 32 px."""
    import tempfile

    from suite.config import RunConfig
    from suite.execution.runner import run_setting

    cfg = RunConfig(variant="vit_b_16", variant_options={"stem": "cifar"}, size=32,
                    images=IMAGES[:batch_size], attack=dict(preset="ig", iterations=iterations, init=init))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_setting(cfg, out_dir=Path(tmp), progress=False)
    m = res.metrics
    return {"config": "32 px (cifar)", "axis": "repair", "value": init, "batch": batch_size,
            "iterations": iterations, "psnr": statistics.median(res.scores.psnr), "psnr_max": max(res.scores.psnr),
            "ssim": statistics.median(res.scores.ssim), "brr": res.scores.brr,
            "matching_loss": m["matching_loss"], "start_residual": m.get("start_residual"),
            "seconds": time.perf_counter() - t0}


def rows(repair_iterations: int, skip_repair: bool) -> list[dict]:
    """Every measurement, in table order."""
    from suite.threat.defenses import SOK_GRIDS

    out = []
    for name in CONFIGS:
        for b in (1, 2, 4, 8):
            out.append(closed_form_row(name, "batch", b, IMAGES[:b]))
        for k in (1, 2, 4, 8):
            out.append(closed_form_row(name, "local steps", k, IMAGES[:1], update="fedavg", local_steps=k,
                                       local_lr=0.01))
        for family in SOK_GRIDS["resnet18"].values():
            for d in family:
                out.append(closed_form_row(name, "defense", d, IMAGES[:1], defense=d))
        out.append(closed_form_row(name, "frozen", "position embedding", IMAGES[:1], frozen=["*pos_embed"]))
        out.append(closed_form_row(name, "frozen", "all but the head (head-only fine-tuning)", IMAGES[:1],
                                   frozen=["net.cls_token", "net.pos_embed", "net.patch_embed*", "net.blocks*",
                                           "net.norm*"]))
        print(f"{name}: done", flush=True)
    if not skip_repair:
        for b in (2, 4, 8):
            for init in ("closed_form", "random"):
                out.append(repair_row(b, init, repair_iterations))
                print(f"repair batch {b} {init}: {out[-1]['psnr']:.2f} dB", flush=True)
    return out


def markdown(data: list[dict]) -> str:
    """The findings tables: one per axis."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = []
    for axis in ("batch", "local steps", "defense", "frozen"):
        lines += [f"\n**{axis}**\n", "| config | " + axis + " | PSNR dB (median / best) | SSIM | BRR | residual | "
                  "rank / patches | applies |", "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in data if r["axis"] == axis):
            if "psnr" not in r:
                lines.append(f"| {r['config']} | {r['value']} | - | - | - | - | - | no: {r['reason']} |")
                continue
            lines.append(f"| {r['config']} | {r['value']} | {r['psnr']:.2f} / {r['psnr_max']:.2f} | "
                         f"{r['ssim']:.3f} | {r['brr']:.2f} | {f(r['residual'], '.1e')} | "
                         f"{r['rank']} / {r['unknowns']} | {'yes' if r['applies'] else 'no (batch > 1)'} |")
    rep = [r for r in data if r["axis"] == "repair"]
    if rep:
        lines += ["\n**repair (ig from the closed-form estimate vs from a random start, 32 px)**\n",
                  "| batch | start | iterations | PSNR dB (median / best) | SSIM | BRR | matching loss |",
                  "|---|---|---|---|---|---|---|"]
        for r in rep:
            lines.append(f"| {r['batch']} | {r['value']} | {r['iterations']} | {r['psnr']:.2f} / {r['psnr_max']:.2f} | "
                         f"{r['ssim']:.3f} | {r['brr']:.2f} | {r['matching_loss']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement (or rebuild the tables from ``--report-from``) and print markdown."""
    p = argparse.ArgumentParser(prog="python -m bench closed-form", description=__doc__)
    p.add_argument("--out", default="docs/closed-form.json", help="JSON rows")
    p.add_argument("--repair-iterations", type=int, default=100)
    p.add_argument("--skip-repair", action="store_true")
    p.add_argument("--report-from", default=None, help="print the tables of an earlier JSON")
    args = p.parse_args(argv)
    if args.report_from:
        data = json.loads(Path(args.report_from).read_text())["rows"]
    else:
        import torch

        torch.set_num_threads(1)
        data = rows(args.repair_iterations, args.skip_repair)
        Path(args.out).write_text(json.dumps({"rows": data, "torch": torch.__version__}, indent=1))
    print(markdown(data))
    return 0
