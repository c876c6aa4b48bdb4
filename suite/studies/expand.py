"""Expansion: a study spec becomes settings, one per (grid point x zip index x seed x image).

Each setting's config is ``base <- {seed, images} <- grid/zip point <- profile <- --set`` (deep
merge: dicts merge, other values replace). In a profile (and in ``--set``), ``images`` is the
list of per-run images and ``grid``/``zip`` replace the values of existing axes; a profile's
``zip`` over grid axes steps those axes together instead of crossing them. Settings that
come out identical (same config hash) run once. A setting's name says only what differs between
settings (the constants are params and tags).

One child run per (setting, seed, image) is what the paper's figures need: rows are settings,
columns are images, and resume works per image.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from suite.config import RunConfig
from suite.errors import GistressError, close_matches
from suite.keys import deep_merge, image_ids, nest, parse_assignments
from suite.studies.spec import STUDY_KEYS, StudySpec, check_zip, load_spec, zips_grid_axes


@dataclass
class Setting:
    """One expanded setting: its config, readable name and the axis values that vary."""

    index: int
    name: str
    config: RunConfig
    axes: dict[str, Any] = field(default_factory=dict)  # varying axis -> value (for tables)
    label_axes: dict[str, Any] = field(default_factory=dict)  # the axes the name shows
    seed: int = 0
    image: str = ""

    @property
    def config_hash(self) -> str:
        """The config's hash: the resume key."""
        return self.config.config_hash()

    show_seed: bool = False  # seeds vary in the study: names say which
    show_image: bool = False  # images vary: names say which

    @property
    def row_label(self) -> str:
        """The setting without its image: one figure row per label."""
        return _run_name(self.config.variant, self.label_axes, self.seed if self.show_seed else None)


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------


def parse_sets(sets: Iterable[str]) -> tuple[dict, dict]:
    """``--set key=value`` items -> (RunConfig overrides, study-level overrides).

    Values are parsed with ``yaml.safe_load`` (``50`` is an int, ``[0,1]`` a list, ``none`` the
    string 'none'); keys must exist (the error names the nearest one).
    """
    overrides, study = {}, {}
    for key, value in parse_assignments(sets, extra=("seeds", "images")).items():
        if key in ("seeds", "images"):
            if not isinstance(value, list):
                value = [value]
            if key == "images":
                value = image_ids(value)
            if not value:
                raise GistressError(f"--set {key}= is empty", f"write e.g. --set {key}=[...]")
            study[key] = value
            continue
        overrides[key] = value
    return overrides, study


def _short_key(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return {"bn_mode": "bn", "noise_p": "p", "noise_sigma": "sigma", "iterations": "iters",
            "attacker_knows_training": "knows_training", "local_batch_size": "local_bs"}.get(last, last)


def short_value(value: Any) -> str:
    """An axis value as run names and table columns show it (``0.8``, ``true``, ``a+b``, ``k=v``)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={short_value(v)}" for k, v in value.items()) or "base"
    if isinstance(value, list):
        return "+".join(short_value(v) for v in value)
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _run_name(variant: str, axes: dict[str, Any], seed: Any = None, image: str | None = None) -> str:
    """A short run name made of what differs between settings, e.g. 'preact_resnet18 bn=train'.

    ``axes`` are the varying axes that tell settings apart; the variant leads when it is one of
    them (or when nothing else is). ``seed`` and ``image`` are added only when given (the caller
    passes them when they vary). The MLflow runs table shows a name's first characters, so
    nothing constant goes in: the constants are params and tags.
    """
    parts = [str(variant)] if "variant" in axes or not axes else []
    for key, value in axes.items():
        if key == "variant":
            continue
        if key == "variant_options" and isinstance(value, dict):
            parts.append(short_value(value))
        else:
            parts.append(f"{_short_key(key)}={short_value(value)}")
    if seed is not None:
        parts.append(f"seed={seed}")
    if image is not None:
        parts.append(f"img={image}")
    return " ".join(parts)


def _setting_error(exc: ValidationError, index: int, name: str, source: str) -> GistressError:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f" (got {got!r})"
    return GistressError(
        f"setting {index} ({name}) of {source}: {loc + ': ' if loc else ''}{msg}{got_s}",
        "fix the value in the spec's base/grid/profile or in --set",
    )


def expand_settings(spec: StudySpec | str | Path, profile: str | None = None,
                    sets: Sequence[str] = ()) -> list[Setting]:
    """Expand a spec into settings (grid x zip x seeds x images), validated and de-duplicated."""
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    prof: dict = {}
    if profile is not None:
        if profile not in spec.profiles:
            near = close_matches(profile, spec.profiles, n=1)
            raise GistressError(
                f"profile '{profile}' is not in {spec.source}" + (f" (did you mean '{near}'?)" if near else ""),
                f"profiles: {', '.join(spec.profiles) or 'none'}",
            )
        prof = spec.profiles[profile]
    set_over, set_study = parse_sets(sets)

    grid = dict(spec.grid)
    groups = [dict(g) for g in spec.zip_groups()]
    prof_zip = prof.get("zip") or {}
    if zips_grid_axes(grid, prof_zip):
        # a profile zipping grid axes steps them together instead of crossing them, e.g. a cheap
        # profile running 4 chosen (variant, bn_mode) pairs out of the paper's 4 x 2 grid
        for axis in prof_zip:
            del grid[axis]
        groups.append(dict(prof_zip))
        prof_zip = {}
    for overrides in (prof.get("grid") or {}, prof_zip):
        for axis, values in overrides.items():
            if axis in grid:
                grid[axis] = values
            for g in groups:
                if axis in g:
                    g[axis] = values
    for g in groups:
        check_zip(g, f"{spec.source} (profile '{profile}')")

    seeds = set_study.get("seeds") or prof.get("seeds") or spec.seeds
    images = set_study.get("images") or image_ids(prof.get("images")) or spec.images
    for s in seeds or ():
        if isinstance(s, bool) or not isinstance(s, int):
            raise GistressError(f"seed {s!r} in {spec.source} is not an integer", "write e.g. seeds: [0, 1]")
    base = nest(spec.base)
    prof_over = nest({k: v for k, v in prof.items() if k not in STUDY_KEYS})
    set_over = nest(set_over)
    base_seed = base.get("seed", 0)
    seed_list = list(seeds) if seeds else [base_seed]
    image_list: list = list(images) if images else [None]

    # axes that vary (more than one value) describe the settings; single-valued ones are constants
    varying = [k for k, v in grid.items() if len(v) > 1] + [k for g in groups for k, v in g.items() if len(v) > 1]
    grid_keys = list(grid)
    points = []
    for gp in itertools.product(*(grid[k] for k in grid_keys)):
        for zp in itertools.product(*(range(len(next(iter(g.values())))) for g in groups)):
            point = dict(zip(grid_keys, gp))
            for g, i in zip(groups, zp):
                point.update({k: v[i] for k, v in g.items()})
            points.append(point)
    label_axes = _label_axes(points, varying)
    show_seed = len(set(seed_list)) > 1 or ("seed" in varying and not _implies(points, label_axes, "seed"))
    # images name a setting when several are attacked per point, or when the points' images are
    # not implied by the axes already in the name (a zip of variant and image is named by variant)
    show_image = len(image_list) > 1 or ("images" in varying and not _implies(points, label_axes, "images"))

    settings: list[Setting] = []
    seen: set[str] = set()
    for point in points:
        axes = {k: point[k] for k in varying}
        label = {k: point[k] for k in label_axes}
        for seed in seed_list:
            for image in image_list:
                study_level: dict = {"seed": seed}
                if image is not None:
                    study_level["images"] = image if isinstance(image, list) else [image]
                merged = base
                for layer in (study_level, nest(point), prof_over, set_over):
                    merged = deep_merge(merged, layer)
                try:
                    cfg = RunConfig(**merged)
                except ValidationError as exc:
                    imgs = merged.get("images")
                    img = "+".join(map(str, imgs)) if isinstance(imgs, list) else "default"
                    name = _run_name(merged.get("variant", "?"), label, merged.get("seed", seed) if show_seed else None,
                                     img if show_image else None)
                    raise _setting_error(exc, len(settings) + 1, name, spec.source) from None
                h = cfg.config_hash()
                if h in seen:
                    continue  # e.g. a profile pinned an axis to one value: run it once
                seen.add(h)
                img = "+".join(cfg.images)
                name = _run_name(cfg.variant, label, cfg.seed if show_seed else None, img if show_image else None)
                settings.append(Setting(index=len(settings), name=name, config=cfg, axes=axes, label_axes=label,
                                        seed=cfg.seed, image=img, show_seed=show_seed, show_image=show_image))
    return settings


def _implies(points: list[dict], keys: Sequence[str], target: str) -> bool:
    """True when the values of ``keys`` determine ``target`` across the points."""
    seen: dict[str, str] = {}
    for p in points:
        sig = json.dumps([p[k] for k in keys], sort_keys=True, default=str)
        val = json.dumps(p.get(target), sort_keys=True, default=str)
        if seen.setdefault(sig, val) != val:
            return False
    return True


def _label_axes(points: list[dict], varying: list[str]) -> list[str]:
    """The varying axes a run name needs: drop, from the last, axes that others already imply.

    A zip that pairs ``variant`` with ``size`` and ``attack.iterations`` names its settings by the
    variant alone; ``images`` and ``seed`` are left out (the name ends with them).
    """
    keep = [k for k in varying if k not in ("images", "seed")]

    def unique(keys):
        seen = set()
        for p in points:
            sig = json.dumps([p[k] for k in keys], sort_keys=True, default=str)
            if sig in seen:
                return False
            seen.add(sig)
        return True

    if not unique(keep):
        return keep
    for key in reversed(list(keep)):
        trial = [k for k in keep if k != key]
        if unique(trial):
            keep = trial
    return keep


def expand(spec: StudySpec | str | Path, profile: str | None = None, sets: Sequence[str] = ()) -> list[RunConfig]:
    """The RunConfigs of a study (see ``expand_settings`` for names and axes)."""
    return [s.config for s in expand_settings(spec, profile, sets)]


def dry_run_lines(settings: Sequence[Setting]) -> list[str]:
    """One line per setting plus a count (what ``--dry-run`` prints)."""
    width = len(str(len(settings)))
    lines = [f"[{s.index + 1:>{width}}] {s.name}  ({s.config_hash})" for s in settings]
    lines.append(f"{len(settings)} setting(s)")
    return lines
