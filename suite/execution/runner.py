"""Runs one resolved setting end to end: build -> data -> client -> attacker -> scores -> files.

It never touches MLflow (tracking wraps it) and never hands the target to the attacker: the
target is used only to build oracle inits (tagged) and to score afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from suite.config import RunConfig
from suite.errors import GistressError
from suite.model.bnstats import has_bn
from suite.model.detection import uncalibrated_bn_layers
from suite.results import RunResult

StepHook = Callable[[int, dict[str, float]], None]
# (what, step, images): "reconstruction" or "control", the logged step, the iterate (B, 3, H, W) on CPU
ImageHook = Callable[[str, int, torch.Tensor], None]


def leak_rule(cfg: RunConfig):
    """The leak decision a run's config asks for (``cfg.leak``'s thresholds)."""
    from suite.scoring.leak_rule import LeakRule

    return LeakRule(**cfg.leak.model_dump())


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit CUDA request without one fails,
    and so does a device string torch does not know or a GPU index the machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise GistressError(f"unknown device '{device}'", "use --device auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GistressError(f"device {device} requested but CUDA is not available", "use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise GistressError(f"device {device} requested but this machine has {count} GPU(s)",
                                f"use --device cuda:0 .. cuda:{count - 1}, or set CUDA_VISIBLE_DEVICES")
    return dev


def calibration_images(cfg: RunConfig, task: str, size: int, targets) -> tuple[torch.Tensor, str]:
    """Images to estimate BN statistics on: other images of the same source, never the targets.

    Calibrating on the targets would hand the model the client batch's own statistics (the
    upper-bound grant ``bn_stats=exact``) while the run reports a realistic level, so a source
    with no other images is refused.
    """
    from suite import data

    others = [i for i in data.list_ids(cfg.data, task=task) if i not in set(targets.ids)][:8]
    if not others:
        raise GistressError(
            f"weights=calibrated needs images other than the attacked ones to estimate BN statistics, "
            f"and '{cfg.data}' has no others (calibrating on the targets would give the attacker "
            "their exact batch statistics)",
            "add images to the data source beyond the attacked ones, or load trained weights with "
            "--weights file:<checkpoint>")
    pool = data.load(cfg.data, task=task, size=size, images=others)
    return pool.images, "other images of the source: " + ",".join(others)


def build_and_load(cfg: RunConfig):
    """The variant (weights resolved, calibrated when asked) and the target batch."""
    import variants
    from suite import data

    variant = variants.build(cfg.variant, weights=cfg.weights, seed=cfg.seed,
                             trust_checkpoint=cfg.trust_checkpoint, **cfg.variant_options)
    size = cfg.size or variant.input_size
    batch = data.load(cfg.data, task=variant.task, size=size, images=cfg.images,
                      num_classes=variant.num_classes, seed=cfg.seed)
    if cfg.threat.frozen:
        from suite.threat.client import freeze

        freeze(variant.model, cfg.threat.frozen)
    calibrated_on = None
    if cfg.weights == "calibrated":
        from variants.weights import calibrate_bn

        pool, calibrated_on = calibration_images(cfg, variant.task, size, batch)
        calibrate_bn(variant, pool, batches=cfg.calibration_batches, seed=cfg.seed)
    return variant, batch, calibrated_on


def make_inits(cfg: RunConfig, variant, batch) -> list[torch.Tensor] | None:
    """Explicit inits for oracle (noisy_target) and file starts; None for seeded random."""
    a = cfg.attack
    if a.init == "noisy_target":
        from suite.attack.inits import noisy_target

        gen = torch.Generator().manual_seed(cfg.seed + 17)
        return [noisy_target(batch.images, variant.normalization, p=a.noise_p, sigma=a.noise_sigma,
                             generator=gen) for _ in range(a.restarts)]
    if a.init == "file":
        from suite.attack.inits import from_file

        return [from_file(a.init_file, len(batch), batch.size)] * a.restarts
    return None


@dataclass
class Prepared:
    """A setting's inputs, read and checked: what ``prepare_setting`` returns."""

    device: torch.device
    variant: Any
    batch: Any
    calibrated_on: str | None
    inits: list[torch.Tensor] | None  # explicit starts (noisy target, file); None: seeded random
    started: float  # perf_counter() when preparation began (the run's ``seconds`` count from it)
    closed_form: Any = None  # the closed form's Applicability (method or init closed_form), else None


def prepare_setting(cfg: RunConfig) -> Prepared:
    """Read and check everything the user pointed at (device, variant and weights, data).

    Every bad input surfaces here as a GistressError, before an attack starts: callers that
    open an MLflow run or an output folder call this first, so that a bad input leaves neither.
    """
    from suite.threat.client import Client

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    variant, batch, calibrated_on = build_and_load(cfg)
    # the threat model against this batch (labels in range, boxes shared for detection)
    Client(variant.model, variant.task, cfg.threat, num_classes=variant.num_classes).validate(batch)
    inits = make_inits(cfg, variant, batch)  # reads --init-file; seeded, no global RNG
    return Prepared(device=device, variant=variant, batch=batch, calibrated_on=calibrated_on, inits=inits,
                    started=t0, closed_form=check_closed_form(cfg, variant, batch))


def check_closed_form(cfg: RunConfig, variant, batch):
    """A closed-form attack (or start) checked against the model and the client's batch before
    anything runs: the refusal is a one-line GistressError. None when neither is asked for."""
    a = cfg.attack
    if not (a.closed_form or a.init == "closed_form"):
        return None
    from suite.attack.closed_form import fit

    # a closed-form start reads the structure only: any batch size (its images mix)
    verdict = fit(variant, batch.size, cfg.threat.bn_mode, a.method if a.closed_form else None,
                  len(batch) if a.closed_form else 1)
    if not verdict.applies:
        raise verdict.refusal()
    return verdict


def attacker_for(cfg: RunConfig, variant, obs, device, closed_form=None):
    """The attacker ``cfg.attack`` names: the closed-form solve or the optimization engine.
    ``closed_form``: the Applicability ``check_closed_form`` returned, whose probed first layer
    the closed form reuses instead of probing the sent model again."""
    if cfg.attack.closed_form:
        from suite.attack.closed_form import ClosedFormAttacker

        return ClosedFormAttacker(variant, obs, cfg.attack, device=device, seed=cfg.seed,
                                  layer=None if closed_form is None else closed_form.layer)
    from suite.attack.attacker import Attacker

    return Attacker(variant, obs, cfg.attack, device=device, seed=cfg.seed)


def run_setting(cfg: RunConfig, *, out_dir: Path, progress: bool = True,
                on_step: StepHook | None = None, prepared: Prepared | None = None,
                on_images: ImageHook | None = None, keep_checkpoints: bool = False) -> RunResult:
    """Run one setting and write its artifacts into ``out_dir``; returns the RunResult.

    ``prepared``: the output of ``prepare_setting(cfg)`` when the caller checked the inputs
    first (the result is the same either way). ``on_images`` sees the iterate of the attack
    ("reconstruction") and of its prior-only control ("control") at every logged step of every
    restart, in the order the attacker logs them (tracking keeps a few for MLflow's image grids).
    ``keep_checkpoints``: keep each loop's final checkpoint in ``out_dir``, so running the same
    setting into the same folder again reloads the finished loops instead of repeating them
    (``gistress audit`` continues that way; a study skips finished settings by config hash).
    """
    from suite.threat.client import Client

    prepared = prepared if prepared is not None else prepare_setting(cfg)
    variant = prepared.variant
    variant.model.to(prepared.device)
    client = Client(variant.model, variant.task, cfg.threat, num_classes=variant.num_classes, seed=cfg.seed)
    obs = client.share(prepared.batch.to(prepared.device))
    return attack_observation(cfg, obs, prepared, out_dir=out_dir, progress=progress, on_step=on_step,
                              on_images=on_images, keep_checkpoints=keep_checkpoints)


def attack_observation(cfg: RunConfig, obs, prepared: Prepared, *, out_dir: Path, progress: bool = True,
                       on_step: StepHook | None = None, on_images: ImageHook | None = None,
                       keep_checkpoints: bool = False) -> RunResult:
    """Attack an Observation that is already there and score the reconstruction: the second half
    of ``run_setting``, also used where the update came from elsewhere (``suite.federation``: the
    update a Flower server received). ``prepared.batch`` is the ground truth, used only to score
    after the attack and to build oracle starts (``prepared.inits``); the attacker sees ``obs``."""
    from suite.scoring.metrics import best_snapshot, psnr_per_sample, score, ssim_per_sample, wsrr

    out_dir = Path(out_dir)
    t0 = prepared.started
    device, variant, batch, calibrated_on = prepared.device, prepared.variant, prepared.batch, prepared.calibrated_on
    variant.model.to(device)
    attacker = attacker_for(cfg, variant, obs, device, prepared.closed_form)
    inits = prepared.inits
    start_residual = None
    if cfg.attack.init == "closed_form":
        inits, start_residual = closed_form_inits(cfg, variant, obs, prepared.closed_form)

    bar = _progress(cfg, progress)
    logged_live: set[int] = set()

    def callback(step, record, x):
        # ground truth for the record only: these curves and the oracle snapshot never steer the attack
        x = x.cpu()
        # inside the letterbox content, as the final score: a step's numbers and the result's compare
        values = psnr_per_sample(x, batch.images, batch.content)
        ssims = ssim_per_sample(x, batch.images, batch.content)
        extra = {"psnr": sum(values) / len(values), "ssim": sum(ssims) / len(ssims)}
        if on_images is not None:
            on_images("reconstruction", step, x)
        if on_step is not None:
            on_step(step, {**record, **extra})
            logged_live.add(step)
        if bar is not None:
            bar.update(step + 1 - bar.n)
            bar.set_postfix(loss=f"{record['matching_loss']:.4f}", psnr=f"{extra['psnr']:.1f}")
        return extra

    # mid-run checkpoints in the run's folder: a killed run resumes there (suite/attack/checkpoint.py)
    resumable = {} if cfg.attack.closed_form else dict(checkpoints=Path(out_dir) / "checkpoints",
                                                         fingerprint=cfg.config_hash())
    recon = attacker.reconstruct(inits, callback=callback, **resumable)
    if bar is not None:
        bar.close()
    if on_step is not None and recon.resumed_from is not None:
        # the steps before the resume were logged by the killed process (into its own MLflow run):
        # replay them from the restored history, so this run's curves start at step 0
        for record in recon.history:
            if record["step"] not in logged_live:
                on_step(record["step"], record)
    rule = leak_rule(cfg)
    control = control_scores = None
    # a closed form has no prior to run alone: no prior-only control
    if (cfg.attack.control or cfg.attack.init == "noisy_target") and not cfg.attack.closed_form:
        # the attack's own starts, restart count and selection rule: "same init and budget" literally
        def control_callback(step, record, x):
            on_images("control", step, x.cpu())

        control = attacker.reconstruct(inits, control=True,
                                       callback=control_callback if on_images is not None else None, **resumable)
        control_scores = score(batch.images, control.images, content=batch.content, rule=rule)
        control.matching_loss = attacker.matching_loss(control.images.to(device))
    # the leak decision asks for a gain over the control where one ran (suite.scoring.leak_rule)
    scores = score(batch.images, recon.images, content=batch.content, rule=rule, control=control_scores)
    restart_scores = [score(batch.images, im, content=batch.content, rule=rule, control=control_scores)
                      for im in recon.restart_images]

    metrics = dict(scores.summary())
    metrics["wsrr"] = wsrr(restart_scores)
    metrics["matching_loss"] = recon.matching_loss
    metrics["oracle_best_restart_psnr"] = max(s.summary()["psnr"] for s in restart_scores)
    metrics.update(best_snapshot(recon.history) or {})  # oracle columns: reported, never decided on
    if recon.init is not None:
        init_scores = score(batch.images, recon.init, content=batch.content, use_lpips=False, rule=rule)
        metrics["init_psnr"] = init_scores.summary()["psnr"]
    solution = getattr(attacker, "solution", None)  # a closed form's solve
    if solution is not None:
        metrics.update(solution.metrics())
    if start_residual is not None:
        metrics["start_residual"] = start_residual
    if control_scores is not None:
        metrics.update(control_scores.summary(prefix="control_"))
        metrics["control_matching_loss"] = control.matching_loss
        metrics["gain_psnr"] = metrics["psnr"] - metrics["control_psnr"]
        metrics["gain_content"] = metrics["content_gain"] - metrics["control_content_gain"]
        metrics["gain_ssim"] = metrics["ssim"] - metrics["control_ssim"]
        if "lpips" in metrics and "control_lpips" in metrics:
            metrics["gain_lpips"] = metrics["control_lpips"] - metrics["lpips"]  # lower LPIPS is better
    inferred = getattr(attacker, "inferred_labels", None)  # a closed form needs no labels
    recovered = inferred if inferred is not None else (
        recon.labels if obs.labels is None and variant.task == "classification" else None)  # joint (DLG)
    if recovered is not None:
        from suite.attack.labels import label_accuracy

        metrics["label_accuracy"] = label_accuracy(recovered.cpu(), batch.labels.cpu())
    metrics["restarts_diverged"] = recon.restarts_diverged
    if recon.chosen_tv is not None:  # attack.tv_choices: the weight the matching loss picked
        metrics["chosen_tv"] = recon.chosen_tv
        if control is not None and control.chosen_tv is not None:
            metrics["control_chosen_tv"] = control.chosen_tv
    metrics["seconds"] = time.perf_counter() - t0

    tags = {
        "assumption_level": str(cfg.assumption_level(variant.task, has_bn=has_bn(variant.model))),
        "device": str(device),
        "task": variant.task,
        "grants": json.dumps({**obs.grants, **cfg.attack_grants()}, sort_keys=True),
        "lpips": "available" if scores.lpips is not None else f"missing: {scores.lpips_missing}",
        "leak_rule": scores.leak_rule,
    }
    if calibrated_on:
        tags["calibrated_on"] = calibrated_on
    fresh = uncalibrated_bn_layers(variant.model) if cfg.threat.bn_mode == "eval" and cfg.weights == "random" else []
    if fresh:  # what inversefed-based papers attack (SoK Tab. 4, Fig. 9); flagged, not refused
        tags["bn_statistics"] = (f"fresh in {len(fresh)} BN layer(s) (mean 0, variance 1): in eval mode they "
                                 "only rescale, so the untrained network runs unnormalized, as Geiping et al.'s "
                                 "code attacks it; an upper bound, not a training client")
    if prepared.closed_form is not None:
        tags["closed_form"] = f"{prepared.closed_form.method} applies: {prepared.closed_form.reason}"
        if solution is not None and not solution.determined:
            tags["closed_form"] += (f"; underdetermined: the update has rank {solution.rank} for "
                                    f"{solution.unknowns} unknown patches, so the solve returned the "
                                    "minimum-norm image that fits it")
    if cfg.attack.closed_form and cfg.attack.control:
        tags["control"] = "not run: a closed form has no prior to run alone"
    if recon.diverged:
        tags["diverged"] = recon.diverged
    if recon.resumed_from is not None:
        tags["resumed_from_step"] = str(recon.resumed_from)
    if cfg.attack.init == "file":
        import hashlib

        digest = hashlib.sha256(Path(cfg.attack.init_file).read_bytes()).hexdigest()
        tags["init_source"] = f"user-supplied file {Path(cfg.attack.init_file).name} (sha256 {digest})"
        tags["init_file_sha256"] = digest
    if recovered is not None:
        key = "inferred_labels" if inferred is not None else "recovered_labels"
        tags[key] = ",".join(str(int(v)) for v in recovered.cpu())

    result = RunResult(config=cfg, target=batch, reconstruction=recon, scores=scores, control=control,
                       control_scores=control_scores, restart_scores=restart_scores, metrics=metrics, tags=tags)
    result.artifacts = write_artifacts(result, out_dir, keep_checkpoints=keep_checkpoints)
    return result


def closed_form_inits(cfg: RunConfig, variant, obs, closed_form=None) -> tuple[list[torch.Tensor], float]:
    """``init=closed_form``: every restart starts from the closed-form estimate read off the update
    (each image of the batch gets the same estimate, a mixture when the batch has several), with
    seeded noise of 0.05 on restarts after the first so that they differ. Returns the starts and the
    estimate's residual. ``closed_form``: ``check_closed_form``'s Applicability (its probed layer)."""
    from suite.attack.closed_form import estimate

    pixels, solution, _ = estimate(variant, obs, layer=None if closed_form is None else closed_form.layer)
    residual = solution.residual
    start = pixels.clamp(0, 1).expand(obs.batch_size, -1, -1, -1).clone()
    gen = torch.Generator().manual_seed(cfg.seed + 23)
    inits = [start if r == 0 else (start + 0.05 * torch.randn(start.shape, generator=gen)).clamp(0, 1)
             for r in range(cfg.attack.restarts)]
    return inits, residual


def write_artifacts(result: RunResult, out_dir: Path, keep_checkpoints: bool = False) -> dict[str, Path]:
    """target / init / reconstruction / control PNGs at their own size and upscaled to a legible
    one (``<name>_x<factor>.png``), the side-by-side comparison grid, config, metrics and tensor.
    The loops' ``checkpoints/`` folder is removed (the run is done) unless ``keep_checkpoints``."""
    from suite.reports.images import save_png, side_by_side, upscale_factor

    out_dir.mkdir(parents=True, exist_ok=True)
    batch, recon = result.target, result.reconstruction
    boxes = batch.boxes
    # reorder reconstructions to their matched targets so each column pairs up
    matched = recon.images[result.scores.order]
    panels = {"target": batch.images, "reconstruction": matched}
    if recon.init is not None:
        panels["init"] = recon.init
    if result.control is not None:
        panels["control"] = result.control.images[result.control_scores.order]
    scale = upscale_factor((matched.shape[-1] * matched.shape[0], matched.shape[-2]))
    arts = {}
    for name, images in panels.items():
        box = boxes if name == "target" else None
        arts[name] = save_png(images, out_dir / f"{name}.png", boxes=box)
        if scale > 1:
            arts[f"{name}_large"] = save_png(images, out_dir / f"{name}_x{scale}.png", boxes=box, scale=scale)
    rows = [("target", batch.images)] + ([("init", recon.init)] if recon.init is not None else [])
    if "control" in panels:
        rows.append(("control (prior only)", panels["control"]))
    rows.append(("reconstruction", matched))
    # the file name says what the grid holds, in the order of its columns
    grid_name = "comparison_" + "_".join(r[0].split()[0] for r in rows) + ".png"
    arts["grid"] = side_by_side(rows, out_dir / grid_name, boxes=boxes)
    cfg_path = out_dir / "config.json"
    cfg_path.write_text(json.dumps(result.config.model_dump(mode="json"), indent=2))
    arts["config"] = cfg_path
    tensor_path = out_dir / "reconstruction.pt"
    torch.save({"reconstruction": recon.images, "order": result.scores.order,
                "control": None if result.control is None else result.control.images}, tensor_path)
    arts["tensor"] = tensor_path
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    arts["metrics"] = metrics_path
    if not keep_checkpoints:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # the run is done: nothing to resume
    return arts


def _progress(cfg: RunConfig, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.attack.iterations, desc=f"{cfg.variant} attack", leave=False, dynamic_ncols=True)
