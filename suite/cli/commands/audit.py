"""``gistress audit``: a fixed battery of threat levels on one model, a verdict and a report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from suite.errors import GistressError


def add_parser(sub):
    """Register the subcommand and its flags (model, data, budget, output)."""
    p = sub.add_parser(
        "audit", help="leakage audit of one model: a battery of threat levels and a verdict",
        description="Attack the model under a fixed battery of threat levels (realistic to upper bound), "
                    "each a child of one MLflow run, and write a verdict report.")
    from suite.cli.commands.attack import add_model_args

    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="samples",
                   help="samples | cifar10:<root> | imagefolder:<root> | coco:<images>:<annotations.json>")
    d.add_argument("--images", type=int, metavar="N",
                   help="audit the first N images of the source (default: 2 quick, 8 thorough)")
    d.add_argument("--image", action="append", default=[], metavar="NAME",
                   help="audit this image (repeat or comma-separate); instead of --images")
    d.add_argument("--size", type=int, help="input size in pixels (default: set by --level)")
    b = p.add_argument_group("audit")
    b.add_argument("--level", default="quick", help="quick (laptop CPU, minutes) | thorough (GPU, paper scale)")
    b.add_argument("--iterations", type=int,
                   help="override every level's iterations (tests, smoke runs; recorded in the report)")
    b.add_argument("--no-positive-control", action="store_true",
                   help="skip each level's positive control (the same attack and budget on a known-leaky "
                        "reference model); without it 'no leak' is unchecked")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default gistress-out/audit-<time>)")
    o.add_argument("--experiment", default="gistress-audit", help="MLflow experiment name")
    o.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def base_config(args):
    """The audit's base RunConfig (model, weights, data, images, size, seed, device).

    Built through ``gistress attack``'s own flag handling, so variant options, weights and
    image names behave exactly as they do there.
    """
    from suite.audit import budget_for
    from suite.cli.commands import attack

    budget = budget_for(args.level)
    images = [s for item in args.image for s in item.split(",") if s]
    if images and args.images is not None:
        raise GistressError("--images and --image both given", "pass --images N or name images with --image")
    if not images:
        images = _first_images(args, args.images if args.images is not None else budget.default_images,
                               explicit=args.images is not None)
    ns = attack.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(["--variant", args.variant])
    for key in ("stem", "width", "num_classes", "nc", "opt", "weights", "trust_checkpoint", "data", "size",
                "seed", "device"):
        setattr(ns, key, getattr(args, key))
    ns.image = images
    return attack.config_from_args(ns)


def _first_images(args, count: int, *, explicit: bool) -> list[str]:
    """The first ``count`` ids of the source (the default count is capped at what exists)."""
    from suite import data

    if isinstance(count, bool) or count < 1:
        raise GistressError(f"--images {count} must be a positive integer", "pass e.g. --images 2")
    ids = data.list_ids(args.data, task=_task(args.variant))
    if not ids:
        raise GistressError(f"data source '{args.data}' has no images", "point --data at a folder with images")
    if explicit and count > len(ids):
        raise GistressError(f"--images {count} asked, the data has {len(ids)} images",
                            f"use --images {len(ids)} or less")
    return ids[:count]


def _task(variant: str) -> str:
    from variants.base import task_of

    return task_of(variant)


def run(args) -> int:
    """Plan (validating everything), run the battery, print the verdict table.

    Exit code (``lifecycle.exit_code``): 0 every level finished, 1 some level failed, 130 interrupted.
    """
    from suite.audit import format_table, plan_audit, run_audit, verdict_rows
    from suite.execution.lifecycle import page_hint, print_end
    from suite.execution.mlflow_ui import run_link
    from suite.execution.tracking import check_reachable, resolve_tracking_uri

    cfg = base_config(args)
    plan = plan_audit(cfg, args.level, iterations=args.iterations, positive_control=not args.no_positive_control)
    uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    out = Path(args.out) if args.out else _default_out()
    progress = not args.quiet and _isatty()
    result = run_audit(plan, out_dir=out, experiment=args.experiment, tracking_uri=uri, progress=progress)
    files = [("report", f"{result.files['report.md'].resolve()} (and report.html)")] if "report.md" in result.files \
        else []
    parent, exp_id = result.parent_run_id, result.experiment_id
    hint = page_hint(f"mlflow parent run: {parent} (experiment '{args.experiment}'); its page", uri,
                     lambda base: run_link(base, exp_id, parent))
    print_end(None, table=format_table(verdict_rows(result.outcomes)), verdict=[result.verdict], files=files,
              mlflow=hint, summary=result.to_json() if args.json else None)
    return result.exit_code


def _default_out() -> Path:
    base = Path(f"gistress-out/audit-{time.strftime('%Y%m%d-%H%M%S')}")
    out, n = base, 1
    while out.exists():  # two audits started in the same second keep separate folders
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _isatty() -> bool:
    import sys

    return sys.stderr.isatty()
