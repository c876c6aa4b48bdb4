"""Where a variant's weights come from: random, calibrated BN statistics, pretrained, or a file.

Pretrained weights are read only from the libraries' own caches (torchvision: the torch hub
checkpoint folder; timm: the Hugging Face cache). The suite never downloads: a miss is a
GistressError naming the exact place the file must be, raised before any library gets a chance
to try the network.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

import torch
from torch import nn

from suite.errors import GistressError, close_matches
from suite.model.batchnorm import modes_restored, named_bn_layers
from variants.base import Normalized, Variant, parse_variant_name
from variants.checkpoint import read_checkpoint

WEIGHT_KINDS = ("random", "calibrated", "pretrained")
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict")


def check_weights_spec(spec) -> str:
    """Validate a weights spec: ``random``, ``calibrated``, ``pretrained`` or ``file:<path>``."""
    if isinstance(spec, str) and (spec in WEIGHT_KINDS or (spec.startswith("file:") and spec[5:].strip())):
        return spec
    near = close_matches(str(spec), WEIGHT_KINDS)
    extra = f"did you mean '{near}'? " if near else ""
    raise GistressError(
        f"unknown weights '{spec}'",
        f"{extra}use one of random, calibrated, pretrained, file:<path to a checkpoint>",
    )


# ---------------------------------------------------------------- pretrained


def _net(variant: Variant) -> nn.Module:
    """The network inside the [0, 1] wrapper (or the model itself if it is not wrapped)."""
    return variant.model.net if isinstance(variant.model, Normalized) else variant.model


def torchvision_checkpoint(model_name: str):
    """(weights enum, expected cache path) of torchvision's default weights for ``model_name``.

    Raises a GistressError if torchvision publishes no weights for the model or the file is not
    in ``$TORCH_HOME/hub/checkpoints``; checked here because torchvision would start a download.
    """
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(model_name).DEFAULT
    except (ValueError, AttributeError, KeyError):
        raise GistressError(
            f"torchvision publishes no pretrained weights for '{model_name}'",
            "use weights=random or weights=file:<path>",
        ) from None
    filename = os.path.basename(urlparse(weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if not os.path.isfile(path):
        raise GistressError(
            f"pretrained weights for torchvision:{model_name} are not in the local cache: {path} "
            "(nothing is downloaded)",
            f"download {weights.url} where there is network and place it at {path} "
            "(TORCH_HOME sets the cache root), or use weights=file:<path>",
        )
    return weights, path


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hf_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def _load_timm(net: nn.Module, ident: str, num_classes: int) -> None:
    """Load timm weights ``arch[.tag]`` into ``net`` from the caches, failing fast on a miss."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from timm.models import load_pretrained as timm_load_pretrained
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, hf_split

    try:
        cfg = get_pretrained_cfg(ident)
    except RuntimeError as exc:
        raise GistressError(f"timm:{ident}: {exc}", "check the pretrained tag (timm.list_pretrained())") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise GistressError(f"timm publishes no pretrained weights for '{ident}'", "use weights=random")
    cache_dir = None
    if cfg.hf_hub_id:
        cache_dir = hf_cache_dir()
        repo, revision = hf_split(cfg.hf_hub_id)
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        cached = [try_to_load_from_cache(repo, f, cache_dir=cache_dir, revision=revision) for f in files]
        if not any(isinstance(c, str) for c in cached) and _hf_offline():
            raise GistressError(
                f"pretrained weights for timm:{ident} (Hugging Face repo {repo}) are not in the "
                f"Hugging Face cache {cache_dir} and HF_HUB_OFFLINE is set",
                f"where there is network run `hf download {repo} --cache-dir {cache_dir}` "
                "and copy that folder here, or use weights=file:<path>",
            )
    elif cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if not os.path.isfile(path):
            raise GistressError(
                f"pretrained weights for timm:{ident} are not in the local cache: {path}",
                f"download {cfg.url} where there is network and place it at {path}",
            )
    try:
        timm_load_pretrained(net, pretrained_cfg=cfg.to_dict(), num_classes=num_classes, cache_dir=cache_dir)
    except Exception as exc:  # a library failure after the cache check: report it, never go on random
        raise GistressError(
            f"could not load pretrained weights timm:{ident}: {type(exc).__name__}: {exc}",
            f"check the cached files under {cache_dir or torch.hub.get_dir()}",
        ) from None


def _load_torchvision(variant: Variant, model_name: str) -> None:
    _, path = torchvision_checkpoint(model_name)
    state = read_checkpoint(path)  # a library's own published weights: tensors only
    _load_state(variant, state, source=path, new_head_ok=True)


def load_pretrained(variant: Variant) -> Variant:
    """Load the variant's published weights from the local caches (see module notes).

    Uses ``variant.options["pretrained_source"]`` (``torchvision:<model>`` or
    ``timm:<arch>[.<tag>]``); None means no weights exist for that configuration. With a class
    count other than the published one, the classifier stays randomly initialized.
    """
    source = variant.options.get("pretrained_source")
    if variant.task == "detection" and source is not None:
        from variants import yolo

        loader = getattr(yolo, "load_pretrained", None)
        if loader is None:
            raise GistressError(
                f"no pretrained loader for detection variant '{variant.name}'",
                "use weights=file:<path to an ultralytics checkpoint>",
            )
        loader(variant)
        variant.weights = "pretrained"
        return variant
    if not source:
        shown = {k: v for k, v in variant.options.items() if k != "pretrained_source"}
        raise GistressError(
            f"no pretrained weights exist for {variant.name} with {shown or 'its defaults'}",
            "use weights=random or weights=calibrated, or weights=file:<path> for your own checkpoint",
        )
    library, ident = parse_variant_name(source)  # a pretrained source is spelt like an external variant
    if library == "torchvision":
        _load_torchvision(variant, ident)
    elif library == "timm":
        _load_timm(_net(variant), ident, variant.num_classes)
    else:
        raise GistressError(f"unknown pretrained source '{source}'", "use torchvision:<model> or timm:<model>")
    variant.weights = "pretrained"
    return variant


# ---------------------------------------------------------------- checkpoint files


def _extract_state(obj, path: str) -> dict:
    """A state_dict from a raw state_dict, a wrapper dict or (trusted) a whole module."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPER_KEYS:
            if key in obj and obj[key] is not None:
                return _extract_state(obj[key], path)
        keys = ", ".join(list(map(str, obj))[:6])
        raise GistressError(
            f"no state_dict found in {path} (top-level keys: {keys})",
            f"save a state_dict, or a dict with one of {', '.join(_WRAPPER_KEYS)}",
        )
    raise GistressError(
        f"{path} holds a {type(obj).__name__}, not a state_dict or model",
        "save model.state_dict() with torch.save",
    )


def _strip(state: dict) -> dict:
    """Remove the DataParallel ``module.`` and our wrapper's ``net.`` prefixes and its mean/std."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in ("mean", "std"):
            continue  # the variant defines its normalization; a checkpoint does not override it
        out[key.removeprefix("net.")] = value
    return out


def _examples(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _load_state(variant: Variant, state: dict, source: str, new_head_ok: bool = False) -> None:
    """Check ``state`` against the variant's network, then load it (every key accounted for).

    ``new_head_ok`` (pretrained loading) keeps the variant's own classifier when only the class
    count differs; otherwise that case is its own error naming the class counts.
    """
    net = _net(variant)
    own = net.state_dict()
    state = _strip(state)
    # num_batches_tracked is missing in some older checkpoints and carries no weights
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {_examples(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {_examples(unexpected)})")
        raise GistressError(
            f"checkpoint {source} is for another architecture than {variant.name}: keys "
            + "; ".join(parts),
            f"check the variant and its options ({variant.options})",
        )
    shape_diff = {k: (tuple(state[k].shape), tuple(own[k].shape)) for k in own if k in state
                  and tuple(state[k].shape) != tuple(own[k].shape)}
    if shape_diff:
        ckpt_rows = {c[0] for c, o in shape_diff.values() if c}
        is_head = (
            variant.task == "classification"
            and len(ckpt_rows) == 1
            and all(c and o and o[0] == variant.num_classes and c[1:] == o[1:] for c, o in shape_diff.values())
        )
        if is_head and new_head_ok:
            for k in shape_diff:
                state[k] = own[k]
        elif is_head:
            n = ckpt_rows.pop()
            raise GistressError(
                f"checkpoint has {n} classes, variant has {variant.num_classes}",
                f"pass num_classes={n}",
            )
        else:
            shown = "; ".join(f"{k} {c} vs {o}" for k, (c, o) in list(shape_diff.items())[:3])
            raise GistressError(
                f"checkpoint {source} is for another architecture than {variant.name}: shapes differ ({shown})",
                f"check the variant and its options ({variant.options})",
            )
    net.load_state_dict(state, strict=False)


def load_file(variant: Variant, path: str, trust_checkpoint: bool = False) -> Variant:
    """Load weights from a checkpoint file into ``variant`` (in place) and return it.

    The file may hold a state_dict (with or without the ``net.`` prefix of the [0, 1] wrapper),
    a dict with ``state_dict`` / ``model`` / ``model_state``, or, with ``trust_checkpoint``, a
    pickled module; it is read by ``variants.checkpoint.read_checkpoint`` (``weights_only=True``
    unless trusted). Detection variants load through ``variants.yolo.load_checkpoint``.
    """
    path = os.path.expanduser(str(path))
    if variant.task == "detection":
        from variants import yolo

        yolo.load_checkpoint(variant, path, trust_checkpoint)
        variant.weights = f"file:{path}"
        return variant
    obj = read_checkpoint(path, trust_checkpoint)
    _load_state(variant, _extract_state(obj, path), source=path)
    variant.weights = f"file:{path}"
    return variant


# ---------------------------------------------------------------- BN calibration


def _augment(images: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random-resized-crop + flip views of ``images`` (cycled), at the original size."""
    import torch.nn.functional as F

    _, _, h, w = images.shape
    views = []
    for i in range(n):
        img = images[i % len(images)]
        u = torch.rand(4, generator=gen).tolist()
        scale = 0.35 + 0.65 * u[0]
        ratio = (3 / 4) * (16 / 9) ** u[1]  # log-uniform in [3/4, 4/3]
        ch = max(1, min(h, round((scale * h * w / ratio) ** 0.5)))
        cw = max(1, min(w, round((scale * h * w * ratio) ** 0.5)))
        top = int(u[2] * (h - ch + 1))
        left = int(u[3] * (w - cw + 1))
        crop = img[:, top : top + ch, left : left + cw].unsqueeze(0)
        crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        views.append(crop)
    return torch.cat(views).clamp(0, 1)


def calibrate_bn(
    variant: Variant, images: torch.Tensor, batches: int = 4, seed: int = 0, views: int | None = None
) -> Variant:
    """Estimate every BatchNorm's running statistics on ``images`` (B, 3, H, W in [0, 1]).

    Freshly initialized running stats (0 / 1) make eval-mode gradients nearly input-independent;
    this replaces them with cumulative averages over ``batches`` train-mode forward passes of
    augmented views (``views`` per batch, default max(B, 8), so one image still works). Each
    module's training flag and each BN's momentum are restored afterwards. Models without BN are
    left unchanged. Sets ``variant.weights = "calibrated"`` and returns the variant.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise GistressError(f"calibration images must be (B, 3, H, W), got {shape}", "pass a Batch's images")
    if not images.is_floating_point() or images.numel() == 0:
        raise GistressError("calibration images must be a non-empty float tensor in [0, 1]", "pass batch.images")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise GistressError(f"calibration batches={batches!r} must be a positive integer", "use e.g. 4")
    model = variant.model
    bns = [m for _, m in named_bn_layers(model) if m.track_running_stats]
    if bns:
        param = next(model.parameters(), None)
        device = param.device if param is not None else images.device
        n = views or max(len(images), 8)
        momenta = [m.momentum for m in bns]
        gen = torch.Generator().manual_seed(seed)
        with modes_restored(model):
            try:
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative moving average over all calibration batches
                model.train()
                # fork the RNG so dropout during calibration neither depends on nor moves global state
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    for _ in range(batches):
                        model(_augment(images.detach().float().cpu(), n, gen).to(device))
            finally:
                for m, mom in zip(bns, momenta):
                    m.momentum = mom
    variant.weights = "calibrated"
    return variant
