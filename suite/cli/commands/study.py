"""``gistress study``: run (or resume) a study spec from runs/*.yaml, tracked in MLflow."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub):
    """Register ``gistress study`` and its flags."""
    p = sub.add_parser(
        "study",
        help="run a study spec (runs/*.yaml): one MLflow child run per setting, resumable",
        description="Expand a study spec into settings and run them; settings already FINISHED in "
        "the study's MLflow experiment are skipped (use --fresh to re-run them).",
    )
    p.add_argument("spec", help="study spec, e.g. runs/quickstart.yaml")
    p.add_argument("--profile", help="profile of the spec, e.g. smoke (tiny, CI-sized) or paper (published scale)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key for every setting, e.g. --set attack.iterations=50 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded settings and exit (no MLflow)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary as the last line")
    p.add_argument("--fresh", action="store_true", help="re-run settings that already finished")
    p.add_argument("--executor", choices=["local", "slurm"], default="local",
                   help="local: this machine (--workers processes); slurm: a submitit job array")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (1 = in this process)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--out", default="gistress-out", help="output root; the study writes to OUT/<study name>/")
    s = p.add_argument_group("slurm (override the spec's executor block)")
    s.add_argument("--slurm-partition")
    s.add_argument("--gpus-per-node", type=int)
    s.add_argument("--timeout-min", type=int, help="time limit per setting in minutes")
    s.add_argument("--array-parallelism", type=int, help="settings running at once")
    # Another function with run_setting's signature (tests, custom attack loops).
    p.add_argument("--runner", default="suite.execution.runner:run_setting", help=argparse.SUPPRESS)
    return p


def run(args) -> int:
    """Run the study; 0 when every setting finished, 1 when some failed, 130 when interrupted."""
    from suite.execution.lifecycle import EXIT_INTERRUPTED, EXIT_OK
    from suite.studies import run_study

    options = {
        "slurm_partition": args.slurm_partition,
        "gpus_per_node": args.gpus_per_node,
        "timeout_min": args.timeout_min,
        "slurm_array_parallelism": args.array_parallelism,
    }
    try:
        outcome = run_study(
            args.spec, profile=args.profile, sets=args.sets, dry_run=args.dry_run, fresh=args.fresh,
            executor=args.executor, workers=args.workers, tracking_uri=args.tracking_uri, out_root=args.out,
            json_out=args.json, runner=args.runner, executor_options=options,
        )
    except KeyboardInterrupt:
        print("interrupted: finished settings are kept; run the same command again to complete the rest",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if args.dry_run else outcome.exit_code
