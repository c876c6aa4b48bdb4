"""Post-processing defenses: what the client does to its update before it leaves the device.

A defense is named by a spec string (``ThreatModel.defense``)::

    none | qsgd:<bits> | sign | topk:<keep fraction> | clip:<bound> | noise:<sigma>

``apply_defense(update, spec)`` returns new tensors with the shapes and dtypes of ``update``.
The semantics, and the source each one follows, are documented on ``apply_defense``. The SoK
(Du et al., *SoK: On Gradient Leakage in Federated Learning*, Appx. C iii) evaluates all five
families; ``SOK_GRIDS`` restates its parameter grids in this module's parameterization.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from suite.errors import GistressError, close_matches

KINDS = ("none", "qsgd", "sign", "topk", "clip", "noise")
_SPEC_HELP = "use none, qsgd:<bits>, sign, topk:<keep fraction>, clip:<bound> or noise:<sigma>"

# QSGD with more bits than this is float32 rounding noise, not quantization.
MAX_QSGD_BITS = 16

# SoK Appx. C iii sparsification proportions. The text reads "selecting proportion p greatest
# absolute values as significant elements", which on its face is the KEPT share; this project
# reads p as the PRUNED share (keeping 60-95 % of a gradient hardly perturbs it, and the
# pruning defenses the SoK builds on, DLG and ROG, are parameterized by the pruned share). Our
# ``topk`` parameter is the kept fraction, so the grid below is 1 - p. See the lead's report.
SOK_TOPK_PRUNED = (0.6, 0.7, 0.8, 0.9, 0.95)

# SoK Appx. C iii grids as ready-to-use ``ThreatModel.defense`` strings, per model family.
# Quantization: QSGD with 1-4 bits plus SignSGD. Sparsification: kept = 1 - pruned (see above).
# Clipping: flat-clipping bounds. Perturbation: Gaussian sigmas (see ``apply_defense``).
SOK_GRIDS: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet18": {
        "quantization": ("qsgd:1", "qsgd:2", "qsgd:3", "qsgd:4", "sign"),
        "sparsification": ("topk:0.4", "topk:0.3", "topk:0.2", "topk:0.1", "topk:0.05"),
        "clipping": ("clip:0.5", "clip:0.3", "clip:0.1", "clip:0.05", "clip:0.01"),
        "perturbation": ("noise:0.05", "noise:0.1", "noise:0.15", "noise:0.2", "noise:0.25"),
    },
    "swin": {
        "quantization": ("qsgd:1", "qsgd:2", "qsgd:3", "qsgd:4", "sign"),
        "sparsification": ("topk:0.4", "topk:0.3", "topk:0.2", "topk:0.1", "topk:0.05"),
        "clipping": ("clip:1", "clip:0.7", "clip:0.5", "clip:0.3", "clip:0.1"),
        "perturbation": ("noise:0.005", "noise:0.007", "noise:0.01", "noise:0.03", "noise:0.05"),
    },
}


def _number(kind: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GistressError(
            f"defense '{spec}': '{text}' is not a number", f"write e.g. {kind}:0.1"
        ) from None
    if not math.isfinite(value):
        raise GistressError(f"defense '{spec}': the parameter must be finite", f"write e.g. {kind}:0.1")
    return value


def parse_defense(spec: str) -> tuple[str, float | int | None]:
    """Split a defense spec into ``(kind, param)`` and check the parameter's range.

    ``none`` and ``sign`` take no parameter (``param`` is None); ``qsgd`` takes an integer bit
    count in [1, 16]; ``topk`` a kept fraction in (0, 1]; ``clip`` a bound > 0; ``noise`` a
    sigma >= 0. Anything else raises ``GistressError``.
    """
    if not isinstance(spec, str):
        raise GistressError(f"defense spec must be a string, got {type(spec).__name__}", _SPEC_HELP)
    kind, sep, text = spec.strip().partition(":")
    if kind not in KINDS:
        near = close_matches(kind, KINDS)
        raise GistressError(
            f"unknown defense '{spec}'" + (f"; did you mean {near}?" if near else ""), _SPEC_HELP
        )
    if kind in ("none", "sign"):
        if sep:
            raise GistressError(f"defense '{kind}' takes no parameter, got '{spec}'", f"write '{kind}'")
        return kind, None
    if not sep or not text.strip():
        raise GistressError(f"defense '{kind}' needs a parameter", _SPEC_HELP)
    text = text.strip()
    if kind == "qsgd":
        try:
            bits = int(text)
        except ValueError:
            raise GistressError(
                f"defense '{spec}': the bit count must be an integer", "write e.g. qsgd:2"
            ) from None
        if not 1 <= bits <= MAX_QSGD_BITS:
            raise GistressError(
                f"defense '{spec}': bits must be in [1, {MAX_QSGD_BITS}]", "the SoK grid uses qsgd:1 .. qsgd:4"
            )
        return kind, bits
    value = _number(kind, text, spec)
    if kind == "topk" and not 0.0 < value <= 1.0:
        raise GistressError(
            f"defense '{spec}': the kept fraction must be in (0, 1]",
            "topk takes the share of entries KEPT, e.g. topk:0.1 keeps the largest 10 %",
        )
    if kind == "clip" and value <= 0.0:
        raise GistressError(f"defense '{spec}': the clipping bound must be > 0", "write e.g. clip:0.1")
    if kind == "noise" and value < 0.0:
        raise GistressError(f"defense '{spec}': sigma must be >= 0", "write e.g. noise:0.01")
    return kind, value


def _check_update(update) -> list[torch.Tensor]:
    if isinstance(update, torch.Tensor) or not isinstance(update, Sequence):
        raise GistressError(
            "the update must be a list of tensors", "pass e.g. list(torch.autograd.grad(loss, params))"
        )
    for i, t in enumerate(update):
        if not isinstance(t, torch.Tensor):
            raise GistressError(f"update entry {i} is a {type(t).__name__}, not a tensor", "pass tensors only")
        if not t.is_floating_point():
            raise GistressError(
                f"update entry {i} has dtype {t.dtype}; defenses need floating-point tensors",
                "pass gradients or parameter deltas",
            )
    return list(update)


def _work(t: torch.Tensor) -> torch.Tensor:
    # half-precision arithmetic would distort norms and rounding probabilities
    return t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach()


def _rand(shape, generator, like: torch.Tensor, normal: bool) -> torch.Tensor:
    # Draw on the generator's own device so a seeded CPU generator gives the same numbers
    # whatever device the update lives on.
    device = generator.device if generator is not None else like.device
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _global_norm(ts: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in ts))


def _qsgd(t: torch.Tensor, bits: int, generator) -> torch.Tensor:
    s = 2**bits - 1
    norm = t.norm()
    if float(norm) == 0.0:
        return torch.zeros_like(t)
    scaled = t.abs() / norm * s
    low = scaled.floor()
    up = _rand(t.shape, generator, t, normal=False) < (scaled - low)
    # clamp: |v_i| / ||v|| can round a hair above 1
    level = (low + up.to(t.dtype)).clamp_(max=s)
    # one fixed step (norm / s) times an integer level: at most 2s+1 distinct values;
    # "+ 0.0" folds -0.0 into 0.0
    return torch.sign(t) * level * (norm / s) + 0.0


def _topk(ts: list[torch.Tensor], keep: float) -> list[torch.Tensor]:
    sizes = [t.numel() for t in ts]
    total = sum(sizes)
    if total == 0:
        return [t.clone() for t in ts]
    k = min(total, max(1, round(keep * total)))
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    mags = torch.cat([t.reshape(-1).abs().to(ts[0].device, dtype) for t in ts])
    # kthvalue is linear-time, unlike a full sort; ties at the threshold are resolved by index so
    # that exactly k entries survive
    thr = mags.kthvalue(total - k + 1).values
    mask = mags > thr
    short = k - int(mask.sum())
    if short > 0:
        ties = (mags == thr).nonzero().squeeze(1)[:short]
        mask[ties] = True
    out, start = [], 0
    for t, n in zip(ts, sizes):
        m = mask[start:start + n].view(t.shape).to(t.device)
        out.append(torch.where(m, t, torch.zeros_like(t)))
        start += n
    return out


def apply_defense(
    update: list[torch.Tensor], spec: str, *, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Post-process a client update; returns new, detached tensors with the same shapes/dtypes.

    ``update`` is the list of per-parameter tensors the client would send (gradients for
    FedSGD, parameter deltas for FedAvg). ``generator`` seeds the random defenses (``qsgd``,
    ``noise``); without it they use torch's global RNG. Half-precision tensors are processed
    in float32 and cast back.

    Semantics and sources:

    - ``none``: copies of the input.
    - ``qsgd:<b>``: QSGD stochastic quantization (Alistarh et al., NeurIPS 2017; SoK [1]) with
      s = 2^b - 1 levels. Each tensor is one bucket: Q(v)_i = ||v||_2 * sgn(v_i) * l_i / s,
      where l_i is floor(s|v_i|/||v||) rounded up with probability equal to the fractional part,
      so E[Q(v)] = v exactly. Per-tensor norms follow the usual FL implementations; the paper's
      own experiments use fixed-size buckets (e.g. 512), which would leak more norms. A tensor
      takes at most 2s+1 distinct values; an all-zero tensor stays zero.
    - ``sign``: SignSGD (Bernstein et al., ICML 2018; SoK [3]): sgn(v) in {-1, 0, +1}, unscaled.
      A global scale would not matter to a cosine-matching attacker anyway; a per-tensor scale
      (e.g. mean |v|) would hand the server each layer's l1 norm, so none is applied.
    - ``topk:<keep>``: top-k sparsification (Eghlidi & Jaggi 2020; SoK [19]): keep the fraction
      ``keep`` (rounded to a whole count, at least one entry) of entries with the largest |value|
      over the whole concatenated update, zero the rest. Global, not per-layer: layers with small
      gradients may be zeroed entirely, as in communication-efficient FL. Note the parameter is
      the KEPT share; the SoK grid's proportions are read as pruned shares (see ``SOK_GRIDS``).
    - ``clip:<C>``: flat clipping (McMahan et al., ICLR 2018, "DP-FedAvg"; SoK [61]; the
      per-example form is Abadi et al. 2016): scale the whole concatenated update by
      min(1, C / ||update||_2), so its global l2 norm is at most C and an update already
      inside the ball is returned unchanged.
    - ``noise:<sigma>``: Gaussian perturbation (local DP as in Naseri et al. 2020; SoK [63]):
      add i.i.d. N(0, sigma^2) to every entry. sigma is absolute. The SoK calls its values
      "multipliers"; in DP the noise std is multiplier x sensitivity, and since the SoK's
      perturbation grid is not paired with a clipping bound we read it as a multiplier on unit
      sensitivity, i.e. sigma itself. Combine with ``clip`` in a study for calibrated DP.
    """
    kind, param = parse_defense(spec)
    ts = _check_update(update)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise GistressError("generator must be a torch.Generator", "pass torch.Generator().manual_seed(seed)")
    with torch.no_grad():
        work = [_work(t) for t in ts]
        if kind == "none":
            out = [w.clone() for w in work]
        elif kind == "sign":
            out = [torch.sign(w) for w in work]
        elif kind == "qsgd":
            out = [_qsgd(w, int(param), generator) for w in work]
        elif kind == "topk":
            out = _topk(work, float(param))
        elif kind == "clip":
            norm = _global_norm(work)
            factor = min(1.0, float(param) / norm) if norm > 0 else 1.0
            out = [w.clone() if factor == 1.0 else w * factor for w in work]
        else:  # noise
            sigma = float(param)
            out = [w + sigma * _rand(w.shape, generator, w, normal=True) for w in work]
        return [o.to(t.dtype) for o, t in zip(out, ts)]
