"""Run the example federation on Flower's deployment runtime, audited by gistress.

    .venv/bin/python examples/flower/federate.py [--model lenet|yolov8n] [-c key=value ...]

Starts a SuperLink and two SuperNodes on 127.0.0.1 (insecure mode, loopback only), runs
``flwr run examples/flower gistress-local --stream`` (the ServerApp wraps FedAvg in gistress's
AuditingStrategy), prints the audit's results and stops every process it started. The attack
runs in the ServerApp process; its MLflow runs go to ``MLFLOW_TRACKING_URI`` (default
``sqlite:///mlflow.db`` in the current folder), its files under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

APP = Path(__file__).resolve().parent
# a small YOLOv8n federation: 64 px, a short attack (it runs through the same path)
PRESETS = {"lenet": [], "yolov8n": ["model='yolov8n'", "image-size=64", "lr=0.01", "attack-preset='ig'",
                                    "attack-iterations=20"]}


def main(argv=None) -> int:
    """Start the deployment, run the app, print each attacked update's scores; 0 when all ran."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="lenet")
    p.add_argument("-c", "--run-config", action="append", default=[], help="extra run-config override")
    p.add_argument("--out", default=None, help="audit output folder (default gistress-out/flower-<time>)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)

    from suite.federation.harness import ENV
    from suite.federation.local import LocalDeployment

    out = Path(args.out or f"gistress-out/flower-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gistress-harness-") as harness:
        env = {ENV: harness, "GISTRESS_FLOWER_OUT": str(out), "MLFLOW_TRACKING_URI": uri,
               "MLFLOW_DISABLE_TELEMETRY": "true", "YOLO_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")])}
        with LocalDeployment(2, env=env) as deployment:
            code = deployment.run(APP, PRESETS[args.model] + args.run_config, timeout=args.timeout)
            if code != 0:
                print(deployment.log_tail(), file=sys.stderr)
    seconds = time.perf_counter() - t0
    results = sorted(out.glob("round*-node*/metrics.json"))
    for path in results:
        m = json.loads(path.read_text())
        psnr = f"PSNR {m['psnr']:.2f} dB, " if "psnr" in m else ""
        print(f"{path.parent.name}: {psnr}matching loss {m['matching_loss']:.3g}")
    print(f"flwr run exited {code}; {len(results)} update(s) attacked; wall time {seconds:.0f} s; files: {out}")
    return 0 if code == 0 and results else 1


if __name__ == "__main__":
    sys.exit(main())
