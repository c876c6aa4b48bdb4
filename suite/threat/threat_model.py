"""The threat model: what the victim client does and what leaves the device.

Every grant to the attacker is a named field here, logged as an MLflow param. The SoK
(Du et al.) ranks adversary assumptions 0-5; ``assumption_level`` reports the highest level a
setting relies on, with the attack's own priors taken into account by the caller.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# SoK Tab. 7 assumption levels
ASSUMPTION_LEVELS = {
    0: "basic information (model, update, batch size)",
    1: "priors (image smoothness)",
    2: "data distribution (BN running statistics / data-calibrated model)",
    3: "client-side training details (local learning rate, steps, mini-batch size)",
    4: "BN statistics of the client's batch",
    5: "malicious behaviour",
}

DEFENSES = ("none", "qsgd", "sign", "topk", "clip", "noise")


class ThreatModel(BaseModel):
    """Victim-client behaviour and side information granted to the server."""

    model_config = ConfigDict(extra="forbid")

    bn_mode: Literal["train", "eval"] = "train"
    update: Literal["gradient", "fedavg"] = "gradient"
    local_steps: int = Field(1, ge=1)
    local_lr: float = Field(0.01, gt=0)
    local_batch_size: int | None = Field(None, ge=1)
    local_epochs: int = Field(1, ge=1)
    attacker_knows_training: bool = True
    shares_labels: bool = True
    bn_stats: Literal["none", "running", "exact"] = "none"
    # None: the model's own BN momentum (the server sent the model, so it knows it)
    bn_momentum: float | None = Field(None, gt=0, le=1)
    defense: str = "none"
    # parameters the client keeps frozen (fnmatch patterns on parameter names, e.g. "*pos_embed"):
    # they are not trained and not in the update (head-only fine-tuning: freeze everything else)
    frozen: list[str] = Field(default_factory=list)

    @field_validator("defense")
    @classmethod
    def _check_defense(cls, v: str) -> str:
        # the full check (kind and parameter range) here, so a bad defense fails with the config,
        # before any model is built or any MLflow run exists
        from suite.errors import GistressError
        from suite.threat.defenses import parse_defense

        try:
            parse_defense(v)
        except GistressError as exc:
            raise ValueError(f"{exc.message}; {exc.hint}" if exc.hint else exc.message) from None
        return v

    def assumption_level(self, uses_bn_prior: bool = False, uses_tv: bool = False,
                         task: str = "classification") -> int:
        """Highest SoK assumption level this setting relies on (eval-mode BN is flagged apart)."""
        level = 0
        if uses_tv:
            level = max(level, 1)
        if uses_bn_prior and self.bn_stats == "none":
            level = max(level, 2)
        # Classification labels are logged as their own grant (``shares_labels``) and not ranked:
        # a single sample's label can be inferred from the gradient (iDLG). A detector's
        # ground-truth boxes and classes cannot: like the batch's BN statistics they are
        # side information about the client's own images, so they rank with them (level 4).
        if task == "detection" and self.shares_labels:
            level = max(level, 4)
        if self.update == "fedavg" and self.attacker_knows_training and self.local_steps > 1:
            level = max(level, 3)
        if self.bn_stats != "none":
            level = max(level, 4)
        return level

    @property
    def upper_bound(self) -> bool:
        """True when the client is simplified beyond a realistic training step."""
        return self.bn_mode == "eval" or self.bn_stats == "exact"
