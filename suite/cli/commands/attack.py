"""``gistress attack``: one attack on one batch, with a table, PNGs and one MLflow run."""

from __future__ import annotations

import time
from pathlib import Path

from suite.errors import GistressError


def add_parser(sub):
    """Register the subcommand and its flags (threat model, attack recipe, data, output)."""
    p = sub.add_parser("attack", help="run one gradient-inversion attack")
    add_model_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="samples",
                   help="samples | cifar10:<root> | imagefolder:<root> | coco:<images>:<annotations.json>")
    d.add_argument("--image", action="append", default=[], help="image name/id (repeat or comma-separate)")
    d.add_argument("--image-id", action="append", default=[], help="COCO image id (repeatable)")
    d.add_argument("--batch", type=int, help="take the first N images of the source")
    d.add_argument("--size", type=int, help="input size in pixels (default: the variant's)")
    t = p.add_argument_group("threat model")
    t.add_argument("--bn-mode", choices=["train", "eval"], default="train")
    t.add_argument("--update", choices=["gradient", "fedavg"], default="gradient")
    t.add_argument("--local-steps", type=int, default=1)
    t.add_argument("--local-lr", type=float, default=0.01)
    t.add_argument("--local-batch-size", type=int)
    t.add_argument("--unknown-training", action="store_true",
                   help="the server does not know the local hyper-parameters (matches the delta as one step)")
    t.add_argument("--bn-stats", choices=["none", "running", "exact"], default="none")
    t.add_argument("--no-labels", action="store_true", help="labels are not shared (inferred or joint)")
    t.add_argument("--defense", default="none", help="qsgd:<bits> | sign | topk:<keep> | clip:<bound> | noise:<sigma>")
    a = p.add_argument_group("attack")
    a.add_argument("--preset", default="ig", help="ig | dlg | gia_bn")
    a.add_argument("--objective", choices=["cosine", "l2"])
    a.add_argument("--optimizer", choices=["adam", "lbfgs"])
    a.add_argument("--lr", type=float)
    a.add_argument("--tv", type=float)
    a.add_argument("--bn-prior", type=float)
    a.add_argument("--space", choices=["normalized", "pixel"],
                   help="optimize the candidate in the variant's normalized space (presets) or in [0, 1] pixels")
    a.add_argument("--keep", choices=["best", "last"],
                   help="return the lowest-objective iterate (presets) or the final one")
    a.add_argument("--iterations", type=int, default=300)
    a.add_argument("--restarts", type=int, default=1)
    a.add_argument("--restart-mode", choices=["auto", "batched", "sequential"], default=None,
                   help="auto: batched (one vmapped pass) on CUDA where supported, else sequential")
    a.add_argument("--init", choices=["random", "noisy_target", "file"])
    a.add_argument("--noise-p", type=float)
    a.add_argument("--noise-sigma", type=float)
    a.add_argument("--init-file")
    a.add_argument("--labels", choices=["auto", "joint"])
    a.add_argument("--control", action="store_true", help="also run the prior-only control")
    a.add_argument("--log-every", type=int, default=None,
                   help="log step metrics every N steps (default: about 50 points per run)")
    o = p.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    o.add_argument("--out", default=None, help="output folder (default gistress-out/attack-<time>)")
    o.add_argument("--experiment", default="gistress-attack", help="MLflow experiment name")
    o.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)")
    o.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def add_model_args(p) -> None:
    """The model flags shared by ``attack`` and ``audit``."""
    g = p.add_argument_group("model")
    g.add_argument("--variant", required=True, help="variant name, timm:<name> or torchvision:<name>")
    g.add_argument("--stem", choices=["cifar", "imagenet"], help="ResNet/modern stem")
    g.add_argument("--width", type=int, help="base width (ResNets, convnet)")
    g.add_argument("--num-classes", type=int, help="classifier classes")
    g.add_argument("--nc", type=int, help="YOLO classes")
    g.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="any other variant option")
    g.add_argument("--weights", default="random", help="random | calibrated | pretrained | file:<path>")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the weights file (only for files you trust)")


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def config_from_args(args):
    """The RunConfig the flags describe (validation errors become one-line GistressErrors)."""
    from pydantic import ValidationError

    from suite.config import RunConfig, first_error

    options = {}
    for key, flag in (("stem", args.stem), ("width", args.width), ("num_classes", args.num_classes), ("nc", args.nc)):
        if flag is not None:
            options[key] = flag
    for item in args.opt:
        if "=" not in item:
            raise GistressError(f"--opt {item!r} is not KEY=VALUE", "write e.g. --opt cut_skips=[0,1]")
        k, v = item.split("=", 1)
        options[k.strip()] = _parse_value(v)
    images = [s for item in args.image for s in item.split(",") if s] + list(args.image_id)
    if not images and args.batch:
        from suite import data
        from variants.base import task_of

        task = task_of(args.variant)
        ids = data.list_ids(args.data, task=task)
        if args.batch > len(ids):
            raise GistressError(f"batch of {args.batch} asked, the data has {len(ids)} images",
                                f"use --batch {len(ids)} or less")
        images = ids[: args.batch]
    attack = {k: v for k, v in dict(
        preset=args.preset, objective=args.objective, optimizer=args.optimizer, lr=args.lr, tv=args.tv,
        bn_prior=args.bn_prior, iterations=args.iterations, restarts=args.restarts,
        restart_mode=args.restart_mode, init=args.init,
        noise_p=args.noise_p, noise_sigma=args.noise_sigma, init_file=args.init_file, labels=args.labels,
        control=args.control, log_every=args.log_every, space=args.space, keep=args.keep,
    ).items() if v is not None}
    threat = dict(bn_mode=args.bn_mode, update=args.update, local_steps=args.local_steps,
                  local_lr=args.local_lr, local_batch_size=args.local_batch_size,
                  attacker_knows_training=not args.unknown_training, shares_labels=not args.no_labels,
                  bn_stats=args.bn_stats, defense=args.defense)
    fields = dict(variant=args.variant, variant_options=options, weights=args.weights,
                  trust_checkpoint=args.trust_checkpoint, data=args.data, size=args.size, seed=args.seed,
                  device=args.device, threat=threat, attack=attack)
    if images:
        fields["images"] = images
    elif args.data != "samples":
        fields["images"] = []
    try:
        cfg = RunConfig(**fields)
    except ValidationError as exc:
        raise GistressError(first_error(exc), "see `gistress attack --help`") from None
    if not cfg.images:
        from suite import data
        from variants.base import task_of

        cfg.images = data.list_ids(cfg.data, task=task_of(cfg.variant))[:1]
    return cfg


def summary_table(result) -> str:
    """The final table: attack and control scores side by side."""
    m = result.metrics
    lp = lambda key: f"{m[key]:.3f}" if key in m else "missing"  # noqa: E731
    lines = [f"{'':<16}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>9}{'BRR':>6}{'match loss':>12}"]
    lines.append(f"{'attack':<16}{m['psnr']:>8.2f}{m['ssim']:>8.3f}{lp('lpips'):>9}{m['brr']:>6.2f}"
                 f"{m['matching_loss']:>12.4f}")
    if "control_psnr" in m:
        lines.append(f"{'prior-only ctrl':<16}{m['control_psnr']:>8.2f}{m['control_ssim']:>8.3f}"
                     f"{lp('control_lpips'):>9}{m['control_brr']:>6.2f}{m['control_matching_loss']:>12.4f}")
        lines.append(f"{'gradient gain':<16}{m['gain_psnr']:>+8.2f}{m['gain_ssim']:>+8.3f}")
    lines.append(f"init PSNR {m['init_psnr']:.2f} dB; oracle-best restart PSNR {m['oracle_best_restart_psnr']:.2f} dB "
                 "(upper bound: chosen by ground truth)")
    if result.scores.lpips is None:
        lines.append(f"LPIPS missing: {result.scores.lpips_missing}")
    if "init_source" in result.tags:
        lines.append(f"start: {result.tags['init_source']}; these scores depend on that start")
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
            from suite.execution.mlflow_ui import run_link
            from suite.execution.tracking import check_reachable, resolve_tracking_uri, setting_run

            uri = resolve_tracking_uri(args.tracking_uri)
            check_reachable(uri)
            prepared = prepare_setting(cfg)
            with setting_run(cfg, experiment=args.experiment, tracking_uri=uri) as tr:
                result = run_setting(cfg, out_dir=out, progress=not args.quiet, on_step=tr.log_step,
                                     prepared=prepared)
                tr.log_result(result)
                run_id = tr.run_id
                exp_id = tr.client.get_run(run_id).info.experiment_id
            hint = page_hint(f"mlflow run: {run_id}; its page", uri, lambda base: run_link(base, exp_id, run_id))
    summary = {"metrics": result.metrics, "tags": result.tags, "out_dir": str(out.resolve()), "run_id": run_id,
               "config_hash": cfg.config_hash()}
    print_end(None, table=summary_table(result), files=[("images", out.resolve())], mlflow=hint,
              summary=summary if args.json else None)
    return EXIT_OK
