"""Study specs: the YAML schema (``StudySpec``) and its validation, every error naming file and line.

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
    compare: {axis: variant_options, baseline: {}}   # ablations: pair each change with the
                                                    # unmodified setting (suite.studies.compare);
                                                    # also_against: [v, ...] adds a table per value
    sweep: {axes: [attack.tv, attack.lr]}           # tuning: the server's and the oracle's pick
                                                    # per group (suite.studies.sweep)
    executor: {slurm_partition: gpu, gpus_per_node: 1, timeout_min: 600, slurm_array_parallelism: 8}

In a profile (and in ``--set``), ``seeds``/``images``/``grid``/``zip`` are study-level keys
(``STUDY_KEYS``); every other key overrides the RunConfig. A profile's ``zip`` over grid axes
steps them together (``fig5_yolo``'s ``cpu`` profile runs 4 chosen pairs of its 4 x 2 grid).
How a spec becomes settings: ``suite.studies.expand``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from suite.errors import GistressError, close_matches
from suite.keys import check_key, check_keys, image_ids

STUDY_KEYS = ("seeds", "images", "grid", "zip")  # keys of a profile / --set that are not RunConfig's


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


class CompareBlock(BaseModel):
    """An ablation's comparison: the axis whose values are the changes, and the unmodified value."""

    model_config = ConfigDict(extra="forbid")

    axis: str
    baseline: Any = None
    # further baselines, each its own paired table (e.g. "cutting deeper vs cutting the first stage")
    also_against: list[Any] = Field(default_factory=list)


class SweepBlock(BaseModel):
    """Hyper-parameter axes an attacker tunes: the study reports the server's and the oracle's pick."""

    model_config = ConfigDict(extra="forbid")

    axes: list[str] = Field(min_length=1)


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
    compare: CompareBlock | None = None
    sweep: SweepBlock | None = None

    _source: str = PrivateAttr("<spec>")  # where it was read from, for messages

    @property
    def source(self) -> str:
        """The file the spec came from (for messages)."""
        return self._source

    @field_validator("images", mode="before")
    @classmethod
    def _ids_as_text(cls, value):
        return image_ids(value)

    def axes(self) -> dict[str, list[Any]]:
        """Every grid and zip axis with its values."""
        return {**self.grid, **{k: v for g in self.zip_groups() for k, v in g.items()}}

    def zip_groups(self) -> list[dict[str, list[Any]]]:
        """The zip groups as a list (a single mapping is one group)."""
        if self.zip is None:
            return []
        return [self.zip] if isinstance(self.zip, dict) else list(self.zip)


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
        parent = StudySpec if len(loc) == 1 else {"executor": ExecutorBlock, "compare": CompareBlock,
                                                        "sweep": SweepBlock}.get(loc[0])
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
    return GistressError(f"{where}: {dotted}: {msg}{got_s}", "see the layout in suite/studies/spec.py or runs/quickstart.yaml")


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
        check_zip(group, where(*loc))
    if spec.seeds is not None and not spec.seeds:
        raise GistressError(f"seeds in {where('seeds')} is empty", "give at least one seed, e.g. seeds: [0]")
    if spec.images is not None and not spec.images:
        raise GistressError(f"images in {where('images')} is empty", "give at least one image name")
    for pname, prof in spec.profiles.items():
        _check_profile(spec, pname, prof, where("profiles", pname))
    if spec.compare is not None:
        _check_compare(spec, where("compare"))
    if spec.sweep is not None:
        axes = spec.axes()
        for axis in spec.sweep.axes:
            if axis not in axes:
                raise _unknown_axis(f"sweep axis '{axis}' in {where('sweep')} is not an axis of the spec", axis,
                                    axes, "none (add a grid)")


def _check_compare(spec: StudySpec, where: str) -> None:
    """The compared axis must be one of the spec's axes, and the baseline and every ``also_against``
    value among its values; further baselines must differ from the baseline and from each other,
    down to their file names (``comparison_vs_<value>``)."""
    from suite.studies.compare import file_stem

    axes = spec.axes()
    axis, baseline = spec.compare.axis, spec.compare.baseline
    if axis not in axes:
        raise _unknown_axis(f"compare.axis '{axis}' in {where} is not an axis of the spec", axis, axes,
                            "none (add a grid or zip)")
    for key, value in [("baseline", baseline)] + [("also_against", v) for v in spec.compare.also_against]:
        if value not in axes[axis]:
            raise GistressError(f"compare.{key} {value!r} in {where} is not one of {axis}'s values",
                                f"use one of: {', '.join(repr(v) for v in axes[axis])}")
    stems: dict[str, Any] = {}
    for value in spec.compare.also_against:
        if value == baseline:
            raise GistressError(f"compare.also_against {value!r} in {where} is the baseline itself",
                                "list only the other values to pair against")
        stem = file_stem(value)
        if stem in stems:
            raise GistressError(f"compare.also_against {value!r} in {where} repeats {stems[stem]!r} "
                                f"(both would write {stem}.csv)", "list each value once")
        stems[stem] = value


def _unknown_axis(message: str, axis: str, axes, none: str) -> GistressError:
    """``message`` plus the nearest axis name, with the spec's axes as the hint (``none`` if it has none)."""
    near = close_matches(axis, sorted(axes), n=1)
    return GistressError(message + (f" (did you mean '{near}'?)" if near else ""),
                         f"axes: {', '.join(sorted(axes)) or none}")


def zips_grid_axes(grid: dict[str, list], profile_zip: dict[str, list]) -> bool:
    """True when a profile's ``zip`` names only grid axes: they then step together, not crossed."""
    return bool(profile_zip) and all(axis in grid for axis in profile_zip)


def check_zip(group: dict[str, list], where: str) -> None:
    """Zipped axes step together: refuse unequal or empty value lists, naming ``where``."""
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
    axes = spec.axes()
    for key in ("grid", "zip"):
        sub = prof.get(key)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise GistressError(f"profile '{pname}' {key} in {where} must map axes to lists",
                                "write e.g. grid: {attack.noise_p: [0.8, 1.0]}")
        for axis, values in sub.items():
            if axis not in axes:
                raise _unknown_axis(f"profile '{pname}' in {where} overrides axis '{axis}', which the spec "
                                    "does not have", axis, axes, "none")
            if not isinstance(values, list) or not values:
                raise GistressError(f"profile '{pname}' axis '{axis}' in {where} must be a non-empty list",
                                    "write e.g. [0.8, 1.0]")
    zipped = prof.get("zip") or {}
    in_grid = [axis for axis in zipped if axis in spec.grid]
    if in_grid and not zips_grid_axes(spec.grid, zipped):
        raise GistressError(
            f"profile '{pname}' zip in {where} mixes grid axes ({', '.join(in_grid)}) with zip axes",
            "a profile's zip either steps grid axes together or replaces one zip group's values",
        )
    if in_grid:
        check_zip(zipped, f"{where} (profile '{pname}' zip)")
    for key in ("seeds", "images"):
        if key in prof and (not isinstance(prof[key], list) or not prof[key]):
            raise GistressError(f"profile '{pname}' {key} in {where} must be a non-empty list",
                                f"write e.g. {key}: {[0] if key == 'seeds' else ['astronaut']}")
