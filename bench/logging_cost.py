"""``python -m bench.logging_cost``: what logging step metrics to MLflow costs an attack.

One small attack (LeNet and a CIFAR ResNet18 at 32 px, preset ig) runs inside an MLflow run on a
fresh sqlite store, timed from the attack's start until its step metrics are written, with:

- ``none``: no step metrics;
- ``old``: every 25 steps, one store write per logged step (the suite before 50-point curves);
- ``new``: about 50 points per run (``log_every`` unset), writes buffered;
- ``new-unbuffered``: the same 50 points, one write per logged step (what buffering saves).

Modes are interleaved and repeated; the median is printed. Only the step logging differs, so the
difference is its cost (the final metrics and artifacts are the same in every mode and left out).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

MODES = ("none", "old", "new", "new-unbuffered")
CASES = {"lenet": (dict(variant="lenet"), 300), "resnet18": (dict(variant="resnet18", variant_options={"stem": "cifar"}), 60)}


def _config(case: str, mode: str, iterations: int):
    from suite.config import RunConfig

    fields, _ = CASES[case]
    attack = {"preset": "ig", "iterations": iterations}
    if mode == "old":
        attack["log_every"] = 25
    return RunConfig(**fields, size=32, images=["astronaut"], device="cpu", attack=attack)


def time_one(case: str, mode: str, iterations: int, store: str, out: Path) -> tuple[float, int]:
    """Seconds for one attack with ``mode``'s step logging, and the number of points logged."""
    from suite.execution.runner import prepare_setting, run_setting
    from suite.execution.tracking import SettingRun, setting_run

    cfg = _config(case, mode, iterations)
    prepared = prepare_setting(cfg)
    flush_seconds = SettingRun.FLUSH_SECONDS
    SettingRun.FLUSH_SECONDS = 0.0 if mode in ("old", "new-unbuffered") else flush_seconds
    try:
        with setting_run(cfg, experiment=f"logging-{case}", tracking_uri=store) as tr:
            t0 = time.perf_counter()
            on_step = None if mode == "none" else tr.log_step
            run_setting(cfg, out_dir=out, progress=False, on_step=on_step, prepared=prepared)
            tr.flush()
            seconds = time.perf_counter() - t0
            run_id = tr.run_id
    finally:
        SettingRun.FLUSH_SECONDS = flush_seconds
    points = len(tr.client.get_metric_history(run_id, "loss/matching"))
    return seconds, points


def main(argv: list[str] | None = None) -> int:
    """Print the median seconds per mode and case, and each mode's overhead over ``none``."""
    import suite  # noqa: F401  (offline defaults)
    from suite.execution.threads import apply_threads

    p = argparse.ArgumentParser(prog="python -m bench.logging_cost", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = p.parse_args(argv)
    apply_threads(None)
    with tempfile.TemporaryDirectory() as tmp:
        store = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for case in args.cases:
            iterations = CASES[case][1]
            time_one(case, "none", iterations, store, Path(tmp) / "warm")  # imports, store creation
            times: dict[str, list[float]] = {m: [] for m in MODES}
            points: dict[str, int] = {}
            for _ in range(args.reps):
                for mode in MODES:
                    s, n = time_one(case, mode, iterations, store, Path(tmp) / mode)
                    times[mode].append(s)
                    points[mode] = n
            base = statistics.median(times["none"])
            print(f"{case}, 32 px, {iterations} iterations, median of {args.reps}:")
            for mode in MODES:
                med = statistics.median(times[mode])
                print(f"  {mode:<15} {med:7.3f} s  {points[mode]:>4} points  "
                      f"{100 * (med - base) / base:+6.1f} % vs none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
