"""``gistress attack``: one attack on one batch, with a table, PNGs and one MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

from suite.errors import GistressError


def add_parser(sub):
    """Register the subcommand: the flags of ``suite.cli.flags.FLAGS``, ``--set`` and the run flags."""
    from suite.cli.flags import FLAGS, HelpFormatter, add_flags, add_set_flag

    p = sub.add_parser(
        "attack", help="run one gradient-inversion attack", formatter_class=HelpFormatter,
        description="Run one gradient-inversion attack on one batch. Each flag below sets one run-config "
                    "key, shown in [brackets]; --set KEY=VALUE sets any key and is applied after the "
                    "flags, so for the same key --set wins.")
    groups = add_flags(p, FLAGS)
    groups["data"].add_argument("--batch", type=int, metavar="N",
                                help="take the first N images of the source (instead of --image)")
    add_set_flag(p.add_argument_group("any run-config key"))
    o = groups["run"]
    o.add_argument("--out", default=None, help="output folder (default gistress-out/attack-<time>)")
    o.add_argument("--experiment", default="gistress-attack", help="MLflow experiment name")
    o.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    o.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(args):
    """The RunConfig the command line describes: the flags, then ``--set`` on top (later wins).

    Without images, ``--batch N`` takes the first N of the source, and a source other than
    ``samples`` its first image. Validation errors become one-line GistressErrors.
    """
    from suite.cli.flags import FLAGS, overrides, run_config
    from suite.config import RunConfig

    fields = overrides(args, FLAGS)
    source = fields.get("data", RunConfig.model_fields["data"].default)
    batch = getattr(args, "batch", None)
    if "images" not in fields and batch:
        from suite import data
        from variants.base import task_of

        ids = data.list_ids(source, task=task_of(fields.get("variant")))
        if batch > len(ids):
            raise GistressError(f"batch of {batch} asked, the data has {len(ids)} images",
                                f"use --batch {len(ids)} or less")
        fields["images"] = ids[:batch]
    elif "images" not in fields and source != "samples":
        fields["images"] = []
    cfg = run_config(fields, "gistress attack")
    if not cfg.images:
        from suite import data
        from variants.base import task_of

        cfg.images = data.list_ids(cfg.data, task=task_of(cfg.variant))[:1]
    return cfg


def grants_line(result) -> str:
    """What the attacker was granted, the SoK assumption level it adds up to, and whether the
    setting is an upper bound (eval-mode BN, exact statistics or a target-derived start)."""
    import json

    cfg = result.config
    grants = json.loads(result.tags.get("grants", "{}"))
    text = "; ".join(f"{k}: {v}" for k, v in grants.items()) or "none"
    level = result.tags.get("assumption_level", "?")
    bound = " (an upper bound: " + ", ".join(
        why for why, on in (("the client is simplified", cfg.threat.upper_bound),
                            ("the start is target-derived", cfg.attack.oracle_init)) if on) + ")" \
        if cfg.upper_bound else ""
    return f"grants: {text}; SoK assumption level {level}{bound}"


def summary_table(result) -> str:
    """The final table: attack and control scores side by side."""
    m = result.metrics
    lp = lambda key: f"{m[key]:.3f}" if key in m else "missing"  # noqa: E731
    lines = [f"{'':<16}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>9}{'content':>9}{'BRR':>6}{'match loss':>12}"]
    lines.append(f"{'attack':<16}{m['psnr']:>8.2f}{m['ssim']:>8.3f}{lp('lpips'):>9}{m['content_gain']:>9.2f}"
                 f"{m['brr']:>6.2f}{m['matching_loss']:>12.4f}")
    if "control_psnr" in m:
        lines.append(f"{'prior-only ctrl':<16}{m['control_psnr']:>8.2f}{m['control_ssim']:>8.3f}"
                     f"{lp('control_lpips'):>9}{m['control_content_gain']:>9.2f}{m['control_brr']:>6.2f}"
                     f"{m['control_matching_loss']:>12.4f}")
        lines.append(f"{'gradient gain':<16}{m['gain_psnr']:>+8.2f}{m['gain_ssim']:>+8.3f}{'':>9}"
                     f"{m['gain_content']:>+9.2f}")
    lines.append(f"leaked: {'yes' if m['leaked'] else 'no'} (rule: {result.scores.leak_rule}; 'content' is the "
                 "content gain in dB over the target's mean colour)")
    if "closed_form_residual" in m:
        lines.append(f"closed form: {result.tags.get('closed_form', '')}; residual "
                     f"{m['closed_form_residual']:.2e} (first-layer update rebuilt from the solution vs the "
                     "observed one; no target involved); no prior-only control (a closed form has no prior)")
    else:
        lines.append(f"init PSNR {m['init_psnr']:.2f} dB; oracle-best restart PSNR "
                     f"{m['oracle_best_restart_psnr']:.2f} dB (upper bound: chosen by ground truth)")
    if "start_residual" in m:
        lines.append(f"start: the closed-form estimate read off the update (residual {m['start_residual']:.2e})")
    if result.scores.lpips is None:
        lines.append(f"LPIPS missing: {result.scores.lpips_missing}")
    if "init_source" in result.tags:
        lines.append(f"start: {result.tags['init_source']}; these scores depend on that start")
    lines.append(grants_line(result))
    return "\n".join(lines)


def run(args) -> int:
    """Run the attack, log it and print the table.

    Inputs are checked before anything is written: a bad flag, checkpoint, image or tracking URI
    leaves no MLflow run and no output folder (the folder is written once the attack is done).
    The run's lifecycle (tags, SIGTERM as Ctrl-C, terminal status, the printed end) is
    ``suite.execution.lifecycle``'s, as for ``gistress study`` and ``gistress audit``.
    """
    from suite.execution.lifecycle import EXIT_OK, interruptible, page_hint, print_end
    from suite.execution.runner import prepare_setting, run_setting

    cfg = config_from_args(args)
    out = Path(args.out or f"gistress-out/attack-{time.strftime('%Y%m%d-%H%M%S')}")
    run_id = hint = None
    with interruptible():
        if args.no_mlflow:
            result = run_setting(cfg, out_dir=out, progress=not args.quiet)
        else:
            from suite.execution.executors import image_hook
            from suite.execution.mlflow_ui import run_link
            from suite.execution.tracking import check_reachable, resolve_tracking_uri, setting_run

            uri = resolve_tracking_uri(args.tracking_uri)
            check_reachable(uri)
            prepared = prepare_setting(cfg)
            with setting_run(cfg, experiment=args.experiment, tracking_uri=uri) as tr:
                result = run_setting(cfg, out_dir=out, progress=not args.quiet, on_step=tr.log_step,
                                     prepared=prepared, **image_hook(run_setting, tr))
                tr.log_result(result)
                run_id = tr.run_id
                exp_id = tr.client.get_run(run_id).info.experiment_id
            hint = page_hint(f"mlflow run: {run_id}; its page", uri, lambda base: run_link(base, exp_id, run_id))
    summary = {"metrics": result.metrics, "tags": result.tags, "out_dir": str(out.resolve()), "run_id": run_id,
               "config_hash": cfg.config_hash()}
    print_end(None, table=summary_table(result), files=[("images", out.resolve())], mlflow=hint,
              summary=summary if args.json else None)
    return EXIT_OK
