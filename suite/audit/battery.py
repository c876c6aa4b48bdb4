"""The audit battery as data: the fixed, ordered threat levels and the budgets (how hard each level tries).

The question it answers: "if my clients train this checkpoint on their data, can the server see
their images?" The battery is fixed and ordered from the realistic client to the upper bound, so
two audits of different models (or of the same model at two checkpoints) are comparable:

1. ``realistic``        train-mode BN, one FedSGD gradient, labels shared (detection: boxes and
                        classes, which the detection attack needs), no BN statistics shared.
2. ``bn_running``       1 + the BN running-statistics update (``threat.bn_stats=running``); the
                        recovered batch statistics enter through preset ``gia_bn``'s BN prior (the
                        engine uses shared statistics only as a prior, so ``ig`` would ignore them).
3. ``bn_eval``          1 with inference-mode BN (``bn_mode=eval``): an upper bound. Random weights
                        are replaced by data-calibrated BN statistics (eval mode on 0/1 running
                        statistics only rescales: an unnormalized net no client trains).
4. ``labels_inferred``  1 with labels not shared: inferred from the gradient (classification only).
5. ``fedavg``           FedAvg, 4 local SGD steps at lr 0.01, the server knows those values.
6. ``strongest``        preset ``gia_bn`` with restarts, exact BN batch statistics, inference-mode
                        BN: the upper bound.
7. ``dlg``              level 1 attacked with DLG (squared-L2 matching, L-BFGS; classification only).
8. ``closed_form``      level 1's update solved in closed form, no labels, no prior, no iterations:
                        APRIL where a patch embedding feeds a learnable position embedding, the
                        dense-layer solve where the first layer is dense with a bias. Elsewhere it
                        reads "not applicable: <why>". Its evidence is the solve's own residual and
                        rank (``suite/attack/closed_form.py``), so it runs no positive control.

Levels 1, 3, 4, 5 use the ``ig`` preset (cosine matching + total variation), 2 and 6 ``gia_bn``, 7 ``dlg``. Every level runs the
prior-only control (same start and budget, gradient term off), so the gradient's own gain is known.
The TV prior's weight is not one number: ``ig``'s 0.2 is breaching's ImageNet value, which at 32 px
swamps the gradient term where Geiping et al.'s value for untrained CIFAR nets (1e-6) inverts the
same update. The ``ig`` and ``gia_bn`` levels therefore run each restart at both the preset's weight
and ``WEAK_TV`` (``attack.tv_choices``) and keep the lowest final matching loss, the server's own
selection rule, never the ground truth (``PRIOR_WEIGHTS``).
Models without BatchNorm skip levels 2 and 3 (and level 6 keeps train mode); detection skips 4 and 7.

Budgets: ``quick`` sets each level's budget by sensitivity. The level's positive control (the same
level on a known-leaky reference model at the audited input size, ``positive_control.py``) runs at
100 iterations, then 200, 400, ... up to the cap (1,600 for ``ig`` and ``gia_bn``, 400 L-BFGS
steps for ``dlg``) until it leaks; the audited model then runs at that budget. A level whose
control never leaks within the cap runs at the cap and stays inconclusive. ``thorough`` keeps its
fixed paper budgets (its controls run once at them); ``--iterations N`` fixes every level's
budget (no search); ``--no-positive-control`` runs the fixed base budget.

Client batches: each audited image is attacked as its own client batch of 1, the setting most
favourable to the attacker and the usual audit choice. Per level, BRR is the fraction of images
whose reconstruction (the restart the attacker picks by matching loss) leaked, and WSRR is the
fraction of all independent attack attempts (image x restart) in which the image leaked. A sample
leaked by the suite's one leak decision (``suite.scoring.leak_rule``): a content gain over the
colour-only estimate, and over the prior-only control, or a low LPIPS where its backbone is installed.
"""


from __future__ import annotations

from dataclasses import dataclass

from suite.config import PRESETS
from suite.errors import GistressError, close_matches

# The prior weights an optimization level tries (attack.tv_choices): the preset's own and Geiping et
# al.'s weight for untrained CIFAR nets, at which a 32 px ConvNet inverts where 0.2 does not
# (docs/findings.md, "The prior's weight"). A --set attack.tv or attack.tv_choices replaces them.
WEAK_TV = 1e-6
PRIOR_WEIGHTS = {preset: (PRESETS[preset]["tv"], WEAK_TV) for preset in ("ig", "gia_bn")}

# The realistic client every level starts from.
REALISTIC = dict(bn_mode="train", update="gradient", shares_labels=True, bn_stats="none",
                 attacker_knows_training=True)


@dataclass(frozen=True)
class ThreatLevel:
    """One entry of the battery: the threat-model change and the words the report uses."""

    key: str
    title: str                      # short name for the table
    grants: str                     # what the server gets, in plain words
    needs: str                      # "leaks only with <needs>"
    threat: dict
    preset: str = "ig"
    bn_only: bool = False           # meaningless without BatchNorm layers
    classification_only: bool = False
    eval_mode: bool = False         # needs non-random BN statistics
    strongest: bool = False
    closed_form: bool = False       # the preset is the closed form that fits the model (april / linear)


BATTERY: tuple[ThreatLevel, ...] = (
    ThreatLevel(
        "realistic", "realistic",
        "train-mode BN, one FedSGD gradient, labels shared (detection: boxes and classes), "
        "no BN statistics shared",
        "a realistic client (train-mode BN, one FedSGD gradient, labels shared)", {}),
    ThreatLevel(
        "bn_running", "+ BN running stats",
        "level 1 plus the client's BN running-statistics update: the server recovers the batch "
        "statistics from it and attacks with preset gia_bn, whose BN-statistics prior uses them",
        "the BN running-statistics update shared", {"bn_stats": "running"}, preset="gia_bn", bn_only=True),
    ThreatLevel(
        "bn_eval", "inference-mode BN",
        "level 1 with the client's BN in inference mode (running statistics): an upper bound",
        "inference-mode BN (an upper bound)", {"bn_mode": "eval"}, bn_only=True, eval_mode=True),
    ThreatLevel(
        "labels_inferred", "labels inferred",
        "level 1 without labels: the server infers them from the gradient",
        "labels inferred from the gradient", {"shares_labels": False}, classification_only=True),
    ThreatLevel(
        "fedavg", "FedAvg, 4 local steps",
        "FedAvg: 4 local SGD steps at lr 0.01 on the client's batch; the server knows those "
        "hyper-parameters and unrolls them",
        "FedAvg with the local hyper-parameters known",
        {"update": "fedavg", "local_steps": 4, "local_lr": 0.01, "attacker_knows_training": True}),
    ThreatLevel(
        "strongest", "strongest (gia_bn)",
        "the client's exact BN batch statistics, inference-mode BN, attack preset gia_bn "
        "(BN-statistics prior) with restarts: the upper bound",
        "the strongest attack (exact BN batch statistics, inference-mode BN, BN prior, restarts: "
        "an upper bound)",
        {"bn_mode": "eval", "bn_stats": "exact"}, preset="gia_bn", eval_mode=True, strongest=True),
    ThreatLevel(
        "dlg", "DLG (L2, L-BFGS)",
        "level 1 attacked with DLG instead: squared-L2 gradient matching and L-BFGS (joint soft labels "
        "when labels are not shared), the attack small sigmoid networks fall to where ig does not",
        "the DLG attack (L2 matching, L-BFGS)", {}, preset="dlg", classification_only=True),
    ThreatLevel(
        "closed_form", "closed form (april / linear)",
        "level 1's update, labels not shared, solved in closed form: APRIL (patch embedding + learnable "
        "position embedding) or the dense-layer solve (dense first layer with bias); no prior, no iterations",
        "nothing beyond the update itself (a closed-form solve of the first layer: no labels, no prior)",
        {"shares_labels": False}, preset="april", closed_form=True),
)


@dataclass(frozen=True)
class Budget:
    """How hard every level tries. ``size_cap`` None: the variant's own input size.

    ``*_iterations`` are the base budgets. Where a ``*_cap`` is set (``quick``), the budget is set
    by sensitivity: the level's positive control runs at the base budget, then at double that, and
    so on up to the cap, and the audited model runs at the first budget at which the control leaked
    (at the cap when none did, and the level then stays inconclusive). No cap: the base budget is
    fixed (``thorough``, whose controls still run once at that budget)."""

    name: str
    ig_iterations: int              # levels with preset ig (1, 3, 4, 5)
    gia_bn_iterations: int          # levels with preset gia_bn (2, 6)
    dlg_iterations: int             # level 7 (preset dlg): L-BFGS steps, up to 20 evaluations each
    strongest_restarts: int         # level 6; every other level runs one restart
    max_images: int | None
    default_images: int
    size_cap: int | None
    meant_for: str
    ig_cap: int | None = None       # the sensitivity search's cap per preset (None: fixed budget)
    gia_bn_cap: int | None = None
    dlg_cap: int | None = None

    def iterations_for(self, preset: str) -> int:
        """The base budget of a level with attack ``preset``."""
        return {"gia_bn": self.gia_bn_iterations, "dlg": self.dlg_iterations}.get(preset, self.ig_iterations)

    def cap_for(self, preset: str) -> int | None:
        """The sensitivity search's cap for ``preset``; None: the base budget is fixed."""
        return {"gia_bn": self.gia_bn_cap, "dlg": self.dlg_cap}.get(preset, self.ig_cap)

    def schedule(self, preset: str) -> tuple[int, ...]:
        """The budgets a level's positive control tries, in order: the base budget doubled up to
        the cap (100, 200, 400, 800, 1600), or the base budget alone where it is fixed."""
        n, cap = self.iterations_for(preset), self.cap_for(preset)
        out = [n]
        while cap is not None and out[-1] * 2 <= cap:
            out.append(out[-1] * 2)
        return tuple(out)

    def describe(self) -> str:
        """One line for the report."""
        size = f"the variant's input size capped at {self.size_cap} px" if self.size_cap else \
            "the variant's full input size"
        imgs = f"at most {self.max_images} images" if self.max_images else "every requested image"
        if self.ig_cap:
            iters = (f"set by sensitivity: each level's positive control starts at {self.ig_iterations:,} "
                     f"iterations (preset dlg: {self.dlg_iterations:,} L-BFGS steps) and doubles until it "
                     f"leaks, up to {self.ig_cap:,} (ig), {self.gia_bn_cap:,} (gia_bn) and {self.dlg_cap:,} (dlg); "
                     "the level runs at the first budget its control leaked at")
        else:
            iters = (f"fixed: preset ig {self.ig_iterations:,} iterations, preset gia_bn "
                     f"{self.gia_bn_iterations:,} iterations, preset dlg {self.dlg_iterations:,} L-BFGS steps")
        return (f"{self.name}: {iters}; 1 restart, level 6 {self.strongest_restarts} restarts; "
                f"{imgs} (default {self.default_images}); {size}; meant for {self.meant_for}")


# quick's caps: measured (docs/audit.md, "Positive controls"): the MLP references leak at the base
# budget; 1,600 ig/gia_bn steps cost the sigmoid LeNet about 10-50 s per image at 32 px, and the
# audited model runs at the budget its control needed, so the cap bounds the audit's cost too.
BUDGETS: dict[str, Budget] = {
    "quick": Budget("quick", ig_iterations=100, gia_bn_iterations=100, dlg_iterations=100, strongest_restarts=2, max_images=2,
                    default_images=2, size_cap=256, meant_for="a laptop CPU (minutes)",
                    ig_cap=1_600, gia_bn_cap=1_600, dlg_cap=400),
    "thorough": Budget("thorough", ig_iterations=24_000, gia_bn_iterations=10_000, dlg_iterations=1_200,
                       strongest_restarts=4,
                       max_images=None, default_images=8, size_cap=None,
                       meant_for="a GPU (paper scale: IG 24,000, gia_bn 10,000 and DLG 1,200 iterations)"),
}


def budget_for(name: str) -> Budget:
    """The named audit budget; a one-line error with the nearest name otherwise."""
    if name in BUDGETS:
        return BUDGETS[name]
    near = close_matches(str(name), BUDGETS, n=1)
    raise GistressError(f"unknown audit level '{name}'" + (f" (did you mean '{near}'?)" if near else ""),
                        f"use --level {' or --level '.join(BUDGETS)}")
