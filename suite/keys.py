"""The run config's dotted keys (``attack.tv``, ``threat.bn_mode``): the one configuration vocabulary.

``gistress study``, ``attack`` and ``audit`` all take ``--set key=value``; YAML specs use the same
keys nested. Every key is checked against ``RunConfig`` and a misspelt one names the nearest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from suite.config import RETIRED_KEYS, RunConfig
from suite.errors import GistressError, close_matches


def key_tree(model: type[BaseModel]) -> dict[str, Any]:
    """Valid nested keys of a pydantic model: name -> subtree, None (leaf) or "open" (a dict)."""
    tree: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            tree[name] = key_tree(ann)
        elif ann is dict or getattr(ann, "__origin__", None) is dict:
            tree[name] = "open"
        else:
            tree[name] = None
    return tree


RUN_KEYS = key_tree(RunConfig)


def all_dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Every dotted key of a key tree, parents before their children."""
    out = []
    for k, sub in tree.items():
        out.append(prefix + k)
        if isinstance(sub, dict):
            out.extend(all_dotted(sub, prefix + k + "."))
    return out


def check_key(dotted: str, where: str, *, extra: Sequence[str] = ()) -> None:
    """Raise a GistressError naming the nearest valid key when ``dotted`` is not a RunConfig key."""
    if dotted in extra:
        return
    if dotted in RETIRED_KEYS:
        raise GistressError(RETIRED_KEYS[dotted], f"remove {dotted} from {where}")
    node: Any = RUN_KEYS
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if node == "open":
            return  # free-form dict (variant_options, attack.layer_weights)
        if not isinstance(node, dict) or part not in node:
            prefix = ".".join(parts[:i])
            candidates = [prefix + "." + k if prefix else k for k in node] if isinstance(node, dict) else []
            candidates += [k for k in all_dotted(RUN_KEYS) if k not in candidates] + list(extra)
            near = close_matches(dotted, candidates, n=1)
            hint = f"did you mean '{near}'?" if near else None
            if isinstance(node, dict):
                valid = ", ".join(candidates[: len(node)])
            else:
                valid = f"'{prefix}' takes a single value"
            raise GistressError(
                f"unknown key '{dotted}' in {where}" + (f" ({hint})" if hint else ""),
                f"valid keys here: {valid}",
            )
        node = node[part]


def check_keys(mapping: dict, where: str, *, prefix: str = "", extra: Sequence[str] = ()) -> None:
    """Check every key of a (nested, possibly dotted) partial RunConfig."""
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise GistressError(f"key {key!r} in {where} is not a string", "quote it in the YAML")
        dotted = prefix + key
        check_key(dotted, where, extra=extra if not prefix else ())
        if isinstance(value, dict) and dotted not in extra and subtree(dotted) not in ("open", None):
            check_keys(value, where, prefix=dotted + ".")


def subtree(dotted: str):
    """The key tree under a valid dotted key: a dict, "open" (a free-form dict) or None (a leaf)."""
    node: Any = RUN_KEYS
    for part in dotted.split("."):
        if node == "open":
            return "open"
        node = node[part]
    return node


def nest(mapping: dict) -> dict:
    """Dotted keys -> nested dicts (``{'attack.tv': 0}`` -> ``{'attack': {'tv': 0}}``)."""
    out: dict = {}
    for key, value in mapping.items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        leaf = parts[-1]
        if isinstance(value, dict):
            value = nest(value)
            if isinstance(node.get(leaf), dict):
                value = deep_merge(node[leaf], value)
        node[leaf] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """A new dict: ``over`` merged into ``base`` (dicts recursively, everything else replaced)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def image_ids(value):
    """COCO image ids written as numbers (``images: [139, 285]``) are names too."""
    if isinstance(value, list):
        return [image_ids(v) for v in value]
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def parse_value(raw: str) -> Any:
    """A ``--set`` value, read as YAML: ``50`` is an int, ``[0,1]`` a list, ``{stem: cifar}`` a dict,
    ``null`` None and ``none`` the string 'none'. An empty value is ``''``; text YAML cannot parse
    (a path with odd characters) is taken literally."""
    import yaml

    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def parse_assignment(item: str, *, flag: str = "--set", example: str = "attack.iterations=50") -> tuple[str, Any]:
    """Split one ``key=value`` at the first ``=`` and parse the value (the key is not checked)."""
    if "=" not in item:
        raise GistressError(f"{flag} '{item}' is not key=value", f"write e.g. {flag} {example}")
    key, raw = item.split("=", 1)
    return key.strip(), parse_value(raw)


def parse_assignments(items: Iterable[str] | None, *, where: str = "--set",
                      extra: Sequence[str] = ()) -> dict[str, Any]:
    """``--set key=value`` items -> ``{dotted key: value}``, shared by ``study``, ``attack`` and ``audit``.

    Every key must be a run-config key or one of ``extra`` (the error names the nearest valid
    key). A key given twice keeps its last value, and the dict keeps the order the items were
    last given in, so ``nest`` applies them in that order (later wins).
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, value = parse_assignment(item, flag=where)
        check_key(key, where, extra=extra)
        out.pop(key, None)
        out[key] = value
    return out


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested run-config overrides -> dotted leaves (``{'attack': {'tv': 0}}`` -> ``{'attack.tv': 0}``).

    Free-form dicts (``variant_options``, ``attack.layer_weights``) stay whole values.
    """
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = prefix + key
        if isinstance(value, dict) and isinstance(_subtree_or_none(dotted), dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _subtree_or_none(dotted: str):
    try:
        return subtree(dotted)
    except (KeyError, TypeError):
        return None
