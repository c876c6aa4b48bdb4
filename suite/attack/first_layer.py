"""What the input meets first, found from the model itself: a patch embedding (with or without an
additive position embedding) or a dense layer.

The closed-form attacks (``suite/attack/closed_form.py``) need to know which parameters carry the
input in their gradient. No list of names decides that: one probe forward and backward on an
attacker-made input (seeded noise, never the client's data) records the first convolution or
linear layer the input reaches, checks that it sees exactly the normalized image, and finds the
parameter whose gradient equals the gradient of that layer's output token by token: that is an
embedding added right after it. A frozen parameter is probed too (on a copy), so the attack can
say "frozen" rather than "absent".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

# the probe's gradients must agree to this relative error for an embedding to count as additive
ADDITIVE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class FirstLayer:
    """The layer the input meets first, and what the closed forms need to know about it.

    ``kind``: ``patch_embedding`` (a convolution whose kernel equals its stride, or a linear
    layer on patches cut from the image: non-overlapping patches), ``dense`` (a linear layer on
    the flattened image) or ``other`` (``describe`` says what). ``position``: the parameter added
    to the patch tokens right after the embedding, ``offset`` of its rows before the first patch
    token (a class token's row, say). ``pixels``: for a linear patch embedding, the flat image
    index (channel, row, column) of every entry of its (tokens x inputs) input, found by the probe.
    """

    kind: str
    module: str
    describe: str
    weight: str | None = None
    bias: str | None = None
    position: str | None = None
    offset: int = 0
    patch: int = 0
    grid: tuple[int, int] = (0, 0)
    dim: int = 0
    pixels: torch.Tensor | None = field(default=None, compare=False, repr=False)

    @property
    def tokens(self) -> int:
        """Number of patch tokens (rows of the position embedding the patches meet)."""
        return self.grid[0] * self.grid[1]


def find_first_layer(model: nn.Module, image_size: tuple[int, int], to_normalized,
                     bn_mode: str = "train") -> FirstLayer:
    """Probe ``model`` (a copy, all parameters made trainable) with seeded noise at ``image_size``.

    ``to_normalized`` maps [0, 1] pixels to what the network's first layer should see (the
    variant's normalization). Returns the first layer's description; ``kind="other"`` when the
    input's first parametric layer is neither a patch embedding nor a dense layer on the image.
    """
    from suite.model.tasks import set_mode

    probe = copy.deepcopy(model).cpu().float()
    set_mode(probe, "classification", bn_mode)
    for p in probe.parameters():
        p.requires_grad_(True)
    names = {id(m): n for n, m in probe.named_modules()}
    calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def record(module, inputs, output):
        if not calls and inputs and isinstance(inputs[0], torch.Tensor):
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.retain_grad()
            calls.append((module, inputs[0].detach(), output))

    hooks = [m.register_forward_hook(record) for m in probe.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    gen = torch.Generator().manual_seed(20240)
    x = torch.rand((1, 3, *image_size), generator=gen)
    try:
        out = probe(x)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        return FirstLayer("other", "", "the input reaches no convolution or linear layer")
    module, seen, emb = calls[0]
    name = names.get(id(module), type(module).__name__)
    layer = _classify(module, name, seen, to_normalized(x), image_size)
    if layer.kind != "patch_embedding":
        return layer
    # the gradient of every parameter, from one backward of a seeded random projection of the output
    if not isinstance(out, torch.Tensor):
        return layer
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    if emb.grad is None:
        return layer
    # (N, D): a conv's map row-major over the patch grid as ViTs flatten it; a linear layer's rows
    tokens = emb.grad[0] if layer.pixels is not None else emb.grad[0].flatten(1).T
    position, offset = _additive_embedding(probe, tokens, skip={layer.weight, layer.bias})
    if position is None:
        return layer
    return FirstLayer(**{**layer.__dict__, "position": position, "offset": offset})


def _classify(module: nn.Module, name: str, seen: torch.Tensor, normalized: torch.Tensor,
              image_size: tuple[int, int]) -> FirstLayer:
    """Whether the first layer is a patch embedding or a dense layer fed the normalized image."""
    bias = f"{name}.bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Conv2d):
        k, s = module.kernel_size, module.stride
        what = (f"{name}: a {k[0]}x{k[1]} convolution with stride {s[0]}"
                + (f", padding {module.padding[0]}" if any(module.padding) else ""))
        fed = seen.shape == normalized.shape and torch.allclose(seen, normalized, atol=1e-5)
        patch = (k[0] == k[1] == s[0] == s[1] and not any(module.padding) and module.groups == 1
                 and module.dilation == (1, 1) and image_size[0] % k[0] == 0 and image_size[1] % k[1] == 0)
        if not fed:
            return FirstLayer("other", name, what + " that does not see the normalized image itself")
        if not patch:
            return FirstLayer("other", name, what + " (overlapping or padded windows, not a patch embedding)")
        grid = (image_size[0] // k[0], image_size[1] // k[1])
        return FirstLayer("patch_embedding", name, what + f" (patch embedding, {grid[0]}x{grid[1]} patches)",
                          weight=f"{name}.weight", bias=bias, patch=k[0], grid=grid, dim=module.out_channels)
    flat = normalized.flatten(1)
    if seen.dim() == 3 and seen.numel() == flat.numel():
        pixels = _permutation(seen.flatten(), flat.flatten())
        if pixels is not None:
            n, k = seen.shape[1:]
            return FirstLayer("patch_embedding", name, f"{name}: a linear layer on {n} patches of {k} pixel "
                              "values cut from the image (patch embedding)", weight=f"{name}.weight", bias=bias,
                              grid=(n, 1), dim=module.out_features, pixels=pixels)
    if seen.dim() == 2 and seen.shape == flat.shape and torch.allclose(seen, flat, atol=1e-5):
        return FirstLayer("dense", name, f"{name}: a dense layer on the flattened image "
                          f"({module.in_features} -> {module.out_features})", weight=f"{name}.weight",
                          bias=bias, dim=module.out_features)
    return FirstLayer("other", name, f"{name}: a linear layer that does not see the flattened image")


def _permutation(seen: torch.Tensor, image: torch.Tensor) -> torch.Tensor | None:
    """Where each entry of ``seen`` sits in ``image`` when one is a rearrangement of the other (the
    probe's pixel values are distinct, so sorting pairs them); None otherwise."""
    index = torch.empty_like(seen, dtype=torch.long)
    index[seen.argsort()] = image.argsort()
    return index if torch.allclose(seen, image[index], atol=1e-6) else None


def _additive_embedding(model: nn.Module, tokens: torch.Tensor, skip: set) -> tuple[str | None, int]:
    """The parameter whose gradient rows equal the patch tokens' gradient (an additive embedding)."""
    n, d = tokens.shape
    scale = tokens.norm()
    if scale == 0:
        return None, 0
    for pname, p in model.named_parameters():
        if pname in skip or p.grad is None or p.shape[-1] != d or p.numel() // d < n:
            continue
        rows = p.grad.reshape(-1, d)
        for offset in range(rows.shape[0] - n + 1):
            if (rows[offset:offset + n] - tokens).norm() <= ADDITIVE_TOLERANCE * scale:
                return pname, offset
    return None, 0
