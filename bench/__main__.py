"""``python -m bench``: per variant at its standard size and batch 1, seconds per training step,
seconds per attack iteration, their ratio, peak memory, and the cost of 4 restarts relative to 1
(sequential, and batched where the setting allows it). Each variant runs in its own subprocess so
peak memory is its own. Writes JSON and a markdown table (docs/benchmarks.md by default).

``--malloc-ab`` adds the ratio with glibc's default allocator settings (see suite/attack/allocator.py);
``--profile VARIANT`` prints where one attack iteration's time goes, by operator."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.blocks import replace_block

DEFAULT_VARIANTS = [
    "lenet", "convnet", "resnet18", "preact_resnet18", "resnet18@imagenet", "vit_b_16", "swin_t",
    "convnext_t", "maxvit_t", "yolov8n", "yolov8n-basicblock", "yolov8n-preact", "yolov8n-resnet",
]


DETECTION_SIZE = 320  # detection variants are measured at 320 rather than their 640 input size


def _spec(entry: str) -> tuple[str, dict, int | None]:
    """``name[@imagenet|@cifar]`` -> (variant, options, size; None: the variant's input size)."""
    import variants

    name, _, stem = entry.partition("@")
    opts = {}
    if stem:
        opts["stem"] = stem
    elif name.startswith(("resnet", "preact_resnet")):
        opts["stem"] = "cifar"
    size = DETECTION_SIZE if variants.task_of(name) == "detection" else None
    return name, opts, size


def _variant_and_batch(entry: str, dev):
    """The variant (on ``dev``), its input size, and a one-image batch: a label, or one box."""
    import torch

    import variants
    from suite.data.batch import Batch

    name, opts, size = _spec(entry)
    v = variants.build(name, seed=0, **opts)
    size = size or v.input_size
    v.model.to(dev)
    x = torch.rand(1, 3, size, size, device=dev)
    if v.task == "detection":
        boxes = [torch.tensor([[size * 0.2, size * 0.2, size * 0.7, size * 0.8]], device=dev)]
        return v, size, Batch(images=x, boxes=boxes, classes=[torch.tensor([0], device=dev)])
    return v, size, Batch(images=x, labels=torch.tensor([1], device=dev))


def measure_one(entry: str, device: str, reps: int, iters: int) -> dict:
    """Timings and peak memory for one variant (run inside its own process)."""
    import resource

    import torch

    from suite.attack.allocator import tune_allocator
    from suite.attack.attacker import Attacker, math_attention
    from suite.config import AttackSpec
    from suite.model.tasks import set_mode
    from suite.threat.client import Client, task_loss_for, trainable
    from suite.threat.threat_model import ThreatModel

    tuned = tune_allocator()  # what the attacker does; GISTRESS_MALLOC_TUNING=0 for the A/B column
    dev = torch.device(device)
    v, size, batch = _variant_and_batch(entry, dev)
    x = batch.images

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # training step: forward + loss + backward to the parameters
    model = v.model
    set_mode(model, v.task, "train")
    loss_fn = task_loss_for(model, v.task, batch)
    _, params = trainable(model)
    train_times = []
    with math_attention():
        for i in range(reps + 2):
            sync()
            t = time.perf_counter()
            loss = loss_fn(model(x))
            grads = torch.autograd.grad(loss, params)
            sync()
            if i >= 2:  # warm-up excluded
                train_times.append(time.perf_counter() - t)
            del grads, loss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    obs = Client(v.model, v.task, ThreatModel(bn_mode="train")).share(batch)

    last: dict[str, Attacker] = {}

    def attack(restarts: int, n: int, mode: str = "sequential") -> tuple[float, list[float]]:
        stamps: list[float] = []

        def cb(step, record, img):
            sync()
            stamps.append(time.perf_counter())

        spec = AttackSpec(preset="ig", iterations=n, restarts=restarts, log_every=1, restart_mode=mode)
        att = last["attacker"] = Attacker(v, obs, spec, device=dev, seed=0)
        sync()
        t = time.perf_counter()
        att.reconstruct(callback=cb)
        sync()
        diffs = [b - a for a, b in zip(stamps, stamps[1:])]
        return time.perf_counter() - t, diffs

    attack(1, 2)  # warm-up
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    total1, diffs = attack(1, iters)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / iters
    per_iter = statistics.median(diffs)
    total4, _ = attack(4, iters)
    batched4 = None if last["attacker"].why_not_batched() else attack(4, iters, "batched")[0] / total1
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    train = statistics.median(train_times)
    return {
        "variant": entry, "task": v.task, "size": size, "params_m": round(v.num_params / 1e6, 2),
        "device": device, "train_step_s": train, "attack_iter_s": per_iter,
        "ratio": per_iter / train, "restarts4_over_1": total4 / total1, "batched4_over_1": batched4,
        "malloc_tuned": tuned, "minor_faults_per_iter": round(faults),
        "peak_rss_mib": round(peak_rss), "peak_cuda_mib": None if peak_cuda is None else round(peak_cuda),
    }


def machine() -> dict:
    """The machine the numbers were taken on."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


BEGIN, END = "<!-- bench:begin (written by python -m bench) -->", "<!-- bench:end -->"


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown(rows: list[dict], info: dict) -> str:
    """The generated block of docs/benchmarks.md: how it was made, the machine, the table."""
    ab = any("attack_iter_s_default_malloc" in r for r in rows)
    head = ["variant", "device", "size", "params (M)", "train step (s)", "attack iter (s)", "ratio"]
    head += ["train step, default malloc (s)", "attack iter, default malloc (s)",
             "page faults / iter (tuned / default)"] if ab else []
    head += ["4 restarts / 1 (sequential)", "4 restarts / 1 (batched)", "peak RSS (MiB)", "peak CUDA (MiB)"]
    lines = [
        BEGIN,
        "Generated by `python -m bench" + (" --malloc-ab" if ab else "") + "` (one process per variant, batch 1,",
        "standard size; warm-up excluded; medians). `ratio` = attack iteration / training step; target ≤ 3.0.",
        "", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['device']} |" + " – |" * (len(head) - 3) + f" error: {r['error']} |")
            continue
        cells = [r["variant"], r["device"], str(r["size"]), str(r["params_m"]), f"{r['train_step_s']:.4f}",
                 f"{r['attack_iter_s']:.4f}", f"{r['ratio']:.2f}"]
        cells += [_cell(r.get("train_step_s_default_malloc"), ".4f"),
                  _cell(r.get("attack_iter_s_default_malloc"), ".4f"),
                  f"{r.get('minor_faults_per_iter')} / {r.get('minor_faults_per_iter_default_malloc')}"] if ab else []
        cells += [f"{r['restarts4_over_1']:.2f}", _cell(r.get("batched4_over_1"), ".2f"), str(r["peak_rss_mib"]),
                  _cell(r["peak_cuda_mib"], "d")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def profile_one(entry: str, device: str, top: int = 25) -> str:
    """Operator table (self time) of one attack iteration after warm-up: the profiler evidence."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from suite.attack.allocator import tune_allocator
    from suite.attack.attacker import Attacker
    from suite.config import AttackSpec
    from suite.threat.client import Client
    from suite.threat.threat_model import ThreatModel

    tune_allocator()
    v, _, batch = _variant_and_batch(entry, torch.device(device))
    obs = Client(v.model, v.task, ThreatModel(bn_mode="train")).share(batch)
    att = Attacker(v, obs, AttackSpec(preset="ig", iterations=4), device=device)
    att.reconstruct()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts, record_shapes=True) as prof:
        Attacker(v, obs, AttackSpec(preset="ig", iterations=1), device=device).reconstruct()
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top, max_name_column_width=40,
                                                               max_shapes_column_width=70)


def _run_one(entry: str, dev: str, args, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench", "--one", entry, "--device", dev,
           "--reps", str(args.reps), "--iters", str(args.iters)]
    if args.threads:
        env = {**env, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"variant": entry, "device": dev, "error": err[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (each variant in a subprocess) and write JSON + markdown; ``parity``
    as the first argument runs the reference-engine comparison instead (bench/parity.py),
    ``closed-form`` the reach of the closed-form leak (bench/closed_form.py), ``references`` the
    audit's positive-control candidates per input size (bench/references.py)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["parity"]:
        from bench.parity import main as parity_main

        return parity_main(argv[1:])
    if argv[:1] == ["closed-form"]:
        from bench.closed_form import main as closed_form_main

        return closed_form_main(argv[1:])
    if argv[:1] == ["references"]:
        from bench.references import main as references_main

        return references_main(argv[1:])
    if argv[:1] == ["cli"]:
        from bench.cli import main as cli_main

        return cli_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--devices", default=None, help="comma list; default cpu (+cuda when available)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per variant process (default: torch's own choice)")
    p.add_argument("--malloc-ab", action="store_true",
                   help="also measure CPU rows with glibc's default allocator (GISTRESS_MALLOC_TUNING=0)")
    p.add_argument("--update", action="store_true",
                   help="merge these rows into the existing --json-out (same variant and device replaced)")
    p.add_argument("--profile", metavar="VARIANT", help="print one attack iteration's operator profile and exit")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--json-out", default="docs/benchmarks.json")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one, args.device, args.reps, args.iters)))
        return 0
    if args.profile:
        print(profile_one(args.profile, args.device))
        return 0
    import torch

    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        for entry in [v for v in args.variants.split(",") if v]:
            r = _run_one(entry, dev, args, os.environ.copy())
            if args.malloc_ab and dev == "cpu" and "ratio" in r:
                plain = _run_one(entry, dev, args, {**os.environ, "GISTRESS_MALLOC_TUNING": "0"})
                r["attack_iter_s_default_malloc"] = plain.get("attack_iter_s")
                r["train_step_s_default_malloc"] = plain.get("train_step_s")
                r["minor_faults_per_iter_default_malloc"] = plain.get("minor_faults_per_iter")
            rows.append(r)
            if "ratio" in r:
                line = (f"ratio {r['ratio']:.2f}  attack {r['attack_iter_s']:.4f}s  "
                        f"4 restarts {r['restarts4_over_1']:.2f} (batched {_cell(r['batched4_over_1'], '.2f')})")
                if "attack_iter_s_default_malloc" in r:
                    line += (f"  default malloc: train {_cell(r['train_step_s_default_malloc'], '.4f')}s"
                             f" attack {_cell(r['attack_iter_s_default_malloc'], '.4f')}s")
            else:
                line = r["error"]
            print(f"{entry:<22}{dev:<6}{line}", flush=True)
    if args.update and Path(args.json_out).exists():
        fresh = {(r["variant"], r["device"]): r for r in rows}
        old = json.loads(Path(args.json_out).read_text())["rows"]
        keys = {(r["variant"], r["device"]) for r in old}
        rows = [fresh.get((r["variant"], r["device"]), r) for r in old] + [r for k, r in fresh.items() if k not in keys]
    info = machine()
    if args.threads:
        info["threads"] = args.threads
    replace_block(Path(args.out), BEGIN, END, markdown(rows, info), "Per variant")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    print(f"wrote {args.out} and {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
