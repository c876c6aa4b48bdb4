"""``gistress doctor``: versions, device, tracking store and local caches on one screen."""

from __future__ import annotations

import json
import os


def add_parser(sub):
    """Register the subcommand."""
    p = sub.add_parser("doctor", help="check the installation, device, MLflow store and caches")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument("--tracking-uri", default=None)
    return p


def report(tracking_uri: str | None = None) -> dict:
    """The facts doctor prints."""
    import importlib.metadata as md

    import torch

    import suite
    from suite.execution.tracking import resolve_tracking_uri
    from suite.scoring.metrics import lpips_status
    from variants.weights import hf_cache_dir

    versions = {"gistress": suite.__version__}
    for pkg in ("torch", "torchvision", "timm", "ultralytics", "mlflow", "lpips", "pycocotools", "pydantic"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "missing"
    cuda = torch.cuda.is_available()
    device = {"selected": "cuda" if cuda else "cpu", "cuda_available": cuda,
              "cpu_threads": torch.get_num_threads()}
    if cuda:
        device["cuda_device"] = torch.cuda.get_device_name(0)
    hub = torch.hub.get_dir()
    ckpts = os.path.join(hub, "checkpoints")
    cached = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
    lp_ok, lp_msg = lpips_status()
    hf_home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
    return {
        "versions": versions,
        "device": device,
        "tracking_uri": resolve_tracking_uri(tracking_uri),
        "offline": {k: os.environ.get(k, "") for k in ("YOLO_OFFLINE", "HF_HUB_OFFLINE", "MLFLOW_DISABLE_TELEMETRY")},
        "caches": {
            "torch_hub_checkpoints": ckpts,
            "torchvision_weights_present": cached,
            "huggingface_home": hf_home,
            "huggingface_hub_cache": hf_cache_dir(),  # where timm's pretrained files must be
            "lpips_backbone": "present" if lp_ok else "missing",
            "lpips_detail": lp_msg,
        },
    }


def run(args) -> int:
    """Print the report."""
    info = report(args.tracking_uri)
    if args.json:
        print(json.dumps(info))
        return 0
    v = info["versions"]
    print("gistress doctor")
    print("  versions : " + ", ".join(f"{k} {val}" for k, val in v.items()))
    d = info["device"]
    print(f"  device   : {d['selected']} (cuda available: {d['cuda_available']}, cpu threads: {d['cpu_threads']})")
    print(f"  mlflow   : {info['tracking_uri']}")
    print("  offline  : " + ", ".join(f"{k}={val}" for k, val in info["offline"].items()))
    c = info["caches"]
    present = ", ".join(c["torchvision_weights_present"]) or "none"
    print(f"  weights  : torch hub {c['torch_hub_checkpoints']} -> {present}")
    print(f"             huggingface hub cache {c['huggingface_hub_cache']} (timm weights)")
    print(f"  lpips    : {c['lpips_backbone']} ({c['lpips_detail']})")
    return 0
