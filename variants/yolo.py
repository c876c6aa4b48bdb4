"""YOLOv8-nano family (stock, BasicBlock, pre-activation, ResNet backbone) as ultralytics DetectionModels,
and ``yolo-ref``, the small known-leaky detector the audit's detection positive controls run on.

Each variant is parsed by ultralytics' own ``parse_model`` from a YAML file in ``variants/yaml/``, so
the modules, the Detect head and ``v8DetectionLoss`` are the real ultralytics ones and a user's own
ultralytics ``yolov8n`` checkpoint loads into the stock variant (``load_checkpoint``).

How the custom blocks get through ``parse_model`` (ultralytics 8.4): module names resolve through
``globals()`` of ``ultralytics.nn.tasks``, so the classes are registered there by name. Channel
scaling and repeat handling, however, are decided by ``m in base_modules`` / ``m in repeat_modules``
(frozensets of classes, i.e. hash + ``==``), so a plain C2f subclass would fall through to the
"c2 = c1" branch. ``_ParsesAsC2f`` makes the classes hash like C2f and compare equal to C2f only
when the comparison is made by ``parse_model`` itself; everywhere else they are ordinary classes.
"""

from __future__ import annotations  # noqa: I001  (suite must be imported before ultralytics)

import sys
from pathlib import Path

import torch
from torch import nn

import suite  # noqa: F401  (YOLO_OFFLINE before ultralytics is imported)
from suite.errors import GistressError
from variants.base import IDENTITY_NORM, Variant, register
from variants.checkpoint import read_checkpoint
from variants.resnet import check_choice

from ultralytics.nn import tasks as _tasks
from ultralytics.nn.modules.block import C2f
from ultralytics.nn.modules.conv import Conv

YAML_DIR = Path(__file__).resolve().parent / "yaml"
LOSS_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}


def _parses_as(base: type) -> type:
    """A metaclass: the class is treated as ``base`` by ultralytics' parse_model, and only there
    (channel scaling, inserted input channels, repeats follow ``base``'s rules)."""

    class _ParsesAs(type):
        def __eq__(cls, other):
            if other is base:
                caller = sys._getframe(1)
                # set/frozenset membership compares from C, so the calling Python frame is parse_model
                return caller.f_code.co_name == "parse_model" and caller.f_globals.get("__name__") == _tasks.__name__
            return cls is other

        def __hash__(cls):
            # same bucket as ``base`` so that `m in base_modules` reaches __eq__ at all
            return hash(base)

    _ParsesAs.__name__ = f"_ParsesAs{base.__name__}"
    return _ParsesAs


_ParsesAsC2f = _parses_as(C2f)
_ParsesAsConv = _parses_as(Conv)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-act, conv3x3-BN, identity added, activation after the add.

    Submodules carry torchvision's ResNet names (conv1, bn1, conv2, bn2), so its state_dict keys differ
    from ultralytics' Bottleneck (cv1.conv, cv1.bn, ...): a checkpoint of one never loads into the other.
    """

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = nn.Conv2d(c2, c2, 3, 1, 1, groups=g, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.act = Conv.default_act  # the network's activation (SiLU unless the YAML sets one)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus identity, then the activation (as in ResNet)."""
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(x + y if self.add else y)


class PreActBlock(nn.Module):
    """Pre-activation residual block: BN-act-conv3x3, BN-act-conv3x3, identity added (no act after).

    Its BN layers are named norm1/norm2 so that its state_dict keys differ from BasicBlock's (the
    shapes are the same), and a checkpoint of one variant is rejected by the other.
    """

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c1)
        self.conv1 = nn.Conv2d(c1, c2, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c2)
        self.conv2 = nn.Conv2d(c2, c2, 3, 1, 1, groups=g, bias=False)
        self.act = Conv.default_act
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activated residual branch plus identity."""
        y = self.conv1(self.act(self.norm1(x)))
        y = self.conv2(self.act(self.norm2(y)))
        return x + y if self.add else y


class _C2fWithBlocks(C2f, metaclass=_ParsesAsC2f):
    """C2f whose n inner blocks are ``block`` instead of ultralytics' Bottleneck (same channels)."""

    block: type[nn.Module] = BasicBlock

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        # not super().__init__(): that would build (and draw random init for) Bottlenecks to throw away
        nn.Module.__init__(self)
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(self.block(self.c, self.c, shortcut, g) for _ in range(n))


class C2fBasicBlock(_C2fWithBlocks):
    """C2f with ResNet BasicBlocks (forward is C2f's: split, chain the blocks, concat, 1x1 conv)."""

    block = BasicBlock


class C2fPreActBlock(_C2fWithBlocks):
    """C2f with pre-activation residual blocks."""

    block = PreActBlock


class ResNetStem(nn.Module, metaclass=_ParsesAsConv):
    """ResNet's stem: 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool (output at stride 4).

    parse_model treats it like Conv: args [c2] become [c1, c2 * width].
    """

    def __init__(self, c1: int, c2: int):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, 7, 2, 3, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Stem conv, then max-pool."""
        return self.pool(self.act(self.bn(self.conv(x))))


class ResNetStage(nn.Module, metaclass=_ParsesAsConv):
    """A ResNet stage: ``blocks`` torchvision BasicBlocks, the first with ``stride`` and a 1x1 conv + BN
    projection shortcut when the shape changes (as torchvision's ``_make_layer``).

    parse_model treats it like Conv: YAML args [c2, blocks, stride] become [c1, c2 * width, blocks, stride].
    """

    def __init__(self, c1: int, c2: int, blocks: int = 2, stride: int = 1):
        super().__init__()
        from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

        down = None
        if stride != 1 or c1 != c2:
            down = nn.Sequential(nn.Conv2d(c1, c2, 1, stride, bias=False), nn.BatchNorm2d(c2))
        layers = [TorchvisionBasicBlock(c1, c2, stride=stride, downsample=down)]
        layers += [TorchvisionBasicBlock(c2, c2) for _ in range(1, blocks)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's blocks in order."""
        return self.blocks(x)


CUSTOM_MODULES = (C2fBasicBlock, C2fPreActBlock, ResNetStem, ResNetStage)
for _cls in CUSTOM_MODULES:
    # parse_model resolves YAML module names with globals()[name] in ultralytics.nn.tasks
    if getattr(_tasks, _cls.__name__, _cls) is not _cls:
        raise ImportError(f"ultralytics.nn.tasks already defines {_cls.__name__}; rename the gistress block")
    setattr(_tasks, _cls.__name__, _cls)


def detection_args():
    """A full ultralytics cfg namespace (what ``v8DetectionLoss`` reads as ``model.args``)."""
    from ultralytics.cfg import get_cfg

    return get_cfg(overrides=dict(LOSS_GAINS))


def build_detection_model(yaml_name: str, nc: int = 80):
    """Parse ``variants/yaml/<yaml_name>.yaml`` with ultralytics into a ``DetectionModel``."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise GistressError(f"nc must be a positive integer, got {nc!r}", "pass nc=<number of classes>, e.g. nc=80")
    path = YAML_DIR / f"{yaml_name}.yaml"
    if not path.is_file():
        raise GistressError(f"no YOLO architecture file {path}", f"add variants/yaml/{yaml_name}.yaml")
    cfg = yaml_model_load(path)
    model = DetectionModel(cfg, ch=3, nc=nc, verbose=False)
    model.args = detection_args()
    return model


def _variant(name: str, yaml_name: str, nc: int) -> Variant:
    model = build_detection_model(yaml_name, nc)
    return Variant(
        name=name,
        model=model,
        task="detection",
        input_size=640,
        normalization=IDENTITY_NORM,  # DetectionModel takes [0, 1] images
        num_classes=nc,
        options={"nc": nc, "pretrained_source": None},
    )


@register("yolov8n", "detection", 640, "YOLOv8-nano (ultralytics layout, 3.16M params at nc=80)")
def yolov8n(name: str = "yolov8n", nc: int = 80) -> Variant:
    """Stock YOLOv8-nano; accepts a user's own ultralytics yolov8n checkpoint."""
    return _variant(name, "yolov8n", nc)


@register(
    "yolov8n-basicblock",
    "detection",
    640,
    "YOLOv8-nano with ResNet BasicBlocks in every C2f (conv-BN-act-conv-BN + identity, act after add)",
)
def yolov8n_basicblock(name: str = "yolov8n-basicblock", nc: int = 80) -> Variant:
    """YOLOv8-nano whose C2f Bottlenecks are ResNet BasicBlocks."""
    return _variant(name, "yolov8n-basicblock", nc)


@register(
    "yolov8n-preact",
    "detection",
    640,
    "YOLOv8-nano with pre-activation blocks in every C2f (BN-act-conv-BN-act-conv + identity)",
)
def yolov8n_preact(name: str = "yolov8n-preact", nc: int = 80) -> Variant:
    """YOLOv8-nano whose C2f Bottlenecks are pre-activation residual blocks."""
    return _variant(name, "yolov8n-preact", nc)


@register(
    "yolov8n-resnet",
    "detection",
    640,
    "YOLOv8-nano with a ResNet-18-like backbone and one-BasicBlock neck stages (the first paper's authors' "
    "'BasicBlock' YOLO)",
)
def yolov8n_resnet(name: str = "yolov8n-resnet", nc: int = 80, bn_init: str = "ultralytics") -> Variant:
    """The first paper's authors' "BasicBlock" YOLOv8-nano (their ``yolo_v8_n_basicblock``): the whole
    DarkNet backbone replaced by a ResNet-18-like one (7x7 stride-2 stem, max-pool, four stages of two
    BasicBlocks), each neck C2f replaced by a single BasicBlock with a projection shortcut, the Detect
    head unchanged; nano widths 16-32-64-128-256.

    ``bn_init="leakpro"`` leaves the random model's BN layers as the authors' code leaves them: the
    ResNet blocks with torchvision's BN defaults (momentum 0.1, eps 1e-5) instead of ultralytics'
    (0.03, 1e-3), and one train-mode forward of a black 256 px image at build (their ``YOLORes``
    computes its strides that way), which moves every running variance to 1 - momentum (0.9 or
    0.97) and keeps the means at 0. Their Fig. 5(d) attacks that model in eval mode."""
    check_choice("bn_init", bn_init, ("ultralytics", "leakpro"), name)
    variant = _variant(name, "yolov8n-resnet", nc)
    if bn_init == "leakpro":
        model = variant.model
        for module in model.modules():
            if isinstance(module, (ResNetStem, ResNetStage)):
                for bn in module.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.momentum, bn.eps = 0.1, 1e-5
        model.train()
        with torch.no_grad():
            model(torch.zeros(1, 3, 256, 256))
        variant.options["bn_init"] = bn_init
    return variant


REF_INPUT_SIZE = 32  # the positive controls letterbox the audited images to this size
REF_ACTIVATIONS = {"sigmoid": "nn.Sigmoid()", "silu": "nn.SiLU()", "tanh": "nn.Tanh()", "relu": "nn.ReLU()"}


def _without_bn(model: nn.Module) -> None:
    """Every ultralytics Conv (the Detect head's included) as convolution + bias + activation: its
    BN layer becomes the identity and the convolution gets a bias (as ultralytics' fused models)."""
    for m in model.modules():
        if isinstance(m, Conv):
            m.bn = nn.Identity()
            if m.conv.bias is None:
                m.conv.bias = nn.Parameter(torch.zeros(m.conv.out_channels))


def build_reference_model(nc: int = 80, act: str = "tanh", bn: bool = False, init_range: float | None = 0.07,
                          width: int = 256):
    """The ``yolo-ref`` DetectionModel (``variants/yaml/yolo-ref.yaml``) with its options applied:
    ``act`` every Conv's activation, ``bn`` keep the BN layers, ``init_range`` r: every weight and
    bias drawn from U(-r, r) as DLG's LeNet (None: ultralytics' own init), ``width`` backbone channels.
    The defaults are the measured reference (docs/audit.md, "Positive controls")."""
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    if act not in REF_ACTIVATIONS:
        raise GistressError(f"unknown act '{act}'", f"use one of: {', '.join(REF_ACTIVATIONS)}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise GistressError(f"width must be a positive integer, got {width!r}", "e.g. width=256")
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise GistressError(f"nc must be a positive integer, got {nc!r}", "pass nc=<number of classes>, e.g. nc=80")
    cfg = yaml_model_load(YAML_DIR / "yolo-ref.yaml")
    cfg["activation"] = REF_ACTIVATIONS[act]
    cfg["backbone"] = [[f, n, m, [width, *args[1:]]] for f, n, m, args in cfg["backbone"]]
    model = DetectionModel(cfg, ch=3, nc=nc, verbose=False)
    if not bn:
        _without_bn(model)
    if init_range is not None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:  # DFL's fixed projection stays
                nn.init.uniform_(m.weight, -init_range, init_range)
                if m.bias is not None:
                    nn.init.uniform_(m.bias, -init_range, init_range)
    model.args = detection_args()
    return model


@register(
    "yolo-ref",
    "detection",
    REF_INPUT_SIZE,
    "detection positive-control reference: 3 tanh 5x5 convs (256 ch), no BN, U(-0.07, 0.07), real Detect head (P3)",
)
def yolo_ref(name: str = "yolo-ref", nc: int = 80, act: str = "tanh", bn: bool = False,
             init_range: float | None = 0.07, width: int = 256) -> Variant:
    """The known-leaky detector of the audit's detection positive controls: a DLG-style backbone
    (smooth activation, no BN, uniform init, no weights to load) with ultralytics' real Detect head
    and v8DetectionLoss; ``ig`` and ``gia_bn`` invert it at 32 px in 100 iterations."""
    model = build_reference_model(nc, act, bn, init_range, width)
    return Variant(name=name, model=model, task="detection", input_size=REF_INPUT_SIZE, normalization=IDENTITY_NORM,
                   num_classes=nc, options={"nc": nc, "act": act, "bn": bn, "init_range": init_range,
                                            "width": width, "pretrained_source": None})


# ----------------------------------------------------------------------------- checkpoints


def _detect_nc(state: dict, model: nn.Module) -> int | None:
    """Number of classes stored in a DetectionModel state_dict (the last cls-head conv's rows)."""
    key = f"model.{len(model.model) - 1}.cv3.0.2.weight"
    return int(state[key].shape[0]) if key in state and hasattr(state[key], "shape") else None


def _state_from_object(obj, path: Path) -> dict:
    """The float state_dict held by a loaded checkpoint object."""
    if isinstance(obj, nn.Module):
        return obj.float().state_dict()
    if isinstance(obj, dict):
        # ultralytics saves {"model": ..., "ema": ...}; like ultralytics, prefer the EMA weights
        module = obj.get("ema") if obj.get("ema") is not None else obj.get("model")
        if isinstance(module, nn.Module):
            return module.float().state_dict()
        if isinstance(module, dict):
            return module
        if obj and all(torch.is_tensor(v) for v in obj.values()):
            return obj  # a plain state_dict
    raise GistressError(
        f"{path} holds neither a state_dict nor an ultralytics checkpoint (a dict with 'model' or 'ema')",
        "save weights with torch.save(model.state_dict(), path) or use a checkpoint written by ultralytics",
    )


def load_checkpoint(variant: Variant, path: str | Path, trust_checkpoint: bool = False) -> Variant:
    """Load weights from ``path`` into a YOLO variant's DetectionModel (in place) and return the variant.

    The file is read by ``variants.checkpoint.read_checkpoint``: a plain state_dict loads with
    ``weights_only=True``; an ultralytics checkpoint (a pickled dict whose "model"/"ema" is a
    DetectionModel) needs full unpickling, which can run arbitrary code, so it is loaded only with
    ``trust_checkpoint=True``. Class-count and architecture mismatches are errors.
    """
    if variant.task != "detection" or not hasattr(variant.model, "init_criterion"):
        raise GistressError(f"'{variant.name}' is not a YOLO detection variant",
                            "load ultralytics checkpoints into yolov8n (or its basicblock/preact variants)")
    path = Path(path)
    obj = read_checkpoint(path, trust_checkpoint)
    state = _state_from_object(obj, path)
    model = variant.model
    own = model.state_dict()
    theirs_nc, own_nc = _detect_nc(state, model), _detect_nc(own, model)
    if theirs_nc is not None and own_nc is not None and theirs_nc != own_nc:
        raise GistressError(
            f"checkpoint has {theirs_nc} classes, variant has {own_nc} (pass nc={theirs_nc})",
            f"build '{variant.name}' with nc={theirs_nc}",
        )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong_shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})")
        raise GistressError(
            f"checkpoint {path.name} does not match the '{variant.name}' architecture ({'; '.join(parts)})",
            "load it into the variant it was trained as (yolov8n, yolov8n-basicblock or yolov8n-preact)",
        )
    model.load_state_dict(state, strict=True)
    variant.weights = f"file:{path}"
    return variant
