"""``gistress audit``: a fixed battery of threat levels on one model, a verdict and a report."""

from __future__ import annotations

import time
from pathlib import Path

from suite.errors import GistressError

# The table entries ``gistress audit`` takes: the model, the data, the seed and device, and
# --iterations (attack.iterations: every level's, instead of the budget's).
AUDIT_FLAGS = ("--variant", "--stem", "--width", "--num-classes", "--nc", "--opt", "--weights",
               "--trust-checkpoint", "--data", "--image", "--size", "--iterations", "--seed", "--device")
AUDIT_HELPS = {
    "--image": "audit this image (repeat or comma-separate); instead of --images",
    "--size": "input size in pixels (default: set by --level)",
    "--iterations": "every level's iterations instead of the budget's, fixed: no search by the positive "
                    "controls (tests, smoke runs; recorded in the report)",
}
SET_HELP = ("set a run-config key for every level, e.g. --set attack.restarts=2 or --set threat.defense=qsgd:8 "
            "(repeatable; the value is read as YAML). Applied after the flags, so --set wins over the flag "
            "for the same key. The keys the battery's levels set themselves (their threat grants, "
            "attack.preset, attack.control) are refused; see docs/audit.md")


def add_parser(sub):
    """Register the subcommand and its flags (model, data, budget, --set, output)."""
    from suite.cli.flags import HelpFormatter, add_flags, add_set_flag, flags

    p = sub.add_parser(
        "audit", help="leakage audit of one model: a battery of threat levels and a verdict",
        formatter_class=HelpFormatter,
        description="Attack the model under a fixed battery of threat levels (realistic to upper bound), "
                    "each a child of one MLflow parent run, and write a verdict report. Each model, data "
                    "and budget flag sets one run-config key, shown in [brackets]; --set KEY=VALUE sets "
                    "any other key of the config every level starts from and is applied after the flags.")
    groups = add_flags(p, flags(*AUDIT_FLAGS), helps=AUDIT_HELPS)
    groups["data"].add_argument("--images", type=int, metavar="N",
                                help="audit the first N images of the source (default: 2 quick, 8 thorough)")
    b = p.add_argument_group("audit")
    b.add_argument("--level", default="quick",
                   help="quick (laptop CPU, minutes; each level's budget doubles from 100 until its positive "
                        "control leaks, up to a cap) | thorough (GPU, fixed paper-scale budgets)")
    b.add_argument("--no-positive-control", action="store_true",
                   help="skip each level's positive control (the same attack and budget on a known-leaky "
                        "reference model at the audited size); without it 'no leak' is unchecked and the "
                        "fixed base budget runs")
    add_set_flag(b, SET_HELP)
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output folder (default gistress-out/audit-<time>); run the same audit "
                   "with the same --out again to continue it: finished attacks reload, an interrupted one "
                   "resumes at its last save")
    o.add_argument("--experiment", default="gistress-audit", help="MLflow experiment name")
    o.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def user_overrides(args) -> dict:
    """The run-config overrides of the command line (flags, then --set), nested."""
    from suite.cli.flags import flags, overrides

    return overrides(args, flags(*AUDIT_FLAGS))


def base_config(args, fields: dict | None = None):
    """The audit's base RunConfig: the flags and --set (``fields``, nested), with the images resolved.

    Images are the ones named (--image or --set images=...), else the first --images N of the
    source (default: the level's count).
    """
    from suite.audit import budget_for
    from suite.cli.flags import run_config
    from suite.config import RunConfig

    fields = dict(user_overrides(args) if fields is None else fields)
    budget = budget_for(args.level)
    if fields.get("images") and args.images is not None:
        raise GistressError("--images and --image both given", "pass --images N or name images with --image")
    if not fields.get("images"):
        source = fields.get("data", RunConfig.model_fields["data"].default)
        fields["images"] = _first_images(source, fields.get("variant"),
                                         args.images if args.images is not None else budget.default_images,
                                         explicit=args.images is not None)
    return run_config(fields, "gistress audit")


def plan_from_args(args):
    """The audit plan the command line describes, validated; nothing is written.

    ``--set`` overrides the config every level starts from: top-level keys (weights, size, data,
    ...) go into the base config before planning, ``attack.iterations`` replaces every level's
    budget (as ``--iterations`` does), and the other ``threat.*`` / ``attack.*`` keys are applied to
    every planned level and its positive control. Keys the levels set themselves (``fixed_keys``)
    are refused.
    """
    from suite.audit import apply_to_levels, fixed_keys, plan_audit
    from suite.keys import flatten

    fields = user_overrides(args)
    level_keys = {k: v for k, v in flatten(fields).items() if k.split(".")[0] in ("threat", "attack")}
    from suite.config import TARGET_DERIVED_KEYS

    # attack.init=random / closed_form read nothing of the client's images; every other value does
    derived = sorted(k for k, v in level_keys.items() if k in TARGET_DERIVED_KEYS
                     and not (k == "attack.init" and v in ("random", "closed_form")))
    if derived:
        raise GistressError(f"--set {derived[0]} would hand the attacker a start derived from the client's "
                            "images (a target-derived grant), and an audit's levels never read the target",
                            "leave it out; measure such a start apart with `gistress attack --init noisy_target`, "
                            "where it is shown and counted as an upper bound")
    fixed = sorted(set(level_keys) & fixed_keys())
    if fixed:
        raise GistressError(f"{', '.join(fixed)} {'is' if len(fixed) == 1 else 'are'} set by the audit's "
                            "threat levels themselves "
                            "(each level's grants, preset and control are what it measures)",
                            "leave it out, or run one setting with `gistress attack --set ...`")
    cfg = base_config(args, fields)
    iterations = level_keys.pop("attack.iterations", None)
    plan = plan_audit(cfg, args.level, iterations=iterations, positive_control=not args.no_positive_control)
    if level_keys:
        apply_to_levels(plan, level_keys)
    if args.sets:
        plan.overrides = list(args.sets)
        plan.notes.append(f"overrides given with --set: {' '.join(args.sets)}; applied to the config every "
                          f"level starts from (threat and attack keys to every level and its positive "
                          f"control); not comparable to a standard {plan.budget.name} audit")
    return plan


def _first_images(source: str, variant: str, count: int, *, explicit: bool) -> list[str]:
    """The first ``count`` ids of the source (the default count is capped at what exists)."""
    from suite import data
    from variants.base import task_of

    if isinstance(count, bool) or count < 1:
        raise GistressError(f"--images {count} must be a positive integer", "pass e.g. --images 2")
    ids = data.list_ids(source, task=task_of(variant))
    if not ids:
        raise GistressError(f"data source '{source}' has no images", "point --data at a folder with images")
    if explicit and count > len(ids):
        raise GistressError(f"--images {count} asked, the data has {len(ids)} images",
                            f"use --images {len(ids)} or less")
    return ids[:count]


def run(args) -> int:
    """Plan (validating everything), run the battery, print the verdict table.

    Exit code (``lifecycle.exit_code``): 0 every level finished, 1 some level failed, 130 interrupted.
    """
    from suite.audit import format_table, run_audit, verdict_rows
    from suite.execution.lifecycle import page_hint, print_end
    from suite.execution.mlflow_ui import run_link
    from suite.execution.tracking import check_reachable, resolve_tracking_uri

    plan = plan_from_args(args)
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
