"""``python -m bench references``: which known-leaky models leak at which budget, per input size.

The audit's positive controls (``suite/audit/positive_control.py``) need, for every input size it
audits, a reference model that the battery's attacks recover at a CPU budget. This measures
candidates: per candidate, per battery attack setting (the ``ig`` levels, ``gia_bn`` with 1 and 2
restarts, ``dlg``), the attack at 100, 200, 400, ... iterations (doubling up to ``--cap``, stopping
at the first budget whose reconstruction leaked by the suite's current leak rule), one client batch
of one image, the audit's seed. Each row records PSNR, ``psnr_affine``, the prior-only control's
PSNR, the PSNR of the target's per-channel mean image (so the content-gain rule can be judged from
the same numbers) and the wall time. Prints a markdown table and appends JSON rows to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CANDIDATES = {
    "lenet@32": dict(variant="lenet", variant_options={}, size=32),
    "lenet@224": dict(variant="lenet", variant_options={"input_size": 224}, size=224),
    "mlp-sigmoid@224": dict(variant="mlp", variant_options={"input_size": 224, "activation": "sigmoid"}, size=224),
    "mlp-sigmoid@32": dict(variant="mlp", variant_options={"activation": "sigmoid"}, size=32),
    "mlp@32": dict(variant="mlp", variant_options={}, size=32),
    "mlp@224": dict(variant="mlp", variant_options={"input_size": 224}, size=224),
    "mlp-h32@224": dict(variant="mlp", variant_options={"input_size": 224, "hidden": 32}, size=224),
    "convnext_t@224": dict(variant="convnext_t", variant_options={}, size=224),
}
# the battery's optimization levels as the reference sees them (no BN: levels 2/3 equal 1 with gia_bn/ig)
SETTINGS = {
    "ig (levels 1, 3)": dict(threat={}, attack=dict(preset="ig")),
    "ig labels inferred (4)": dict(threat={"shares_labels": False}, attack=dict(preset="ig")),
    "ig fedavg (5)": dict(threat={"update": "fedavg", "local_steps": 4, "local_lr": 0.01}, attack=dict(preset="ig")),
    "gia_bn (2)": dict(threat={}, attack=dict(preset="gia_bn")),
    "gia_bn x2 restarts (6)": dict(threat={}, attack=dict(preset="gia_bn", restarts=2)),
    "dlg (7)": dict(threat={}, attack=dict(preset="dlg")),
}


def _mean_image_psnr(target) -> float:
    """PSNR of the target's per-channel mean image (what a colour-only guess scores)."""
    from suite.scoring.metrics import psnr_per_sample

    mean = target.mean(dim=(-2, -1), keepdim=True).expand_as(target)
    return float(psnr_per_sample(mean, target)[0])


def measure(candidate: str, setting: str, image: str, start: int, cap: int) -> list[dict]:
    """The doubling search for one (candidate, setting, image): one row per budget tried."""
    from suite.config import RunConfig
    from suite.execution.runner import run_setting

    rows, iters = [], start
    while iters <= cap:
        spec, st = CANDIDATES[candidate], SETTINGS[setting]
        cfg = RunConfig(variant=spec["variant"], variant_options=spec["variant_options"], size=spec["size"],
                        images=[image], data="samples", seed=0, device="cpu",
                        threat={"bn_mode": "train", "update": "gradient", "shares_labels": True,
                                "bn_stats": "none", **st["threat"]},
                        attack={**st["attack"], "iterations": iters, "control": True})
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = run_setting(cfg, out_dir=Path(tmp), progress=False)
        sc = res.scores
        row = dict(candidate=candidate, setting=setting, image=image, iterations=iters,
                   psnr=round(float(sc.psnr[0]), 2),
                   psnr_affine=None if sc.psnr_affine is None else round(float(sc.psnr_affine[0]), 2),
                   control_psnr=round(float(res.metrics.get("control_psnr", float("nan"))), 2),
                   mean_image_psnr=round(_mean_image_psnr(res.target.images), 2),
                   leaked=bool(sc.leaked[0]), seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(row), flush=True)
        rows.append(row)
        if row["leaked"]:
            break
        iters *= 2
    return rows


def main(argv: list[str] | None = None) -> int:
    """Measure the candidates x settings x images given on the command line."""
    import torch

    p = argparse.ArgumentParser(prog="python -m bench references", description=__doc__)
    p.add_argument("--candidate", action="append", choices=list(CANDIDATES))
    p.add_argument("--setting", action="append", choices=list(SETTINGS))
    p.add_argument("--image", action="append")
    p.add_argument("--start", type=int, default=100)
    p.add_argument("--cap", type=int, default=1600)
    p.add_argument("--out", default="references.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for cand in args.candidate or list(CANDIDATES):
        for setting in args.setting or list(SETTINGS):
            for image in args.image or ["astronaut"]:
                rows += measure(cand, setting, image, args.start, args.cap)
    with open(args.out, "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    print("| candidate | setting | image | iterations | PSNR | psnr_affine | control | mean image | leaked | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidate']} | {r['setting']} | {r['image']} | {r['iterations']} | {r['psnr']} | "
              f"{r['psnr_affine']} | {r['control_psnr']} | {r['mean_image_psnr']} | "
              f"{'yes' if r['leaked'] else 'no'} | {r['seconds']} |")
    return 0
