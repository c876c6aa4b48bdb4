"""Closed-form (analytic) gradient inversion: what an honest server reads off the update by
solving a linear system, without optimizing.

Two closed forms, each exact for one image per update:

- ``april`` (Lu et al., CVPR 2022, for vision transformers): a patch embedding ``E_i = W x_i + b``
  followed by an additive, learnable position embedding ``P``. The gradient of ``W`` is
  ``G = sum_i g_i x_iᵀ`` and the gradient of the patch rows of ``P`` is ``g_i`` itself, so with
  ``D`` the ``N x dim`` matrix of those rows, ``G = Dᵀ X`` and one least-squares solve returns the
  patches ``X``. It needs ``N <= dim`` (more channels than patches).
- ``linear`` (Phong et al. 2017; Fan et al.): a dense first layer with a bias. Its weight
  gradient is ``g xᵀ`` and its bias gradient ``g``, so ``x = Gᵀ g / |g|²``.

FedAvg's local steps keep both relations for one image (every step's weight delta has the same
input), and a uniform scaling of the update (clipping) cancels. Each attack checks itself without
the target: it rebuilds the first layer's update from its solution and reports the relative
residual ``|Dᵀ X - G| / |G|`` (``|g xᵀ - G| / |G|``): about 1e-7 when the system is the one the
client produced, orders of magnitude more when images mix or a defense distorted the update.

The structure comes from the model (``suite/attack/first_layer.py``); an attack that does not
apply says why in one line (``Applicability.reason``) before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from suite.attack.first_layer import FirstLayer, find_first_layer
from suite.errors import GistressError
from suite.results import Reconstruction

METHODS = ("april", "linear")


@dataclass(frozen=True)
class Applicability:
    """Whether a closed form applies to this model and update, and in words why (not)."""

    method: str
    applies: bool
    reason: str
    layer: FirstLayer
    hint: str = ""

    def refusal(self) -> GistressError:
        """The one-line error a refused attack raises."""
        return GistressError(f"the {self.method} closed form does not apply: {self.reason}", self.hint)


def applicability(method: str, layer: FirstLayer, update_names: list[str], batch_size: int) -> Applicability:
    """Whether ``method`` applies to a model whose first layer is ``layer`` and whose update has
    the parameters ``update_names``, at ``batch_size`` images per update."""
    if method not in METHODS:
        raise GistressError(f"unknown closed form '{method}'", f"use one of {', '.join(METHODS)}")

    other = next(m for m in METHODS if m != method)
    structure = f"use an optimization preset (ig, gia_bn, dlg), or --preset {other} where it applies"

    def no(reason: str, hint: str = structure) -> Applicability:
        return Applicability(method, False, reason, layer, hint)

    frozen = "the client does not train it, so the closed form has nothing to read; use an optimization preset"

    if method == "april":
        if layer.kind != "patch_embedding":
            return no(f"the input's first layer is not a patch embedding ({layer.describe})")
        if layer.position is None:
            return no(f"no learnable position embedding is added to the output of {layer.module}")
        needed = (("position embedding", layer.position), ("patch embedding weight", layer.weight))
    else:
        if layer.kind != "dense":
            return no(f"the input's first layer is not a dense layer ({layer.describe})")
        if layer.bias is None:
            return no(f"the dense layer {layer.module} has no bias")
        needed = (("dense layer's weight", layer.weight), ("dense layer's bias", layer.bias))
    in_update = set(update_names)
    for what, name in needed:
        if name not in in_update:
            return no(f"the {what} {name} is not in the update (frozen on the client)", frozen)
    if method == "april" and layer.tokens > layer.dim:
        return no(f"{layer.tokens} patches but only {layer.dim} embedding channels: the system "
                  "has more unknowns than equations")
    if batch_size != 1:
        return no(f"the update comes from a batch of {batch_size} images; the closed form separates one "
                  "image per update (with more, the observed rows are sums over images)",
                  "attack one image per update, or start an optimization preset from the mixed estimate "
                  "with --init closed_form")
    size = f"of {layer.patch} px" if layer.pixels is None else "(linear)"
    what = (f"patch embedding {layer.module} ({layer.tokens} patches {size}, {layer.dim} "
            f"channels) with position embedding {layer.position}" if method == "april"
            else f"dense first layer {layer.module} with bias")
    return Applicability(method, True, what, layer)


def method_for(layer: FirstLayer) -> str:
    """The closed form that fits ``layer``'s structure (``april`` unless it is dense)."""
    return "linear" if layer.kind == "dense" else "april"


def fit(variant, image_size: tuple[int, int], bn_mode: str, method: str | None = None,
        batch_size: int = 1) -> Applicability:
    """Whether ``method`` (default: the one the structure fits) applies to the variant's model as
    the client holds it (its trainable parameters are the update), at ``batch_size`` images per
    update: one probe with seeded noise, before any client round or attack runs."""
    from suite.threat.client import trainable

    layer = find_first_layer(variant.model, image_size, variant.to_normalized, bn_mode)
    return applicability(method or method_for(layer), layer, trainable(variant.model)[0], batch_size)


@dataclass(frozen=True)
class Solution:
    """A closed-form solve: the normalized image (1, 3, H, W), the relative residual, and the rank
    of the system against the number of unknown rows (patches; 1 for a dense layer). A rank below
    the unknowns means the update does not pin the image down: the solve then returns the
    minimum-norm image, which fits the update (small residual) without being the client's."""

    image: torch.Tensor
    residual: float
    rank: int
    unknowns: int

    @property
    def determined(self) -> bool:
        """Whether the system has one solution (full rank)."""
        return self.rank >= self.unknowns

    def metrics(self) -> dict[str, float]:
        """The solve's target-free checks under the run's metric keys."""
        return {"closed_form_residual": self.residual, "closed_form_rank": self.rank,
                "closed_form_unknowns": self.unknowns}


# singular values below this fraction of the largest count as zero (float32 updates: ~1e-7 noise)
RANK_TOLERANCE = 1e-5


def solve_april(update: dict[str, torch.Tensor], layer: FirstLayer, image_size: tuple[int, int]) -> Solution:
    """Patches from ``G = Dᵀ X`` by least squares."""
    d = layer.dim
    g = update[layer.weight].detach().double().cpu().reshape(d, -1)          # (dim, 3·p·p)
    rows = update[layer.position].detach().double().cpu().reshape(-1, d)
    pos = rows[layer.offset:layer.offset + layer.tokens]                      # (N, dim)
    x = torch.linalg.lstsq(pos.T, g, driver="gelsd").solution                 # (N, 3·p·p), minimum norm
    if layer.pixels is not None:  # a linear patch embedding: put every solved value back in place
        flat = torch.zeros(layer.pixels.numel(), dtype=x.dtype)
        flat[layer.pixels] = x.flatten()
        image = flat.reshape(1, 3, *image_size)
    else:
        h, w, p = layer.grid[0], layer.grid[1], layer.patch
        image = x.reshape(h, w, 3, p, p).permute(2, 0, 3, 1, 4).reshape(1, 3, h * p, w * p)
    return Solution(image.float(), _relative(pos.T @ x - g, g), _rank(pos), layer.tokens)


def solve_linear(update: dict[str, torch.Tensor], layer: FirstLayer, image_size: tuple[int, int]) -> Solution:
    """The input of a dense first layer: ``x = Gᵀ g / |g|²``."""
    g = update[layer.weight].detach().double().cpu()
    b = update[layer.bias].detach().double().cpu()
    norm2 = float(b @ b)
    if norm2 == 0.0:  # no bias gradient survived (a sparsifying defense, say): nothing to read
        return Solution(torch.zeros(1, 3, *image_size), 1.0, 0, 1)
    x = (g.T @ b) / norm2
    return Solution(x.reshape(1, 3, *image_size).float(), _relative(torch.outer(b, x) - g, g), 1, 1)


def _rank(m: torch.Tensor) -> int:
    sv = torch.linalg.svdvals(m)
    return int((sv > RANK_TOLERANCE * sv.max()).sum()) if sv.numel() and sv.max() > 0 else 0


def _relative(diff: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.norm())
    return float(diff.norm()) / scale if scale > 0 else float("inf")


def solve(method: str, update: dict[str, torch.Tensor], layer: FirstLayer, image_size: tuple[int, int]) -> Solution:
    """Run closed form ``method`` on the named update tensors."""
    if method == "april":
        return solve_april(update, layer, image_size)
    return solve_linear(update, layer, image_size)


def probe_first_layer(variant, obs) -> FirstLayer:
    """The first layer of the model the server sent (its own copy, probed with seeded noise)."""
    import copy

    model = copy.deepcopy(variant.model)
    model.load_state_dict(obs.model_state)
    return find_first_layer(model, tuple(obs.image_size), variant.to_normalized, obs.threat.bn_mode)


def estimate(variant, obs, method: str | None = None,
             layer: FirstLayer | None = None) -> tuple[torch.Tensor, Solution, Applicability]:
    """The closed-form image from ``obs`` whatever the batch size (a mixture when it is > 1): the
    pixels (1, 3, H, W) unclamped, the solve, and the applicability at this batch size.

    Raises the refusal when the structure itself does not fit (no patch or position embedding,
    frozen parameters); the batch size alone does not stop it, so a caller can see what a
    mixed batch yields or start an optimization from it. ``layer``: the sent model's first layer
    when a caller probed it already (``fit``); else it is probed here.
    """
    layer = layer if layer is not None else probe_first_layer(variant, obs)
    method = method or method_for(layer)
    verdict = applicability(method, layer, obs.param_names, obs.batch_size)
    structural = applicability(method, layer, obs.param_names, 1)
    if not structural.applies:
        raise structural.refusal()
    solution = solve(method, dict(zip(obs.param_names, obs.update)), layer, tuple(obs.image_size))
    return variant.from_normalized(solution.image), solution, verdict


class ClosedFormAttacker:
    """Reconstructs the client's image from an Observation in closed form (no optimization).

    Construction refuses (``GistressError``, one line) when the method does not apply to this
    model and update. ``matching_loss`` of the result is the attack spec's objective evaluated
    at the solution (labels as the threat model grants, or inferred), so closed-form and
    optimization runs compare on one scale; ``residual`` is the closed form's own check.
    ``layer``: the sent model's first layer when a caller probed it already (``fit``).
    """

    def __init__(self, variant, obs, spec, device: str | torch.device = "cpu", seed: int = 0,
                 layer: FirstLayer | None = None):
        self.variant, self.obs, self.spec, self.device, self.seed = variant, obs, spec, device, seed
        self.layer = layer if layer is not None else probe_first_layer(variant, obs)
        self.applies = applicability(spec.method, self.layer, obs.param_names, obs.batch_size)
        if not self.applies.applies:
            raise self.applies.refusal()

    def reconstruct(self, inits=None, *, callback=None) -> Reconstruction:
        """Solve, clamp to the valid image range, and report the residual and the matching loss
        (``self.solution`` keeps the rank). ``inits`` and ``callback`` are the optimization
        attacker's arguments; a solve has no start and no steps, so both go unused."""
        update = dict(zip(self.obs.param_names, self.obs.update))
        self.solution = solve(self.spec.method, update, self.layer, tuple(self.obs.image_size))
        images = self.variant.from_normalized(self.solution.image).clamp(0, 1)
        loss = self._matching_loss(images)
        return Reconstruction(images=images, matching_loss=loss, restart_images=[images], restart_losses=[loss],
                              chosen=0, init=None, residual=self.solution.residual)

    def _matching_loss(self, images: torch.Tensor) -> float:
        from suite.attack.attacker import Attacker

        try:
            attacker = Attacker(self.variant, self.obs, self.spec, device=self.device, seed=self.seed)
            return attacker.matching_loss(images.to(attacker.device))
        except GistressError:  # e.g. labels neither shared nor inferable: the residual still stands
            return float("nan")
