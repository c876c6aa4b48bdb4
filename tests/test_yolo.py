"""YOLOv8-nano variants and the detection task loss (CPU, small images: 64/128 px, nc=3 mostly)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import suite  # noqa: F401  (offline defaults before ultralytics)
from suite.data.batch import Batch
from suite.errors import GistressError
from suite.model.batchnorm import frozen_bn_stats
from suite.model.detection import (
    detection_loss,
    eval_mode_requires_calibration,
    make_criterion,
    set_bn_mode,
    targets_for,
    validate_targets,
)
from variants.base import IDENTITY_NORM, lookup
from variants.yolo import (
    YAML_DIR,
    BasicBlock,
    C2fBasicBlock,
    C2fPreActBlock,
    PreActBlock,
    load_checkpoint,
)

NAMES = ("yolov8n", "yolov8n-basicblock", "yolov8n-preact")  # the same layout and parameter count
ALL = (*NAMES, "yolov8n-resnet")  # + the authors' ResNet-backbone YOLO (another layout)


@functools.cache
def _cached(name: str, nc: int):
    torch.manual_seed(0)  # what variants.build() does before calling the builder
    return lookup(name).builder(name=name, nc=nc)


def fresh(name: str = "yolov8n", nc: int = 3):
    """A private copy of a built variant (tests mutate weights and BN state)."""
    return copy.deepcopy(_cached(name, nc))


def make_batch(size: int = 64, n: int = 2, nc: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    s = size / 64
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]]) * s,
             torch.tensor([[10.0, 12.0, 50.0, 60.0]]) * s]
    classes = [torch.tensor([0, nc - 1]), torch.tensor([1 % nc])]
    return Batch(images=torch.rand(n, 3, size, size, generator=g), boxes=boxes[:n], classes=classes[:n],
                 ids=[f"img{i}" for i in range(n)])


def trainable(model: nn.Module) -> list[torch.Tensor]:
    # ultralytics freezes the DFL projection conv (requires_grad=False)
    return [p for p in model.parameters() if p.requires_grad]


def bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def calibrate_bn(model: nn.Module, images: torch.Tensor) -> None:
    """Running stats := statistics of one batch (momentum=None: cumulative average over one batch)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = None
        m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(images)
    for m, mom in zip(bns, saved):
        m.momentum = mom


# ----------------------------------------------------------------------------- variants


def test_yolov8n_param_count_and_fields():
    from ultralytics.nn.tasks import DetectionModel

    v = _cached("yolov8n", 80)
    assert v.num_params == 3_157_200
    assert isinstance(v.model, DetectionModel)
    assert (v.task, v.input_size, v.num_classes, v.normalization) == ("detection", 640, 80, IDENTITY_NORM)
    assert v.options == {"nc": 80, "pretrained_source": None}
    assert (v.model.args.box, v.model.args.cls, v.model.args.dfl) == (7.5, 0.5, 1.5)
    assert lookup("yolov8n").task == "detection" and lookup("yolov8n").input_size == 640


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("nc,size", [(80, 128), (3, 64)])
def test_variants_build_and_forward(name, nc, size):
    v = _cached(name, nc)
    assert v.num_classes == nc and v.model.model[-1].nc == nc
    # the custom blocks are parameter-for-parameter the size of a 3x3/3x3 Bottleneck
    assert v.num_params == _cached("yolov8n", nc).num_params
    model = copy.deepcopy(v.model).eval()
    with torch.no_grad():
        y, raw = model(torch.rand(1, 3, size, size))
    anchors = sum((size // s) ** 2 for s in (8, 16, 32))
    assert y.shape == (1, 4 + nc, anchors) and torch.isfinite(y).all()
    assert raw["scores"].shape == (1, nc, anchors)


def test_custom_variants_contain_their_blocks_only():
    from ultralytics.nn.modules.block import Bottleneck, C2f

    def count(model, cls):
        return sum(isinstance(m, cls) for m in model.modules())

    stock, basic, pre = (_cached(n, 3).model for n in NAMES)
    assert count(stock, Bottleneck) == 10 and count(stock, BasicBlock) == count(stock, PreActBlock) == 0
    assert count(basic, BasicBlock) == 10 and count(basic, Bottleneck) == 0 and count(basic, C2fBasicBlock) == 8
    assert count(pre, PreActBlock) == 10 and count(pre, Bottleneck) == 0 and count(pre, C2fPreActBlock) == 8
    assert count(basic, PreActBlock) == count(pre, BasicBlock) == 0
    # the C2f layers were parsed like C2f: width-scaled channels and depth-scaled repeats
    layer = basic.model[4]
    assert type(layer) is C2fBasicBlock and layer.cv1.conv.in_channels == 64 and layer.c == 32 and len(layer.m) == 2
    # ...while outside parse_model the classes are ordinary (not equal to C2f)
    assert C2fBasicBlock != C2f and len({C2f, C2fBasicBlock, C2fPreActBlock}) == 3


def test_resnet_backbone_yolo_is_the_authors_layout():
    """yolov8n-resnet: ResNet-18-like backbone (7x7 s2 stem + max-pool, 4 stages x 2 BasicBlocks),
    one-BasicBlock neck stages, stride-2 Convs and ultralytics' Detect head; nano widths."""
    from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
    from ultralytics.nn.modules.block import SPPF, C2f
    from ultralytics.nn.modules.head import Detect

    from variants.yolo import ResNetStage, ResNetStem

    v = _cached("yolov8n-resnet", 3)
    layers = list(v.model.model)
    assert type(layers[0]) is ResNetStem and layers[0].conv.kernel_size == (7, 7) and layers[0].conv.stride == (2, 2)
    stages = [m for m in layers if type(m) is ResNetStage]
    assert [len(m.blocks) for m in stages] == [2, 2, 2, 2, 1, 1, 1, 1]
    assert [m.blocks[-1].conv2.out_channels for m in stages] == [32, 64, 128, 256, 128, 64, 128, 256]
    assert sum(isinstance(m, TorchvisionBasicBlock) for m in v.model.modules()) == 12
    assert not any(isinstance(m, (C2f, SPPF)) for m in v.model.modules())
    head = layers[-1]
    assert type(head) is Detect and head.nc == 3 and head.stride.tolist() == [8.0, 16.0, 32.0]
    assert [seq[0].conv.in_channels for seq in head.cv2] == [64, 128, 256]
    model = copy.deepcopy(v.model).eval()
    with torch.no_grad():
        y, raw = model(torch.rand(1, 3, 64, 64))
    assert y.shape == (1, 4 + 3, sum((64 // s) ** 2 for s in (8, 16, 32))) and torch.isfinite(y).all()
    listed = {r["name"]: r for r in __import__("suite.cli.commands.variants", fromlist=["x"]).catalogue()}
    assert listed["yolov8n-resnet"]["params"] == _cached("yolov8n-resnet", 80).num_params


def test_ultralytics_parses_custom_yaml_directly():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(str(YAML_DIR / "yolov8n-preact.yaml"), nc=3, verbose=False)
    assert sum(p.numel() for p in model.parameters()) == _cached("yolov8n-preact", 3).num_params
    assert model.model[2].type == "variants.yolo.C2fPreActBlock"


def test_seeded_build_is_deterministic():
    torch.manual_seed(0)
    again = lookup("yolov8n-basicblock").builder(name="yolov8n-basicblock", nc=3).model.state_dict()
    ref = _cached("yolov8n-basicblock", 3).model.state_dict()
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def _call_order(block: nn.Module, x: torch.Tensor) -> list[str]:
    names = {m: n for n, m in block.named_children()}
    order, hooks = [], [m.register_forward_hook(lambda m, i, o: order.append(names[m])) for m in names]
    try:
        block(x)
    finally:
        for h in hooks:
            h.remove()
    return order


def test_block_structure():
    x = torch.randn(2, 8, 6, 6)
    basic, pre = BasicBlock(8, 8).eval(), PreActBlock(8, 8).eval()
    assert _call_order(basic, x) == ["conv1", "bn1", "act", "conv2", "bn2", "act"]
    assert _call_order(pre, x) == ["norm1", "act", "conv1", "norm2", "act", "conv2"]
    with torch.no_grad():
        basic.conv2.weight.zero_()
        pre.conv2.weight.zero_()
        # zero residual branch: ResNet block = act(x + 0) (act after the add); pre-act block = x exactly
        torch.testing.assert_close(basic(x), nn.functional.silu(x))
        torch.testing.assert_close(pre(x), x)


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", ALL)
def test_loss_matches_ultralytics(name):
    model = fresh(name).model
    batch = make_batch()
    targets = targets_for(batch, 3)
    ours = detection_loss(model, batch.images, targets, bn_mode="train")
    ref_vec, items = model.loss({"img": batch.images, **targets})
    assert ref_vec.shape == (3,)  # (box, cls, dfl) * gains * batch size; the trainer backprops .sum()
    torch.testing.assert_close(ours, ref_vec.sum())
    assert set(items) == {"box_loss", "cls_loss", "dfl_loss"}
    torch.testing.assert_close(torch.stack(list(items.values())) * len(batch), ref_vec.detach())


def test_gradient_matches_ultralytics():
    model = fresh().model
    batch = make_batch()
    targets = targets_for(batch, 3)
    params = trainable(model)
    g_ours = torch.autograd.grad(detection_loss(model, batch.images, targets), params)
    g_ref = torch.autograd.grad(model.loss({"img": batch.images, **targets})[0].sum(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    assert sum(a.abs().sum() for a in g_ours) > 0


def test_eval_mode_loss_matches_ultralytics_and_keeps_bn_stats():
    model = fresh().model
    batch = make_batch()
    calibrate_bn(model, batch.images)
    targets = targets_for(batch, 3)
    model.train()
    before = bn_buffers(model)
    loss = detection_loss(model, batch.images, targets, bn_mode="eval")
    assert torch.isfinite(loss) and loss > 0
    after = bn_buffers(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and model.model[-1].training  # flags restored (model was in train mode)
    model.eval()
    detection_loss(model, batch.images, targets, bn_mode="train", update_bn_stats=False)
    assert not model.training and not model.model[-1].training and not model.model[0].bn.training
    # ultralytics' own eval-mode loss (head returns (decoded, raw); the criterion takes raw)
    with torch.no_grad():
        ref = model.loss({"img": batch.images, **targets})[0].sum()
    torch.testing.assert_close(loss.detach(), ref)


def test_set_bn_mode_eval_keeps_training_format_head():
    model = fresh().model
    set_bn_mode(model, "eval")
    assert not model.model[0].bn.training and not model.model[-1].cv2[0][0].bn.training
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert isinstance(out, dict) and set(out) >= {"boxes", "scores", "feats"}  # not (decoded, raw)
    set_bn_mode(model, "train")
    assert model.training and model.model[0].bn.training
    with pytest.raises(GistressError, match="bn_mode"):
        set_bn_mode(model, "inference")


def test_train_mode_updates_bn_stats_unless_frozen():
    model = fresh().model
    batch = make_batch()
    targets = targets_for(batch, 3)
    params = trainable(model)
    start = bn_buffers(model)

    g_frozen = torch.autograd.grad(
        detection_loss(model, batch.images, targets, bn_mode="train", update_bn_stats=False), params)
    assert all(torch.equal(start[k], v) for k, v in bn_buffers(model).items())
    with frozen_bn_stats(model):
        detection_loss(model, batch.images, targets, bn_mode="train")
    assert all(torch.equal(start[k], v) for k, v in bn_buffers(model).items())
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    g_live = torch.autograd.grad(detection_loss(model, batch.images, targets, bn_mode="train"), params)
    changed = bn_buffers(model)
    assert not torch.equal(start["model.0.bn.running_mean"], changed["model.0.bn.running_mean"])
    assert int(changed["model.0.bn.num_batches_tracked"]) == int(start["model.0.bn.num_batches_tracked"]) + 1
    for a, b in zip(g_frozen, g_live):  # freezing the stats does not change the gradient
        torch.testing.assert_close(a, b)


def test_calibration_check():
    v = fresh()
    assert eval_mode_requires_calibration(v) and eval_mode_requires_calibration(v.model)
    calibrate_bn(v.model, make_batch().images)
    assert not eval_mode_requires_calibration(v)


def test_frozen_assignment_reused_and_guarded():
    model = fresh().model
    batch = make_batch()
    targets = targets_for(batch, 3)
    crit = make_criterion(model, freeze_assignment=True)
    live = detection_loss(model, batch.images, targets, criterion=crit, update_bn_stats=False)
    assert crit.assigner.recorded is not None
    again = detection_loss(model, batch.images, targets, criterion=crit, update_bn_stats=False)
    torch.testing.assert_close(live, again)
    other = targets_for(make_batch(seed=1, n=1), 3)
    with pytest.raises(GistressError, match="frozen assignment"):
        detection_loss(model, batch.images[:1], other | {"bboxes": other["bboxes"] * 0.5}, criterion=crit)


def test_double_backward_matches_finite_difference():
    """d/dx of a gradient-matching loss through all of YOLOv8n, checked against central differences.

    Frozen assignment + eval BN make the loss smooth in x. Residual mismatch of ~1.5e-4 relative is
    expected: ultralytics computes the CIoU aspect weight alpha under no_grad, so autograd ignores
    d(alpha)/dx while the finite difference sees it (with alpha differentiable the two agree to ~1e-8).
    """
    model = fresh().model
    g = torch.Generator().manual_seed(1)
    calibrate_bn(model, torch.rand(4, 3, 64, 64, generator=g))
    model.double()
    x = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    x_target = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    batch = Batch(images=x.float(), boxes=[torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 60.0, 30.0]])],
                  classes=[torch.tensor([0, 2])])
    targets = targets_for(batch, 3)
    crit = make_criterion(model, freeze_assignment=True)
    params = trainable(model)

    def flat_grad(img, create_graph=False):
        loss = detection_loss(model, img, targets, bn_mode="eval", criterion=crit)
        return torch.cat([q.flatten() for q in torch.autograd.grad(loss, params, create_graph=create_graph)])

    g_target = flat_grad(x_target).detach()

    def matching(img, create_graph=False):
        return 1 - nn.functional.cosine_similarity(flat_grad(img, create_graph), g_target, dim=0)

    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    v /= v.norm()
    xr = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(matching(xr, create_graph=True), xr)
    analytic = float((dx * v).sum())
    eps = 1e-5  # float64: truncation error ~eps^2, rounding ~1e-16/eps
    numeric = float(matching(x + eps * v) - matching(x - eps * v)) / (2 * eps)
    assert dx.abs().sum() > 0 and abs(analytic) > 1e-6
    assert abs(analytic - numeric) <= 1e-3 * abs(analytic), (analytic, numeric)


# ----------------------------------------------------------------------------- bad input


def test_bad_targets_raise():
    good = make_batch()
    validate_targets(good, 3)  # no error

    def with_boxes(boxes, classes):
        return Batch(images=good.images, boxes=boxes, classes=classes, ids=["a", "b"])

    one_cls = [torch.tensor([0]), good.classes[1]]
    outside = with_boxes([torch.tensor([[4.0, 6.0, 70.0, 50.0]]), good.boxes[1]], one_cls)
    with pytest.raises(GistressError, match="image a: box 0 .* outside the 64x64 image"):
        validate_targets(outside, 3)
    flat = with_boxes([torch.tensor([[4.0, 6.0, 4.0, 50.0]]), good.boxes[1]], one_cls)
    with pytest.raises(GistressError, match="image a: box 0 .* zero area"):
        validate_targets(flat, 3)
    big_cls = with_boxes(good.boxes, [good.classes[0], torch.tensor([3])])
    with pytest.raises(GistressError, match="image b: box 0 has class id 3, outside 0..2") as err:
        validate_targets(big_cls, 3)
    assert "nc=4" in err.value.hint
    neg_cls = with_boxes(good.boxes, [torch.tensor([-1, 0]), good.classes[1]])
    with pytest.raises(GistressError, match="class id -1"):
        validate_targets(neg_cls, 3)
    empty = with_boxes([good.boxes[0], torch.zeros(0, 4)], [good.classes[0], torch.zeros(0, dtype=torch.long)])
    with pytest.raises(GistressError, match="image b has no boxes"):
        validate_targets(empty, 3)
    with pytest.raises(GistressError, match="no boxes"):
        validate_targets(Batch(images=good.images, labels=torch.tensor([0, 1])), 3)


def test_detection_loss_rejects_bad_arguments():
    model = _cached("yolov8n", 3).model
    batch = make_batch()
    targets = batch.yolo_targets()
    with pytest.raises(GistressError, match="class ids span 0..5, the model has nc=3"):
        detection_loss(model, batch.images, targets | {"cls": targets["cls"] * 0 + 5 * (targets["cls"] > 0)})
    with pytest.raises(GistressError, match="bn_mode"):
        detection_loss(model, batch.images, targets, bn_mode="inference")
    with pytest.raises(GistressError, match="multiple of the model stride 32"):
        detection_loss(model, batch.images[..., :50, :50], targets)
    with pytest.raises(GistressError, match="keys batch_idx, cls, bboxes"):
        detection_loss(model, batch.images, {"cls": targets["cls"]})


# ----------------------------------------------------------------------------- checkpoints


def _perturbed(model: nn.Module) -> nn.Module:
    src = copy.deepcopy(model)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return src


def test_ultralytics_checkpoint_needs_trust_and_loads(tmp_path):
    src = _perturbed(_cached("yolov8n", 3).model)
    path = tmp_path / "last.pt"
    # what ultralytics' trainer writes: the EMA model in half precision plus bookkeeping
    torch.save({"epoch": 3, "best_fitness": None, "model": None, "ema": copy.deepcopy(src).half(),
                "updates": 10, "optimizer": None, "train_args": {"nc": 3}}, path)
    v = fresh("yolov8n", 3)
    with pytest.raises(GistressError, match="arbitrary code") as err:
        load_checkpoint(v, path)
    assert "--trust-checkpoint" in err.value.hint

    load_checkpoint(v, path, trust_checkpoint=True)
    want = copy.deepcopy(src).half().float().state_dict()
    got = v.model.state_dict()
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    assert v.model.model[0].conv.weight.dtype == torch.float32

    # a checkpoint with only "model" (float) loads the same way
    torch.save({"model": src}, tmp_path / "model_only.pt")
    v2 = load_checkpoint(fresh("yolov8n", 3), tmp_path / "model_only.pt", trust_checkpoint=True)
    assert torch.equal(v2.model.model[0].conv.weight, src.model[0].conv.weight)


def test_state_dict_loads_without_trust(tmp_path):
    src = _perturbed(_cached("yolov8n", 3).model)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    v = load_checkpoint(fresh("yolov8n", 3), tmp_path / "w.pt")
    assert torch.equal(v.model.model[22].cv3[0][2].weight, src.model[22].cv3[0][2].weight)


def test_checkpoint_mismatches(tmp_path):
    torch.save(_cached("yolov8n", 3).model.state_dict(), tmp_path / "nc3.pt")
    with pytest.raises(GistressError, match=r"checkpoint has 3 classes, variant has 80 \(pass nc=3\)"):
        load_checkpoint(copy.deepcopy(_cached("yolov8n", 80)), tmp_path / "nc3.pt")

    torch.save({"model": _cached("yolov8n-basicblock", 3).model}, tmp_path / "basic.pt")
    with pytest.raises(GistressError, match=r"does not match the 'yolov8n' architecture.*model\.2\.m\.0\."):
        load_checkpoint(fresh("yolov8n", 3), tmp_path / "basic.pt", trust_checkpoint=True)

    torch.save(_cached("yolov8n-preact", 3).model.state_dict(), tmp_path / "preact.pt")
    with pytest.raises(GistressError, match="missing: model.2.m.0.bn1.weight"):
        load_checkpoint(fresh("yolov8n-basicblock", 3), tmp_path / "preact.pt")

    with pytest.raises(GistressError, match="does not exist"):
        load_checkpoint(fresh("yolov8n", 3), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(GistressError, match="cannot be loaded with weights_only=True"):
        load_checkpoint(fresh("yolov8n", 3), tmp_path / "junk.pt")
    with pytest.raises(GistressError, match="not a readable torch checkpoint"):
        load_checkpoint(fresh("yolov8n", 3), tmp_path / "junk.pt", trust_checkpoint=True)


def test_resnet_yolo_as_leakpro_leaves_it_runs_in_eval_mode():
    """bn_init=leakpro: torchvision momenta in the ResNet blocks and one train-mode forward of a black
    image at build, as the authors' YOLORes does: every running mean 0, every running variance
    1 - momentum (33 layers at 0.9, 14 at 0.97). Eval mode is then what their Fig. 5(d) attacks,
    so the runner accepts it, as it accepts pristine 0/1 statistics (tagged by the run)."""
    import variants
    from suite.config import RunConfig
    from suite.execution.runner import build_and_load
    from suite.model.batchnorm import named_bn_layers

    model = variants.build("yolov8n-resnet", bn_init="leakpro").model
    stats = [(round(float(m.running_var.mean()), 4), float(m.running_mean.abs().max()), m.momentum)
             for _, m in named_bn_layers(model)]
    assert sorted(set(stats)) == [(0.9, 0.0, 0.1), (0.97, 0.0, 0.03)]
    assert [s[0] for s in stats].count(0.9) == 33 and [s[0] for s in stats].count(0.97) == 14
    leakpro = RunConfig(variant="yolov8n-resnet", variant_options={"bn_init": "leakpro"}, images=["bus"],
                        size=64, threat={"bn_mode": "eval"})
    variant, _, _ = build_and_load(leakpro)
    assert variant.options["bn_init"] == "leakpro"
    # pristine 0/1 statistics are allowed too (what inversefed attacks); the run's tag says so
    fresh, _, _ = build_and_load(RunConfig(variant="yolov8n-resnet", images=["bus"], size=64, threat={"bn_mode": "eval"}))
    assert eval_mode_requires_calibration(fresh) and not eval_mode_requires_calibration(variant)
    with pytest.raises(GistressError, match="bn_init='x' is not one of ultralytics, leakpro"):
        variants.build("yolov8n-resnet", bn_init="x")
