"""Studies: a YAML spec expanded into settings, each run as one MLflow child run.

A spec (``runs/*.yaml``) has::

    name: fig2_resnet_bn            # MLflow experiment name (one experiment per study)
    description: ...
    base: {...}                     # a partial RunConfig (nested or dotted keys)
    grid: {threat.bn_stats: [none, running, exact], variant: [...]}   # cartesian product
    zip: {variant: [...], variant_options: [...]}   # axes stepped together (equal lengths);
                                                    # a list of such groups is allowed too
    seeds: [0, 1]
    images: [astronaut, chelsea]    # one child run per image; an item may itself be a list (a batch)
    profiles:
      smoke: {attack.iterations: 4, size: 32, images: [astronaut]}
      paper: {attack.iterations: 10000}
    executor: {slurm_partition: gpu, gpus_per_node: 1, timeout_min: 600, slurm_array_parallelism: 8}

Expansion: one setting per (grid point x zip index x seed x image). Each setting's config is
``base <- {seed, images} <- grid/zip point <- profile <- --set`` (deep merge: dicts merge, other
values replace). In a profile (and in ``--set``), ``seeds``/``images``/``grid``/``zip`` are
study-level keys: ``images`` there is the list of per-run images, ``grid``/``zip`` replace the
values of existing axes; every other key overrides the RunConfig. Settings that come out
identical (same config hash) run once.

One child run per (setting, seed, image) is what the paper's figures need: rows are settings,
columns are images, and resume works per image.
"""

from __future__ import annotations

import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

import suite
from suite.config import RunConfig
from suite.errors import GistressError, close_matches
from suite.keys import check_key, check_keys, deep_merge, nest
from suite.results import jsonable

DEFAULT_RUNNER = "suite.execution.runner:run_setting"
STUDY_KEYS = ("seeds", "images", "grid", "zip")  # keys of a profile / --set that are not RunConfig's


# ---------------------------------------------------------------------------------------------
# spec model
# ---------------------------------------------------------------------------------------------


class ExecutorBlock(BaseModel):
    """Scale-out settings for ``--executor slurm`` (names as in submitit)."""

    model_config = ConfigDict(extra="forbid")

    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_constraint: str | None = None
    gpus_per_node: int | None = Field(None, ge=0)
    cpus_per_task: int | None = Field(None, ge=1)
    mem_gb: float | None = Field(None, gt=0)
    timeout_min: int | None = Field(None, ge=1)
    slurm_array_parallelism: int | None = Field(None, ge=1)


class StudySpec(BaseModel):
    """A validated study spec (see the module docstring for the layout)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] | list[dict[str, list[Any]]] | None = None
    seeds: list[int] | None = None
    images: list[str | list[str]] | None = None
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    executor: ExecutorBlock = Field(default_factory=ExecutorBlock)

    _source: str = PrivateAttr("<spec>")  # where it was read from, for messages

    @property
    def source(self) -> str:
        """The file the spec came from (for messages)."""
        return self._source

    @field_validator("images", mode="before")
    @classmethod
    def _ids_as_text(cls, value):
        return _image_ids(value)

    def zip_groups(self) -> list[dict[str, list[Any]]]:
        """The zip groups as a list (a single mapping is one group)."""
        if self.zip is None:
            return []
        return [self.zip] if isinstance(self.zip, dict) else list(self.zip)


def _image_ids(value):
    """COCO image ids written as numbers (``images: [139, 285]``) are names too."""
    if isinstance(value, list):
        return [_image_ids(v) for v in value]
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


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
        return self.config.config_hash()

    show_seed: bool = False  # seeds vary in the study: names say which
    show_image: bool = False  # images vary: names say which

    @property
    def row_label(self) -> str:
        """The setting without its image: one figure row per label."""
        return _run_name(self.config.variant, self.label_axes, self.seed if self.show_seed else None)


# ---------------------------------------------------------------------------------------------
# loading and validation
# ---------------------------------------------------------------------------------------------


def _yaml_line(text: str, loc: Sequence[Any]) -> int | None:
    """1-based line of the key at ``loc`` in the YAML text (best effort; None if not found)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _where(source: str, line: int | None) -> str:
    return f"{source}:{line}" if line else source


def parse_spec(text: str, source: str = "<spec>") -> StudySpec:
    """Validate spec text; every problem becomes a one-line GistressError naming file and line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise GistressError(f"malformed YAML in {where}: {' '.join(str(problem).split())}",
                            "fix the YAML syntax at that line") from None
    if not isinstance(data, dict):
        raise GistressError(f"{source} is not a mapping of study keys",
                            "start the spec with 'name: <study>' and a 'grid:' block")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        raise _spec_error(exc, text, source) from None
    spec._source = source
    _validate_spec(spec, text)
    return spec


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec file."""
    p = Path(path)
    if not p.is_file():
        near = close_matches(p.name, [q.name for q in p.parent.glob("*.yaml")]) if p.parent.is_dir() else ""
        raise GistressError(f"study spec {path} not found" + (f" (did you mean {near}?)" if near else ""),
                            "pass a file such as runs/quickstart.yaml")
    return parse_spec(p.read_text(), str(path))


def _spec_error(exc: ValidationError, text: str, source: str) -> GistressError:
    err = exc.errors()[0]
    loc = [x for x in err.get("loc", ())]
    # pydantic reports union members in the loc; keep the keys the user wrote
    loc = [x for x in loc if not (isinstance(x, str) and (x.startswith(("list[", "dict[")) or x in ("str",)))]
    dotted = ".".join(str(x) for x in loc)
    where = _where(source, _yaml_line(text, loc))
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        parent = StudySpec if len(loc) == 1 else ExecutorBlock if loc[0] == "executor" else None
        options = list(parent.model_fields) if parent else []
        near = close_matches(key, options, n=1)
        shown = dotted if len(loc) > 1 else key
        return GistressError(
            f"unknown key '{shown}' in {where}" + (f" (did you mean '{near}'?)" if near else ""),
            f"valid keys: {', '.join(options)}",
        )
    if err["type"] == "missing":
        return GistressError(f"{where}: '{dotted}' is required", f"add '{dotted}: ...' to the spec")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    got = err.get("input")
    got_s = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return GistressError(f"{where}: {dotted}: {msg}{got_s}", "see the layout in suite/studies/study.py or runs/quickstart.yaml")


def _validate_spec(spec: StudySpec, text: str) -> None:
    """Checks pydantic cannot do: RunConfig key paths, empty axes, zip lengths, profiles."""
    src = spec.source

    def where(*loc):
        return _where(src, _yaml_line(text, loc))

    check_keys(spec.base, where("base"))
    for key, values in spec.grid.items():
        check_key(key, where("grid", key))
        if not values:
            raise GistressError(f"grid axis '{key}' in {where('grid', key)} is empty",
                                "give it at least one value or remove the axis")
    groups = spec.zip_groups()
    for gi, group in enumerate(groups):
        loc = ("zip",) if isinstance(spec.zip, dict) else ("zip", gi)
        for key in group:
            check_key(key, where(*loc))
            if key in spec.grid:
                raise GistressError(f"axis '{key}' is both in grid and zip in {where(*loc)}",
                                    "keep it in one place")
        _check_zip(group, where(*loc))
    if spec.seeds is not None and not spec.seeds:
        raise GistressError(f"seeds in {where('seeds')} is empty", "give at least one seed, e.g. seeds: [0]")
    if spec.images is not None and not spec.images:
        raise GistressError(f"images in {where('images')} is empty", "give at least one image name")
    for pname, prof in spec.profiles.items():
        _check_profile(spec, pname, prof, where("profiles", pname))


def _check_zip(group: dict[str, list], where: str) -> None:
    lengths = {k: len(v) for k, v in group.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}: {n}" for k, n in lengths.items())
        raise GistressError(f"zip axes in {where} have different lengths ({detail})",
                            "zipped axes step together: give each the same number of values")
    if any(n == 0 for n in lengths.values()):
        raise GistressError(f"zip axes in {where} are empty", "give each zipped axis at least one value")


def _check_profile(spec: StudySpec, pname: str, prof: dict, where: str) -> None:
    if not isinstance(prof, dict):
        raise GistressError(f"profile '{pname}' in {where} is not a mapping", "write e.g. smoke: {size: 32}")
    overrides = {k: v for k, v in prof.items() if k not in STUDY_KEYS}
    check_keys(overrides, f"{where} (profile '{pname}')", extra=STUDY_KEYS)
    axes = set(spec.grid) | {k for g in spec.zip_groups() for k in g}
    for key in ("grid", "zip"):
        sub = prof.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise GistressError(f"profile '{pname}' {key} in {where} must map axes to lists",
                                "write e.g. grid: {attack.noise_p: [0.8, 1.0]}")
        for axis, values in sub.items():
            if axis not in axes:
                near = close_matches(axis, sorted(axes), n=1)
                raise GistressError(
                    f"profile '{pname}' in {where} overrides axis '{axis}', which the spec does not have"
                    + (f" (did you mean '{near}'?)" if near else ""),
                    f"axes: {', '.join(sorted(axes)) or 'none'}",
                )
            if not isinstance(values, list) or not values:
                raise GistressError(f"profile '{pname}' axis '{axis}' in {where} must be a non-empty list",
                                    "write e.g. [0.8, 1.0]")
    for key in ("seeds", "images"):
        if key in prof and (not isinstance(prof[key], list) or not prof[key]):
            raise GistressError(f"profile '{pname}' {key} in {where} must be a non-empty list",
                                f"write e.g. {key}: {[0] if key == 'seeds' else ['astronaut']}")


# ---------------------------------------------------------------------------------------------
# expansion
# ---------------------------------------------------------------------------------------------


def parse_sets(sets: Iterable[str]) -> tuple[dict, dict]:
    """``--set key=value`` items -> (RunConfig overrides, study-level overrides).

    Values are parsed with ``yaml.safe_load`` (``50`` is an int, ``[0,1]`` a list, ``none`` the
    string 'none'); keys must exist (the error names the nearest one).
    """
    from suite.keys import parse_assignments  # the key=value parsing study, attack and audit share

    overrides, study = {}, {}
    for key, value in parse_assignments(sets, extra=("seeds", "images")).items():
        if key in ("seeds", "images"):
            if not isinstance(value, list):
                value = [value]
            if key == "images":
                value = _image_ids(value)
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


def _short_value(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_short_value(v)}" for k, v in value.items()) or "base"
    if isinstance(value, list):
        return "+".join(_short_value(v) for v in value)
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
            parts.append(_short_value(value))
        else:
            parts.append(f"{_short_key(key)}={_short_value(value)}")
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
    for key in ("grid", "zip"):
        for axis, values in (prof.get(key) or {}).items():
            if axis in grid:
                grid[axis] = values
            for g in groups:
                if axis in g:
                    g[axis] = values
    for g in groups:
        _check_zip(g, f"{spec.source} (profile '{profile}')")

    seeds = set_study.get("seeds") or prof.get("seeds") or spec.seeds
    images = set_study.get("images") or _image_ids(prof.get("images")) or spec.images
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


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyOutcome:
    """What a study invocation produced."""

    study: str
    profile: str | None
    settings: list[Setting]
    rows: list[dict] = field(default_factory=list)
    parent_run_id: str | None = None
    experiment_id: str | None = None
    tracking_uri: str | None = None
    csv_path: Path | None = None
    figure_path: Path | None = None
    interrupted: bool = False

    @property
    def counts(self) -> dict[str, int]:
        """Rows per status."""
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    @property
    def exit_code(self) -> int:
        """0 all finished, 1 some setting failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if any(r["status"] != "FINISHED" for r in self.rows) else 0

    def to_json(self) -> dict:
        """A machine-readable summary (the ``--json`` line)."""
        return {
            "study": self.study,
            "profile": self.profile,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "n_settings": len(self.settings),
            "counts": self.counts,
            "interrupted": self.interrupted,
            "summary_csv": str(self.csv_path) if self.csv_path else None,
            "figure": str(self.figure_path) if self.figure_path else None,
            "rows": self.rows,
        }


def _install_sigterm() -> Callable[[], None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread; returns the undo."""
    from suite.execution.tracking import Terminated

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _ignore_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def dry_run_lines(settings: Sequence[Setting]) -> list[str]:
    """One line per setting plus a count (what ``--dry-run`` prints)."""
    width = len(str(len(settings)))
    lines = [f"[{s.index + 1:>{width}}] {s.name}  ({s.config_hash})" for s in settings]
    lines.append(f"{len(settings)} setting(s)")
    return lines


def run_study(
    spec_path: str | Path,
    *,
    profile: str | None = None,
    sets: Sequence[str] = (),
    dry_run: bool = False,
    fresh: bool = False,
    executor: str = "local",
    workers: int = 1,
    tracking_uri: str | None = None,
    out_root: str | Path = "gistress-out",
    json_out: bool = False,
    runner: str = DEFAULT_RUNNER,
    executor_options: dict | None = None,
    out=None,
) -> StudyOutcome:
    """Run (or resume) a study: one MLflow experiment, one parent run, one child per setting.

    Resume: settings whose config hash already has a FINISHED child in the experiment are
    skipped (their earlier results fill the summary); FAILED/KILLED ones run again; ``fresh``
    re-runs everything. A failing setting marks its child FAILED and the study goes on. Ctrl-C /
    SIGTERM: the running child and the parent end KILLED, the summary of what exists is written,
    and KeyboardInterrupt is re-raised (re-running completes the rest).
    """
    from suite.execution import executors, tracking
    from suite.reports import figures

    out = out or sys.stdout
    spec = load_spec(spec_path)
    settings = expand_settings(spec, profile, sets)
    outcome = StudyOutcome(study=spec.name, profile=profile, settings=settings)
    if dry_run:
        for line in dry_run_lines(settings):
            print(line, file=out)
        if json_out:
            print(json.dumps({"study": spec.name, "profile": profile, "n_settings": len(settings),
                              "settings": [{"name": s.name, "config_hash": s.config_hash,
                                            "config": s.config.model_dump(mode="json")} for s in settings]}),
                  file=out)
        return outcome

    if runner == DEFAULT_RUNNER:
        check_variants(settings, spec.source)
    plan = executors.plan(executor, workers=workers, spec_block=spec.executor, options=executor_options)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_reachable(uri)
    executors.check_tracking(plan, uri)
    outcome.tracking_uri = uri
    client = tracking.client_for(uri)
    exp_id = tracking.experiment_id(client, spec.name)
    outcome.experiment_id = exp_id
    done = {} if fresh else tracking.finished_runs(spec.name, uri, client=client)
    pending = [s for s in settings if s.config_hash not in done]
    reused = {s.index: done[s.config_hash] for s in settings if s.config_hash in done}

    study_dir = Path(out_root) / spec.name
    study_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_tags = {
        tracking.KIND_TAG: "study",
        "study": spec.name,
        "profile": profile or "none",
        "sets": " ".join(sets) or "none",
        "spec": str(spec_path),
        "executor": plan.kind,
        "n_settings": str(len(settings)),
        "n_reused": str(len(reused)),
        "gistress_version": suite.__version__,
        "mlflow.source.name": "gistress study",
    }
    if tracking.git_commit():
        parent_tags["git_commit"] = parent_tags["mlflow.source.git.commit"] = tracking.git_commit()
    if spec.description:
        parent_tags["mlflow.note.content"] = spec.description
    parent = client.create_run(exp_id, tags=parent_tags, run_name=f"{spec.name} {profile or 'default'} {stamp}")
    parent_id = parent.info.run_id
    outcome.parent_run_id = parent_id
    print(f"study {spec.name}: {len(settings)} setting(s), {len(reused)} already finished, "
          f"{len(pending)} to run ({plan.describe()}); MLflow {uri} parent run {parent_id}", file=out)

    restore = _install_sigterm()
    results: dict[int, dict] = {}
    try:
        with tracking.terminal_status(client, parent_id):
            try:
                client.log_text(parent_id, Path(spec_path).read_text(), "spec.yaml")
                client.log_dict(parent_id, {"profile": profile, "sets": list(sets),
                                            "settings": [{"name": s.name, "config_hash": s.config_hash}
                                                         for s in settings]}, "settings.json")
                jobs = [
                    executors.SettingJob(
                        index=s.index, name=s.name, config=s.config.model_dump(mode="json"),
                        experiment=spec.name, tracking_uri=uri, parent_run_id=parent_id,
                        out_dir=str((study_dir / s.config_hash).resolve()), runner=runner,
                        extra_tags={"study": spec.name, "profile": profile or "none", "image": s.image,
                                    "seed": s.seed, **{f"axis.{k}": v for k, v in s.axes.items()}},
                    )
                    for s in pending
                ]
                total = len(jobs)
                for n, row in enumerate(executors.run_jobs(jobs, plan, client=client,
                                                                           folder=study_dir / "submitit"), start=1):
                    results[row["index"]] = row
                    print(_progress_line(n, total, row), file=out)
            except KeyboardInterrupt:
                outcome.interrupted = True
                raise
            finally:
                _ignore_sigterm()  # closing runs and writing the summary takes seconds: let it finish
                executors.sweep(client, exp_id, parent_id, interrupted=outcome.interrupted)
                _finish(outcome, settings, results, reused, client, study_dir, parent_id, out, figures)
    finally:
        restore()
    _report(outcome, out, json_out)
    return outcome


def check_variants(settings: Sequence[Setting], source: str) -> None:
    """Unknown variant names, variant options and weights specs fail before anything runs.

    Cheap registry checks (nothing is built); ``timm:``/``torchvision:`` names are left to the
    runner. Without this a misspelt variant would surface hours into a study as a FAILED child.
    """
    from variants.base import check_options, lookup
    from variants.weights import check_weights_spec

    seen: set[str] = set()
    for s in settings:
        cfg = s.config
        key = json.dumps([cfg.variant, sorted(cfg.variant_options), cfg.weights])
        if key in seen:
            continue
        seen.add(key)
        try:
            check_weights_spec(cfg.weights)
            if not cfg.variant.startswith(("timm:", "torchvision:")):
                check_options(cfg.variant, lookup(cfg.variant).builder, cfg.variant_options)
        except GistressError as exc:
            raise GistressError(f"setting {s.index + 1} ({s.name}) of {source}: {exc.message}", exc.hint) from None


def _progress_line(n: int, total: int, row: dict) -> str:
    m = row.get("metrics") or {}
    if row["status"] == "FINISHED":
        what = f"psnr {m.get('psnr', float('nan')):.2f} dB"
        if "control_psnr" in m:
            what += f", control {m['control_psnr']:.2f} dB"
    else:
        what = f"{row['status']}: {row.get('error') or 'no detail'}"
    return f"[{n}/{total}] {row['name']}: {what} ({row.get('seconds', 0):.0f} s)"


def _finish(outcome, settings, results, reused, client, study_dir, parent_id, out, figures) -> None:
    """Summary rows for every setting, CSV + figure on disk and on the parent (best effort)."""
    # Children this invocation started but got no row for (interrupted, worker gone): their
    # status as MLflow has it after the sweep.
    started = {}
    if len(results) + len(reused) < len(settings):
        from suite.execution.tracking import child_runs

        try:
            for run in child_runs(client, outcome.experiment_id, parent_id):
                started[run.data.tags.get("config_hash")] = run
        except Exception:
            pass
    rows = []
    for s in settings:
        if s.index in results:
            row = {**results[s.index], "reused": False}
        elif s.index in reused:
            row = _reused_row(client, s, reused[s.index], study_dir)
        elif s.config_hash in started:
            run = started[s.config_hash]
            row = {"index": s.index, "status": run.info.status, "run_id": run.info.run_id, "metrics": {},
                   "artifacts": {}, "error": run.data.tags.get("error"), "reused": False}
        else:
            row = {"index": s.index, "status": "PENDING", "run_id": None, "metrics": {}, "artifacts": {},
                   "error": None, "reused": False}
        # the image column already says which images; the other varying axes get a column each
        row.update(name=s.name, axes={k: _short_value(v) for k, v in s.axes.items() if k != "images"}, seed=s.seed,
                   image=s.image, row_label=s.row_label, config_hash=s.config_hash, variant=s.config.variant)
        rows.append(row)
    outcome.rows = rows
    try:
        outcome.csv_path = figures.write_summary_csv(rows, study_dir / "summary.csv")
        client.log_artifact(parent_id, str(outcome.csv_path))
        from suite.execution.mlflow_ui import save_study_view, summary_table

        # the runs-table view first: it is what `gistress ui` opens, whatever fails after it
        save_study_view(client, outcome.experiment_id, rows, study=outcome.study, profile=outcome.profile)
        table = summary_table(rows)
        if table:  # the same table, rendered as a table on the parent's artifacts page
            client.log_table(parent_id, table, "summary_table.json")
        outcome.figure_path = figures.study_figure(rows, study_dir / "figure.png", title=outcome.study,
                                                   client=client, cache_dir=study_dir / ".artifact-cache")
        if outcome.figure_path is not None:
            from PIL import Image

            with Image.open(outcome.figure_path) as im:
                client.log_image(parent_id, im.convert("RGB"), artifact_file=f"images/{figures.comparison_name(rows)}")
        counts = outcome.counts
        for status, n in counts.items():
            client.set_tag(parent_id, f"n_{status.lower()}", str(n))
        (study_dir / "summary.json").write_text(json.dumps(outcome.to_json(), indent=2, default=str))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the summary must not hide the runs' own outcome
        print(f"warning: study summary incomplete ({type(exc).__name__}: {exc})", file=sys.stderr)


def _reused_row(client, s: Setting, run_id: str, study_dir: Path) -> dict:
    """A summary row from an earlier FINISHED run (metrics from MLflow, images from disk if there)."""
    row = {"index": s.index, "name": s.name, "status": "FINISHED", "run_id": run_id, "error": None,
           "reused": True, "metrics": {}, "artifacts": {}}
    try:
        from suite.execution.tracking import internal_metrics

        run = client.get_run(run_id)
        row["metrics"] = internal_metrics(run.data.metrics)  # MLflow's names back to the suite's keys
    except Exception as exc:
        row["error"] = f"earlier run unreadable: {exc}"
    local = study_dir / s.config_hash
    for name in ("target", "control", "reconstruction", "init"):
        p = local / f"{name}.png"
        if p.is_file():
            row["artifacts"][name] = str(p)
    return row


def format_table(rows: Sequence[dict]) -> str:
    """The printed summary: one row per child with its varying axes, scores and status."""
    from suite.reports.figures import summary_records

    records = summary_records(rows, short_ids=True)
    if not records:
        return "(no settings)"
    cols = list(records[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in records)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{str(r[c]):<{widths[c]}}" for c in cols) for r in records]
    return "\n".join(lines)


def leak_sentence(rows: Sequence[dict]) -> str:
    """Which settings leaked (a sample met the leak rule) and which did not, in words."""
    from suite.reports.figures import summary_records

    done = [(row, rec) for row, rec in zip(rows, summary_records(rows)) if rec["leaked"]]
    if not done:
        return ""

    def label(row: dict, rec: dict) -> str:
        # the setting's run name (what varies), else the variant
        return f"{row.get('name') or rec.get('variant') or row.get('variant', '?')} ({rec['psnr']} dB)"

    leaked = [label(row, rec) for row, rec in done if rec["leaked"] == "yes"]
    held = [label(row, rec) for row, rec in done if rec["leaked"] == "no"]
    parts = [f"leaked: {'; '.join(leaked)}" if leaked else "no setting leaked"]
    if held:
        parts.append(f"did not leak: {'; '.join(held)}")
    return ". ".join(parts) + "."


def _report(outcome: StudyOutcome, out, json_out: bool) -> None:
    print("", file=out)
    print(format_table(outcome.rows), file=out)
    counts = ", ".join(f"{n} {k.lower()}" for k, n in sorted(outcome.counts.items()))
    print(f"\n{outcome.study}: {counts}", file=out)
    words = leak_sentence(outcome.rows)
    if words:
        print(words, file=out)
    if outcome.csv_path:
        print(f"summary: {outcome.csv_path.resolve()}", file=out)
    if outcome.figure_path:
        print(f"figure: {outcome.figure_path.resolve()}", file=out)
    from suite.execution.mlflow_ui import runs_link
    from suite.execution.tracking import is_http, resolve_tracking_uri

    uri, exp_id = outcome.tracking_uri, outcome.experiment_id
    if uri and exp_id and is_http(uri):
        print(f"compare runs: {runs_link(uri, exp_id)}", file=out)
    elif uri and exp_id:
        ui = "gistress ui" if uri == resolve_tracking_uri(None) else f"gistress ui --tracking-uri {uri}"
        print(f"compare runs: `{ui}`, then open {runs_link('http://127.0.0.1:5000', exp_id)}", file=out)
    if json_out:
        print(json.dumps(jsonable(outcome.to_json())), file=out)


