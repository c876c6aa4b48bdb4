"""Typed configuration: the attack recipe (``AttackSpec``) and one fully resolved run (``RunConfig``).

Both are pydantic models with ``extra="forbid"`` so that a misspelt key is an error, never a
silently ignored setting. Presets carry published defaults; every field stays overridable.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from suite.errors import GistressError, close_matches
from suite.threat.threat_model import ThreatModel

# Published defaults, each as its authors' code runs it (README "Attack presets" lists every
# value and its source):
# - ig: breaching 0.1.2, config attack/invertinggradients (Geiping et al. 2020);
# - dlg: breaching's attack/deepleakage with known labels, or joint soft labels (Zhu et al. 2019);
# - gia_bn: the GIA "running statistics" attack in the first paper's authors' public code
#   (LeakPro, GIABaseRunningConfig).
# All three optimize the candidate in the variant's normalized space (x - mean) / std, start from
# an unclamped N(0, 1) draw there, box it to the valid image range after each step (ig, gia_bn),
# decay the step at N//2.667, N//1.6, N//1.142 and return the iterate with the lowest objective.
PRESETS: dict[str, dict] = {
    "ig": dict(
        method="optimization",
        objective="cosine", optimizer="adam", lr=0.1, signed=True, decay=True, tv=0.2, tv_kind="padded",
        bn_prior=0.0, init="random", labels="auto", clamp=True, space="normalized", keep="best",
    ),
    "dlg": dict(
        method="optimization", objective="l2", optimizer="lbfgs", lr=1.0, signed=False, decay=False, tv=0.0, tv_kind="padded",
        bn_prior=0.0, init="random", labels="joint", clamp=False, space="normalized", keep="best",
    ),
    "gia_bn": dict(
        method="optimization", objective="cosine", optimizer="adam", lr=0.1, signed=True, decay=True, tv=0.052, tv_kind="interior",
        bn_prior=0.00016, init="random", labels="auto", clamp=True, space="normalized", keep="best",
    ),
    # closed forms (suite/attack/closed_form.py): one solve, no iterations; the remaining fields
    # (ig's) only define the matching loss reported at the solution
    "april": dict(method="april"),
    "linear": dict(method="linear"),
}
CLOSED_FORMS = ("april", "linear")
# run-config keys whose values hand the attacker something derived from the client's images
TARGET_DERIVED_KEYS = ("attack.init", "attack.noise_p", "attack.noise_sigma", "attack.init_file")


class AttackSpec(BaseModel):
    """How the attacker optimizes. ``preset`` fills fields the user did not set."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = "ig"
    # optimization: descend on the matching loss; april / linear: a closed-form solve
    method: Literal["optimization", "april", "linear"] | None = None
    objective: Literal["cosine", "l2"] | None = None
    layer_weights: dict[str, float] = Field(default_factory=dict)  # fnmatch pattern -> weight
    tv: float | None = Field(None, ge=0)
    # prior weights the server tries: every restart runs once per weight and the lowest final
    # matching loss (no ground truth) picks among all of them; ``tv`` is then not used. At 32 px
    # the ig preset's 0.2 (breaching's ImageNet value) swamps the gradient term where Geiping
    # et al.'s CIFAR value 1e-6 inverts (docs/findings.md, "The prior's weight").
    tv_choices: list[float] | None = Field(None, min_length=2)
    bn_prior: float | None = Field(None, ge=0)
    optimizer: Literal["adam", "lbfgs"] | None = None
    lr: float | None = Field(None, gt=0)
    signed: bool | None = None
    decay: bool | None = None
    iterations: int = Field(300, ge=1)
    restarts: int = Field(1, ge=1)
    # auto: restarts share one batched pass (torch.func.vmap) on CUDA where the setting allows
    # it, else one after another; batched / sequential force either (see docs/benchmarks.md)
    restart_mode: Literal["auto", "batched", "sequential"] = "auto"
    # closed_form: start from the closed-form estimate read off the update (no target involved;
    # with several images it is their mixture, the same start for each)
    init: Literal["random", "noisy_target", "file", "closed_form"] | None = None
    init_distribution: Literal["randn", "uniform"] = "randn"
    noise_p: float | None = Field(None, ge=0, le=1)       # noisy_target: fraction of pixels replaced
    noise_sigma: float | None = Field(None, ge=0)         # noisy_target: additive Gaussian sigma
    init_file: str | None = None
    labels: Literal["auto", "joint"] | None = None
    control: bool = False
    # steps between logged step metrics; None: about 50 points per run (every step on short runs)
    log_every: int | None = Field(None, ge=1)
    clamp: bool | None = None                             # box to the valid image range after each step
    # normalized: the candidate lives in the variant's (x - mean) / std space, where lr, TV and the
    # box act (the references); pixel: the candidate is [0, 1] pixels (steps ~1/std larger)
    space: Literal["normalized", "pixel"] | None = None
    # padded: breaching's TV (zero-padded differences, mean over every pixel of |dx| + |dy|);
    # interior: mean |dx| + mean |dy| over neighbouring pixels only (LeakPro)
    tv_kind: Literal["padded", "interior"] | None = None
    # best: return the iterate with the lowest objective seen (the references); last: the final one
    keep: Literal["best", "last"] | None = None

    @model_validator(mode="after")
    def _fill_from_preset(self):
        if self.preset is not None:
            if self.preset not in PRESETS:
                near = close_matches(self.preset, PRESETS)
                raise ValueError(
                    f"unknown preset '{self.preset}'"
                    + (f"; did you mean {near}?" if near else "")
                    + f" (presets: {', '.join(PRESETS)})"
                )
            for key, value in PRESETS[self.preset].items():
                if getattr(self, key) is None:
                    object.__setattr__(self, key, value)
        fallback = PRESETS["ig"]
        for key, value in fallback.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.init == "noisy_target" and self.noise_p is None and self.noise_sigma is None:
            raise ValueError("init=noisy_target needs noise_p (pixel fraction) or noise_sigma")
        if self.restart_mode == "batched" and self.optimizer == "lbfgs":
            raise ValueError("restart_mode=batched needs optimizer=adam: L-BFGS line-searches each "
                             "restart on its own (use restart_mode=sequential or auto)")
        if self.init == "file" and not self.init_file:
            raise ValueError("init=file needs init_file=<path to an image>")
        if self.tv_choices is not None:
            if any(w < 0 for w in self.tv_choices) or len(set(self.tv_choices)) != len(self.tv_choices):
                raise ValueError(f"tv_choices={self.tv_choices} must be distinct weights >= 0, e.g. [0.2, 1e-6]")
        return self

    @property
    def tv_weights(self) -> list[float]:
        """The prior weights the attack runs: ``tv_choices`` when set, else ``tv`` alone."""
        return list(self.tv_choices) if self.tv_choices else [float(self.tv or 0.0)]

    @property
    def log_interval(self) -> int:
        """``log_every``, or when unset the interval that logs about 50 points over the budget."""
        return self.log_every or max(1, self.iterations // 50)

    @property
    def closed_form(self) -> bool:
        """True for the analytic attacks (one solve, no optimization)."""
        return self.method in CLOSED_FORMS

    @property
    def oracle_init(self) -> bool:
        """True when the start image may carry the target: ``noisy_target`` is built from it, and a
        user-supplied ``file`` cannot be told apart from one that was. Either is a target-derived
        grant, so the setting is an upper bound. ``noisy_target`` with ``noise_p=1`` and no sigma
        replaces every pixel by noise (``suite.attack.inits.noisy_target``): nothing of the target
        is left, so it grants nothing (Fig. 4's no-information end point)."""
        if self.init == "noisy_target":
            return not (self.noise_p == 1.0 and not self.noise_sigma)
        return self.init == "file"


class LeakThresholds(BaseModel):
    """The leak decision's thresholds (``suite.scoring.leak_rule``; calibrated on the gallery in
    tests/data/leak_gallery, docs/audit.md). ``--set leak.gain_db=3`` changes one."""

    model_config = ConfigDict(extra="forbid")

    gain_db: float = Field(2.5, gt=0)          # content gain over the colour-only estimate, dB
    over_control_db: float = Field(1.5, ge=0)  # ... and over the prior-only control's, where one ran
    lpips: float = Field(0.1, ge=0)            # or LPIPS at most this, where its backbone is installed
    max_shift: int = Field(2, ge=0)            # misalignment (px) the content gain forgives


RETIRED_KEYS = {
    key: f"{key} belongs to the retired PSNR leak rule; set {new} instead (the leak rule is content "
         "gain over colour-only estimates, docs/audit.md)"
    for key, new in (("leak_psnr", "leak.gain_db"), ("leak_lpips", "leak.lpips"))
}
"""Keys the config no longer has, each with the one-line message that names its replacement."""


class RunConfig(BaseModel):
    """One fully resolved setting: what to build, what data, which threat model, which attack."""

    model_config = ConfigDict(extra="forbid")

    variant: str
    variant_options: dict = Field(default_factory=dict)
    weights: str = "random"
    trust_checkpoint: bool = False
    calibration_batches: int = Field(4, ge=1)
    data: str = "samples"
    images: list[str] = Field(default_factory=lambda: ["astronaut"])
    size: int | None = Field(None, ge=8)
    seed: int = 0
    device: str = "auto"
    threat: ThreatModel = Field(default_factory=ThreatModel)
    attack: AttackSpec = Field(default_factory=AttackSpec)
    leak: LeakThresholds = Field(default_factory=LeakThresholds)

    @model_validator(mode="before")
    @classmethod
    def _retired_keys(cls, data):
        if isinstance(data, dict):
            for key, message in RETIRED_KEYS.items():
                if key in data:
                    raise ValueError(message)
        return data

    def config_hash(self) -> str:
        """A stable hash of the resolved config (resume key). Keys added after settings were first
        hashed count only away from their default (``attack.log_every`` when set,
        ``attack.method`` other than optimization, a non-empty ``threat.frozen``): settings from
        before keep their hash (and their finished runs)."""
        unset: dict = {"attack": set(), "threat": set()}
        if self.attack.log_every is None:
            unset["attack"].add("log_every")
        if self.attack.method == "optimization":  # keys added later count only when they differ
            unset["attack"].add("method")
        if not self.threat.frozen:
            unset["threat"].add("frozen")
        if self.attack.tv_choices is None:
            unset["attack"].add("tv_choices")
        blob = json.dumps(self.model_dump(mode="json", exclude={k: v for k, v in unset.items() if v}),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def assumption_level(self, task: str | None = None, has_bn: bool = True) -> int:
        """The SoK assumption level of this setting: the threat model's grants plus the attack's
        priors (a BN prior counts only on a model with BN layers). ``task`` defaults to the
        variant's. The one place the level is computed (runner, tracking and audit use it)."""
        if task is None:
            from variants.base import task_of

            task = task_of(self.variant)
        priors = not self.attack.closed_form  # a closed form uses no image prior
        level = self.threat.assumption_level(uses_bn_prior=priors and bool(self.attack.bn_prior) and has_bn,
                                             uses_tv=priors and any(self.attack.tv_weights), task=task)
        if self.weights == "calibrated" and has_bn:
            level = max(level, 2)  # BN statistics estimated on data: the SoK's "data distribution"
        return level

    @property
    def upper_bound(self) -> bool:
        """True when the setting simplifies the client (eval-mode BN, exact statistics) or starts
        the attacker from a target-derived image: what it measures bounds the realistic attack."""
        return self.threat.upper_bound or self.attack.oracle_init

    def attack_grants(self) -> dict[str, str]:
        """Grants that come from the run config rather than the client's round: a target-derived
        start and data-calibrated weights, each in words (merged into the ``grants`` tag)."""
        a, out = self.attack, {}
        if a.init == "noisy_target" and not a.oracle_init:
            out["init"] = "noisy_target (p=1.0): every pixel replaced by noise, nothing of the target left"
        elif a.init == "noisy_target":
            amount = ", ".join(f"{k}={v}" for k, v in (("p", a.noise_p), ("sigma", a.noise_sigma)) if v is not None)
            out["init"] = f"noisy_target ({amount}): built from the client's images, an oracle (upper bound)"
        elif a.init == "file":
            out["init"] = "file: a user-supplied start, counted as target-derived (upper bound)"
        if self.weights == "calibrated":
            out["weights"] = "calibrated: BN statistics estimated on data (SoK level 2, data distribution)"
        return out

    def flat_params(self) -> dict[str, str | int | float | bool]:
        """Flat MLflow params named by the suite's vocabulary."""
        a, t = self.attack, self.threat
        params = {
            "variant": self.variant,
            "weights": self.weights,
            "data": self.data,
            "images": ",".join(self.images),
            "batch_size": len(self.images),
            "size": self.size if self.size is not None else "default",
            "seed": self.seed,
            "bn_mode": t.bn_mode,
            "update": t.update,
            "local_steps": t.local_steps,
            "local_lr": t.local_lr,
            "attacker_knows_training": t.attacker_knows_training,
            "shares": "+".join(
                [s for s, on in (("labels", t.shares_labels), ("bn_stats", t.bn_stats != "none")) if on]
            ) or "none",
            "bn_stats": t.bn_stats,
            "defense": t.defense,
            "preset": a.preset or "none",
            "method": a.method,
            "frozen": ",".join(t.frozen) or "none",
            "objective": a.objective,
            "optimizer": a.optimizer,
            "lr": a.lr,
            "signed": a.signed,
            "space": a.space,
            "clamp": a.clamp,
            "keep": a.keep,
            "tv": a.tv,
            "tv_kind": a.tv_kind,
            "bn_prior": a.bn_prior,
            "init": a.init,
            "init_file": a.init_file or "none",
            "noise_p": a.noise_p if a.noise_p is not None else "none",
            "noise_sigma": a.noise_sigma if a.noise_sigma is not None else "none",
            "labels": a.labels,
            "restarts": a.restarts,
            "restart_mode": a.restart_mode,
            "iterations": a.iterations,
            "control": a.control,
        }
        for k, v in self.variant_options.items():
            params[f"variant.{k}"] = v if isinstance(v, (int, float, bool, str)) else json.dumps(v)
        return params


def parse_attack(**fields) -> AttackSpec:
    """Build an AttackSpec, turning validation errors into one-line GistressErrors."""
    from pydantic import ValidationError

    try:
        return AttackSpec(**fields)
    except ValidationError as exc:
        raise GistressError(first_error(exc), "check the attack settings (see README: presets)") from None


def first_error(exc) -> str:
    """The first pydantic validation error as one line: ``loc: message``."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg
