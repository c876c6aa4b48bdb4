"""The convenience flags of ``gistress attack`` and ``gistress audit``: one table, flag -> dotted key.

Every flag here is a shorthand for one run-config key (``--tv 0.1`` is ``--set attack.tv=0.1``).
``FLAGS`` is the only place a flag is described: ``add_flags`` generates the argparse options
from it (``--help`` shows each flag's key and, read from ``RunConfig`` when the help is printed,
its default) and ``flag_overrides`` turns the parsed flags back into dotted keys. ``--set
KEY=VALUE`` (``add_set_flag``) reaches every key and is applied after the flags, so it wins over
them (``overrides``). Types and choices are written in the table, so that building the parser
imports no pydantic (``gistress --help`` stays fast); a test checks them against the config.

Flags that are not run-config keys (``--batch``, ``--out``, ``--json``, ``--level``, ...) stay
with their command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# What a flag does with what it is given:
#   value    FLAG VALUE sets the key to VALUE
#   on       FLAG (no value) sets the bool key to true
#   off      FLAG (no value) sets the bool key to false (--no-labels: threat.shares_labels=false)
#   list     FLAG A,B (repeatable, comma-separated) appends to the list key; flags sharing a key add up
#   options  FLAG K=V (repeatable) sets KEY.K=V in the free-form dict KEY (V read as YAML, like --set)
Kind = Literal["value", "on", "off", "list", "options"]


@dataclass(frozen=True)
class Flag:
    """One convenience flag: its option string, the dotted key it sets, and how it reads its value."""

    flag: str                                   # "--tv"
    key: str                                    # "attack.tv" (options: the free-form dict's key)
    group: str                                  # the --help section
    help: str
    kind: Kind = "value"
    type: Callable[[str], Any] | None = None     # int, float; None: text
    choices: tuple[str, ...] | None = None       # the key's Literal values
    metavar: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        """The argparse attribute: ``--num-classes`` -> ``num_classes``."""
        return self.flag.lstrip("-").replace("-", "_")


DATA_HELP = "samples | cifar10:<root> | imagefolder:<root> | coco:<images>:<annotations.json>"

FLAGS: tuple[Flag, ...] = (
    # model
    Flag("--variant", "variant", "model", "variant name, timm:<name> or torchvision:<name>", required=True),
    Flag("--stem", "variant_options.stem", "model", "ResNet/modern stem", choices=("cifar", "imagenet")),
    Flag("--width", "variant_options.width", "model", "base width (ResNets, convnet)", type=int),
    Flag("--num-classes", "variant_options.num_classes", "model", "classifier classes", type=int),
    Flag("--nc", "variant_options.nc", "model", "YOLO classes", type=int),
    Flag("--opt", "variant_options", "model", "any other variant option, e.g. --opt cut_skips=[0,1] "
         "(the value read as YAML)", kind="options", metavar="KEY=VALUE"),
    Flag("--weights", "weights", "model", "random | calibrated | pretrained | file:<path>"),
    Flag("--trust-checkpoint", "trust_checkpoint", "model",
         "allow full unpickling of the weights file (only for files you trust)", kind="on"),
    # data
    Flag("--data", "data", "data", DATA_HELP),
    Flag("--image", "images", "data", "image name/id (repeat or comma-separate)", kind="list", metavar="NAME"),
    Flag("--image-id", "images", "data", "COCO image id (repeatable)", kind="list", metavar="ID"),
    Flag("--size", "size", "data", "input size in pixels (default: the variant's)", type=int),
    # threat model
    Flag("--bn-mode", "threat.bn_mode", "threat model",
         "the client's BatchNorm: batch (train) or running (eval) statistics", choices=("train", "eval")),
    Flag("--update", "threat.update", "threat model", "what the client sends: one gradient or a FedAvg delta",
         choices=("gradient", "fedavg")),
    Flag("--local-steps", "threat.local_steps", "threat model", "FedAvg local SGD steps", type=int),
    Flag("--local-lr", "threat.local_lr", "threat model", "FedAvg local learning rate", type=float),
    Flag("--local-batch-size", "threat.local_batch_size", "threat model",
         "FedAvg local mini-batch size (default: the whole batch)", type=int),
    Flag("--unknown-training", "threat.attacker_knows_training", "threat model",
         "the server does not know the local hyper-parameters (matches the delta as one step)", kind="off"),
    Flag("--bn-stats", "threat.bn_stats", "threat model", "BN statistics shared with the server",
         choices=("none", "running", "exact")),
    Flag("--no-labels", "threat.shares_labels", "threat model", "labels are not shared (inferred or joint)",
         kind="off"),
    Flag("--defense", "threat.defense", "threat model",
         "qsgd:<bits> | sign | topk:<keep> | clip:<bound> | noise:<sigma>"),
    Flag("--freeze", "threat.frozen", "threat model",
         "parameters the client keeps frozen, out of the update (fnmatch pattern, repeatable)", kind="list",
         metavar="PATTERN"),
    # attack
    Flag("--preset", "attack.preset", "attack",
         "ig | dlg | gia_bn (optimization) | april | linear (closed forms: one solve, no iterations)"),
    Flag("--objective", "attack.objective", "attack", "gradient-matching distance", choices=("cosine", "l2")),
    Flag("--optimizer", "attack.optimizer", "attack", "optimizer of the candidate image",
         choices=("adam", "lbfgs")),
    Flag("--lr", "attack.lr", "attack", "learning rate", type=float),
    Flag("--tv", "attack.tv", "attack", "total-variation prior weight", type=float),
    Flag("--bn-prior", "attack.bn_prior", "attack", "BN-statistics prior weight", type=float),
    Flag("--space", "attack.space", "attack",
         "optimize the candidate in the variant's normalized space or in [0, 1] pixels",
         choices=("normalized", "pixel")),
    Flag("--keep", "attack.keep", "attack", "return the lowest-objective iterate or the final one",
         choices=("best", "last")),
    Flag("--iterations", "attack.iterations", "attack", "optimizer steps", type=int),
    Flag("--restarts", "attack.restarts", "attack", "independent restarts; the lowest matching loss wins",
         type=int),
    Flag("--restart-mode", "attack.restart_mode", "attack",
         "auto: batched (one vmapped pass) on CUDA where supported, else sequential",
         choices=("auto", "batched", "sequential")),
    Flag("--init", "attack.init", "attack", "the start image (closed_form: the closed-form estimate read off "
         "the update)", choices=("random", "noisy_target", "file", "closed_form")),
    Flag("--noise-p", "attack.noise_p", "attack", "init noisy_target: fraction of pixels replaced", type=float),
    Flag("--noise-sigma", "attack.noise_sigma", "attack", "init noisy_target: additive Gaussian sigma",
         type=float),
    Flag("--init-file", "attack.init_file", "attack", "init file: the start image"),
    Flag("--labels", "attack.labels", "attack", "labels not shared: inferred (auto) or optimized jointly",
         choices=("auto", "joint")),
    Flag("--control", "attack.control", "attack", "also run the prior-only control", kind="on"),
    Flag("--log-every", "attack.log_every", "attack",
         "log step metrics every N steps (default: about 50 points per run)", type=int),
    # run
    Flag("--seed", "seed", "run", "seed of weights, data order and the attack's start", type=int),
    Flag("--device", "device", "run", "auto | cpu | cuda[:N]"),
)

SET_HELP = ("set any run-config key, e.g. --set attack.tv=0.1 or --set threat.defense=qsgd:8 (repeatable; "
            "the value is read as YAML; keys as in a study spec). Applied after the flags, so --set wins "
            "over the flag for the same key; the key each flag sets is shown in [brackets]")


def flags(*names: str) -> tuple[Flag, ...]:
    """The table entries named by their option strings (``flags("--seed", "--device")``), in table order."""
    unknown = set(names) - {f.flag for f in FLAGS}
    if unknown:
        raise KeyError(f"no flag {sorted(unknown)} in suite.cli.flags.FLAGS")
    return tuple(f for f in FLAGS if f.flag in names)


def field_of(key: str):
    """The pydantic field (``FieldInfo``) of a dotted run-config key; None inside a free-form dict."""
    from pydantic import BaseModel

    from suite.config import RunConfig

    model: type[BaseModel] | None = RunConfig
    info = None
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        ann = info.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return info


def default_text(flag: Flag) -> str:
    """``; default: 300`` read from the key's field; ``the preset's`` for fields a preset fills."""
    from pydantic_core import PydanticUndefined

    from suite.config import PRESETS

    if flag.kind != "value" or flag.required:
        return ""
    head, _, name = flag.key.rpartition(".")
    if head == "attack" and name in PRESETS["ig"]:
        return "; default: the preset's"
    info = field_of(flag.key)
    if info is None or info.default is None or info.default is PydanticUndefined:
        return ""
    default = str(info.default).lower() if isinstance(info.default, bool) else info.default
    return f"; default: {default}"


def help_text(flag: Flag, override: str | None = None, *, defaults: bool = False) -> str:
    """The --help line: what the flag means, then the key it sets in brackets (with its default
    when ``defaults``: this reads the config, so the parser is built without it)."""
    text = override or flag.help
    if flag.kind == "on":
        key = f"{flag.key}=true"
    elif flag.kind == "off":
        key = f"{flag.key}=false"
    elif flag.kind == "options":
        key = f"{flag.key}.KEY=VALUE"
    else:
        key = flag.key + (default_text(flag) if defaults and not override else "")
    return f"{text} [{key}]".replace("%", "%%")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, adding each table flag's default (from ``RunConfig``) when --help prints."""

    def _get_help_string(self, action):
        entry = getattr(action, "gistress_flag", None)
        if entry is None:
            return super()._get_help_string(action)
        return help_text(*entry, defaults=True)


def add_flags(parser: argparse.ArgumentParser, entries: Iterable[Flag], *,
              helps: dict[str, str] | None = None) -> dict[str, Any]:
    """Add the entries' options to ``parser``, one argument group per table group (created once).

    ``helps`` replaces the help of a flag for this command (audit's --iterations means every
    level's). Every option defaults to "not given", so only flags on the command line become
    overrides; the run config's defaults fill the rest. Create the parser with
    ``formatter_class=HelpFormatter`` for the defaults in --help. Returns the groups by name.
    """
    groups: dict[str, Any] = {}
    for f in entries:
        if f.group not in groups:
            groups[f.group] = parser.add_argument_group(f.group)
        override = (helps or {}).get(f.flag)
        kwargs: dict[str, Any] = dict(dest=f.dest, help=help_text(f, override))
        if f.kind in ("on", "off"):
            kwargs.update(action="store_true", default=False)
        elif f.kind in ("list", "options"):
            kwargs.update(action="append", default=[], metavar=f.metavar)
        else:
            kwargs.update(default=None, type=f.type, choices=f.choices, required=f.required, metavar=f.metavar)
        action = groups[f.group].add_argument(f.flag, **{k: v for k, v in kwargs.items() if v is not None})
        action.gistress_flag = (f, override)
    return groups


def add_set_flag(parser, help: str = SET_HELP) -> None:
    """The ``--set KEY=VALUE`` option (repeatable; ``args.sets``)."""
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help)


def flag_overrides(args: argparse.Namespace, entries: Iterable[Flag]) -> dict[str, Any]:
    """The dotted keys the given flags set, in table order (flags left out set nothing)."""
    from suite.keys import parse_assignment

    out: dict[str, Any] = {}
    for f in entries:
        given = getattr(args, f.dest, None)
        if f.kind == "value" and given is not None:
            out[f.key] = given
        elif f.kind in ("on", "off") and given:
            out[f.key] = f.kind == "on"
        elif f.kind == "list":
            items = [s.strip() for item in given or () for s in str(item).split(",") if s.strip()]
            if items:
                out[f.key] = [*out.get(f.key, []), *items]
        elif f.kind == "options":
            for item in given or ():
                name, value = parse_assignment(item, flag=f.flag, example="cut_skips=[0,1]")
                out[f"{f.key}.{name}"] = value
    return out


def overrides(args: argparse.Namespace, entries: Sequence[Flag], *, where: str = "--set") -> dict[str, Any]:
    """The run-config overrides of a command line, nested: the flags, then ``--set`` on top.

    ``--set`` keys are checked (a misspelt one names the nearest valid key); ``images`` takes one
    name or a list, numbers being COCO ids.
    """
    from suite.keys import deep_merge, image_ids, nest, parse_assignments

    sets = parse_assignments(getattr(args, "sets", None), where=where)
    merged = deep_merge(nest(flag_overrides(args, entries)), nest(sets))
    if "images" in merged:
        value = merged["images"]
        merged["images"] = image_ids(value if isinstance(value, list) else [value])
    return merged


def run_config(fields: dict, command: str):
    """``RunConfig(**fields)``; a validation error becomes one line pointing at the command's --help."""
    from pydantic import ValidationError

    from suite.config import RunConfig, first_error
    from suite.errors import GistressError

    try:
        return RunConfig(**fields)
    except ValidationError as exc:
        raise GistressError(first_error(exc), f"see `{command} --help`") from None
