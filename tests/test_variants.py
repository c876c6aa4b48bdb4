"""Variant registry, architectures (non-YOLO), external models and weights handling.

Kept small for 2 shared CPU cores: 224 px appears in one forward pass only; the modern models'
reference sizes are checked by counting parameters on the meta device.
"""

from __future__ import annotations

import operator
import os
import time

import pytest
import torch
import torch.nn.functional as F
from torch.fx import symbolic_trace
from torch.nn.attention import SDPBackend, sdpa_kernel

from suite.errors import GistressError
from variants import build
from variants import weights as W
from variants.base import CIFAR_MEAN, CIFAR_STD, IDENTITY_NORM, IMAGENET_MEAN, Normalized
from variants.listing import describe, describe_all


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(GistressError) as info:
        fn(*args, **kwargs)
    return info.value.one_line()


def _adds(model) -> int:
    """Number of tensor additions in the traced forward graph (one per identity shortcut)."""
    graph = symbolic_trace(model).graph
    return sum(
        1 for n in graph.nodes if n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)
    )


def _same_params(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- registry and options


def test_unknown_variant_suggests_close_match():
    assert "resnet18" in _error(build, "resnet19")


def test_unknown_option_names_valid_options():
    msg = _error(build, "resnet18", stme="cifar")
    assert "stme" in msg and "stem" in msg and "cut_skips" in msg


@pytest.mark.parametrize(
    "name, options, expected",
    [
        ("convnet", dict(activation="relux"), "relu"),
        ("convnet", dict(pooling="avg"), "max"),
        ("resnet18", dict(stem="cifar10"), "cifar"),
        ("resnet18", dict(cut_skips=[8]), "0..7"),
        ("resnet18", dict(width=0), "positive"),
        ("convnet", dict(kernel_size=9, padding=0), "padding"),
    ],
)
def test_bad_option_values_are_clear_errors(name, options, expected):
    assert expected in _error(build, name, **options)


# ---------------------------------------------------------------- reference sizes


def test_resnet18_matches_torchvision_exactly():
    import torchvision

    v = build("resnet18")
    assert v.num_params == 11_689_512
    assert (v.input_size, v.num_classes, v.normalization[0]) == (224, 1000, IMAGENET_MEAN)
    assert v.options["pretrained_source"] == "torchvision:resnet18"
    # same names and shapes as torchvision, so its ImageNet checkpoint loads unchanged
    ref = {k: t.shape for k, t in torchvision.models.resnet18().state_dict().items()}
    assert {k: t.shape for k, t in v.model.net.state_dict().items()} == ref
    out = v.model.eval()(torch.rand(1, 3, 224, 224))  # the one 224 px forward of this file
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name, reference",
    [("resnet34", 21.8e6), ("vit_b_16", 86.6e6), ("swin_t", 28.3e6), ("convnext_t", 28.6e6), ("maxvit_t", 30.9e6)],
)
def test_reference_parameter_counts(name, reference):
    info = describe(name)  # counted on the meta device
    assert abs(info["params"] - reference) <= 0.05e6
    assert info["input_size"] == 224 and info["task"] == "classification"


def test_modern_imagenet_configs_use_their_pretrained_statistics():
    with torch.device("meta"):
        vit = build("vit_b_16")
        swin = build("swin_t")
    assert vit.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert vit.options["pretrained_source"] == "timm:vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert swin.normalization[0] == IMAGENET_MEAN
    assert swin.options["pretrained_source"] == "timm:swin_tiny_patch4_window7_224.ms_in1k"


def test_describe_all_lists_every_family():
    rows = {r["name"]: r for r in describe_all()}
    for name in ("resnet18", "preact_resnet34", "convnet", "lenet", "vit_b_16", "maxvit_t"):
        assert rows[name]["params"] > 0 and rows[name]["description"]
    assert rows["lenet"]["params"] == 3 * 12 * 25 + 12 + 2 * (12 * 12 * 25 + 12) + 768 * 10 + 10
    assert list(rows)[:4] == ["resnet18", "resnet34", "preact_resnet18", "preact_resnet34"]


def test_catalogue_that_gistress_variants_reads_matches_the_registry(tmp_path):
    """`gistress variants` reads variants/catalogue.json (no torch import); it must be what a
    fresh build of every registered variant says (regenerate: python -m variants.listing)."""
    import json

    from suite.cli.commands.variants import catalogue
    from variants.listing import write_catalogue

    fresh = json.loads(write_catalogue(tmp_path / "catalogue.json").read_text())
    assert catalogue() == fresh, "variants/catalogue.json is stale: run `python -m variants.listing`"


# ---------------------------------------------------------------- small variants: forward passes

SMALL = [
    ("resnet18", dict(stem="cifar"), 10),
    ("resnet34", dict(stem="cifar", num_classes=100), 100),
    ("preact_resnet18", dict(stem="cifar", width=128), 10),
    ("preact_resnet34", dict(stem="cifar"), 10),
    ("convnet", {}, 10),
    ("convnet", dict(activation="none", pooling="none"), 10),
    ("convnet", dict(activation="sigmoid", dropout=0.5, bias=False), 10),
    ("convnet", dict(activation="gelu", kernel_size=5, padding=1, batchnorm=True), 10),
    ("convnet", dict(activation="leaky_relu", kernel_size=1, padding=2, width=8, num_classes=4), 4),
    ("lenet", {}, 10),
]


@pytest.mark.parametrize("name, options, classes", SMALL)
def test_small_variant_forward(name, options, classes):
    v = build(name, **options)
    assert isinstance(v.model, Normalized) and v.input_size == 32 and v.num_classes == classes
    assert v.options["pretrained_source"] is None
    out = v.model.train()(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


def test_cifar_stem_keeps_full_resolution_and_width():
    v = build("preact_resnet18", stem="cifar", width=128)
    assert v.normalization == (CIFAR_MEAN, CIFAR_STD)
    seen = {}
    v.model.net.layer1.register_forward_hook(lambda m, i, o: seen.update(l1=o.shape))
    v.model.net.layer4.register_forward_hook(lambda m, i, o: seen.update(l4=o.shape))
    with torch.no_grad():
        v.model(torch.rand(1, 3, 32, 32))
    assert seen["l1"] == (1, 128, 32, 32) and seen["l4"] == (1, 1024, 4, 4)


def test_convnet_knobs_change_the_network():
    std = build("convnet")
    kinds = {type(m).__name__ for m in std.model.modules()}
    assert {"ReLU", "MaxPool2d", "Dropout"} <= kinds and "BatchNorm2d" not in kinds
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in std.model.modules()) == 2
    convs = [m for m in std.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs)
    bare = build("convnet", activation="none", pooling="none", bias=False)
    kinds = {type(m).__name__ for m in bare.model.modules()}
    assert "ReLU" not in kinds and "MaxPool2d" not in kinds
    assert all(m.bias is None for m in bare.model.modules() if isinstance(m, torch.nn.Conv2d))


def test_lenet_is_dlg_lenet():
    v = build("lenet", num_classes=100)
    assert v.normalization == IDENTITY_NORM and v.model.net.fc.in_features == 768
    params = torch.cat([p.flatten() for p in v.model.parameters()])
    # U(-0.5, 0.5) everywhere, far wider than PyTorch's default init
    assert params.abs().max() <= 0.5 and params.abs().max() > 0.45
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in v.model.modules()) == 3


def test_preact_blocks_are_identity_when_the_residual_is_zero():
    x = torch.randn(1, 64, 8, 8)
    pre = build("preact_resnet18", stem="cifar").model.net.layer1[0]
    post = build("resnet18", stem="cifar").model.net.layer1[0]
    with torch.no_grad():
        for block in (pre, post):
            block.conv2.weight.zero_()
            block.eval()
    # pre-activation: nothing after the addition; post-activation: ReLU after it
    assert torch.allclose(pre(x), x)
    assert torch.allclose(post(x), torch.relu(x))
    net = build("preact_resnet18", stem="cifar").model.net
    assert not hasattr(net, "bn1") and hasattr(net, "bn_final")


# ---------------------------------------------------------------- skip-connection cuts


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
def test_cut_skips_removes_identity_additions(name):
    full = build(name, stem="cifar")
    assert _adds(full.model) == 8
    assert _adds(build(name, stem="cifar", cut_skips=[0, 2]).model) == 6
    assert _adds(build(name, stem="cifar", cut_skips="all").model) == 0
    resnet34 = name.replace("18", "34")
    assert _adds(build(resnet34, stem="cifar", cut_skips="all").model) == 0


def test_cut_skips_changes_the_function_and_drops_projections():
    full = build("resnet18", stem="cifar")
    cut0 = build("resnet18", stem="cifar", cut_skips=[0])
    cut0.model.load_state_dict(full.model.state_dict())  # block 0 has no projection: same params
    x = torch.rand(2, 3, 32, 32)
    full.model.eval(), cut0.model.eval()
    assert not torch.allclose(full.model(x), cut0.model(x))
    cut2 = build("resnet18", stem="cifar", cut_skips="2")  # first block of layer2 downsamples
    assert cut2.model.net.layer2[0].downsample is None and full.model.net.layer2[0].downsample is not None
    assert cut2.num_params < full.num_params
    assert cut2.options["cut_skips"] == [2] and cut2.options["pretrained_source"] is None


# ---------------------------------------------------------------- modern models at 32 px


def _attack_step(model, x, y, only=None):
    """One gradient-inversion step: the gradient-matching loss differentiated w.r.t. the input.

    ``only`` restricts the shared gradient to parameters whose names start with one of these
    prefixes (still a double backward through the whole network when the first layer is in).
    """
    params = [p for n, p in model.named_parameters() if only is None or n.startswith(only)]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    sum((g**2).sum() for g in grads).backward()
    return x.grad


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "convnext_t", "maxvit_t"])
def test_modern_cifar_config_survives_an_attack_step(name):
    v = build(name, stem="cifar")
    assert (v.input_size, v.num_classes, v.normalization) == (32, 10, (CIFAR_MEAN, CIFAR_STD))
    assert v.options["pretrained_source"] is None
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    # ViT-B's full 86M-parameter second-order step costs ~10x the rest; the patch embedding and
    # head still force the double backward through all twelve attention blocks
    only = ("net.patch_embed", "net.head") if name == "vit_b_16" else None
    with sdpa_kernel(SDPBackend.MATH):
        assert v.model.train()(x).shape == (1, 10)
        grad = _attack_step(v.model, x, torch.tensor([3]), only)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ---------------------------------------------------------------- external models


def test_timm_external_builds():
    v = build("timm:resnet10t", num_classes=5)
    assert v.num_classes == 5 and v.task == "classification" and isinstance(v.model, Normalized)
    assert v.input_size == 176 and v.normalization[0] == IMAGENET_MEAN
    assert v.options["pretrained_source"] == "timm:resnet10t.c3_in1k"
    assert v.model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 5)


def test_torchvision_external_builds():
    v = build("torchvision:mobilenet_v3_small", num_classes=3)
    assert (v.input_size, v.num_classes) == (224, 3)
    assert v.model.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    "name, expected",
    [("torchvision:resnet181", "resnet18"), ("timm:resnet10x", "resnet10t"), ("keras:resnet18", "timm:")],
)
def test_unknown_external_models(name, expected):
    assert expected in _error(build, name)


def test_external_bad_option_is_a_clear_error():
    assert "colour" in _error(build, "torchvision:resnet18", colour=1)


# ---------------------------------------------------------------- weights: specs and files


@pytest.mark.parametrize("spec", ["pretrianed", "file:", "", None, "ranom"])
def test_bad_weights_specs(spec):
    msg = _error(W.check_weights_spec, spec)
    assert "random" in msg and "file:<path" in msg


def test_weights_spec_accepts_the_four_kinds():
    for spec in ("random", "calibrated", "pretrained", "file:/x.pt"):
        assert W.check_weights_spec(spec) == spec


@pytest.mark.parametrize("form", ["wrapped_keys", "bare_keys", "state_dict_entry", "model_state_entry"])
def test_file_round_trip(tmp_path, form):
    src = build("lenet", seed=1)
    saved = {
        "wrapped_keys": src.model.state_dict(),
        "bare_keys": src.model.net.state_dict(),
        "state_dict_entry": {"state_dict": src.model.state_dict(), "epoch": 3},
        "model_state_entry": {"model_state": src.model.net.state_dict()},
    }[form]
    path = tmp_path / "w.pt"
    torch.save(saved, path)
    assert not _same_params(build("lenet", seed=2).model, src.model)
    loaded = build("lenet", seed=2, weights=f"file:{path}")
    assert _same_params(loaded.model, src.model) and loaded.weights == f"file:{path}"


def test_file_class_count_mismatch(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build("resnet18", stem="cifar").model.state_dict(), path)
    msg = _error(build, "resnet18", stem="cifar", num_classes=100, weights=f"file:{path}")
    assert "checkpoint has 10 classes, variant has 100" in msg and "num_classes=10" in msg


def test_file_for_another_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(build("lenet").model.state_dict(), path)
    msg = _error(build, "convnet", weights=f"file:{path}")
    assert "another architecture" in msg and "body.0.weight" in msg
    torch.save(build("resnet18", stem="cifar", width=16).model.state_dict(), path)
    assert "another architecture" in _error(build, "resnet18", stem="cifar", weights=f"file:{path}")


def test_full_module_needs_trust(tmp_path):
    src = build("lenet", seed=3)
    path = tmp_path / "full.pt"
    torch.save(src.model, path)
    msg = _error(build, "lenet", weights=f"file:{path}")
    assert "--trust-checkpoint" in msg and "trust" in msg
    trusted = build("lenet", weights=f"file:{path}", trust_checkpoint=True)
    assert _same_params(trusted.model, src.model)


def test_missing_and_unreadable_files(tmp_path):
    assert "not found" in _error(build, "lenet", weights=f"file:{tmp_path / 'nope.pt'}")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert "cannot read checkpoint" in _error(build, "lenet", weights=f"file:{junk}")


# ---------------------------------------------------------------- weights: pretrained caches


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_pretrained_offline_miss_is_fast_and_names_the_path(empty_caches):
    start = time.perf_counter()
    msg = _error(build, "resnet18", weights="pretrained")
    expected = os.path.join(str(empty_caches / "torch"), "hub", "checkpoints", "resnet18-f37072fd.pth")
    assert expected in msg
    msg = _error(build, "convnext_t", weights="pretrained")
    assert str(empty_caches / "hf" / "hub") in msg and "timm/convnext_tiny.in12k_ft_in1k" in msg
    msg = _error(build, "timm:resnet10t", weights="pretrained")
    assert "timm/resnet10t.c3_in1k" in msg
    assert "resnet18-f37072fd.pth" in _error(build, "torchvision:resnet18", weights="pretrained")
    assert time.perf_counter() - start < 20  # seconds, builds included: no download, no retry loop


def test_pretrained_without_published_weights(empty_caches):
    assert "no pretrained weights exist" in _error(build, "lenet", weights="pretrained")
    assert "no pretrained weights exist" in _error(build, "resnet18", stem="cifar", weights="pretrained")
    assert "no pretrained weights exist" in _error(build, "vit_b_16", stem="cifar", weights="pretrained")


def test_pretrained_torchvision_from_cache(empty_caches):
    reference = build("resnet18", seed=5)
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.model.net.state_dict(), folder / "resnet18-f37072fd.pth")
    v = build("resnet18", weights="pretrained")
    assert v.weights == "pretrained" and _same_params(v.model, reference.model)
    # another class count keeps the trunk and a fresh head
    v10 = build("resnet18", num_classes=10, weights="pretrained")
    assert torch.equal(v10.model.net.conv1.weight, reference.model.net.conv1.weight)
    assert v10.model.net.fc.weight.shape == (10, 512)


def test_pretrained_timm_from_hf_cache(empty_caches):
    from safetensors.torch import save_file

    reference = build("timm:resnet10t", seed=7)
    repo = empty_caches / "hf" / "hub" / "models--timm--resnet10t.c3_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(reference.model.net.state_dict(), str(snapshot / "model.safetensors"))
    v = build("timm:resnet10t", weights="pretrained")
    assert v.weights == "pretrained" and _same_params(v.model, reference.model)


# ---------------------------------------------------------------- BN calibration


def test_calibrate_bn_estimates_statistics_on_the_data():
    v = build("resnet18", stem="cifar")
    bn = v.model.net.bn1
    assert torch.all(bn.running_mean == 0)
    v.model.eval()
    # a flat grey image: every augmented view is the same, so the cumulative average must equal
    # the batch statistics exactly (an exponential average from zero would undershoot)
    image = torch.full((1, 3, 32, 32), 0.3)
    W.calibrate_bn(v, image, batches=3)
    with torch.no_grad():
        feats = v.model.net.conv1(v.to_normalized(image))
    assert torch.allclose(bn.running_mean, feats.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and not v.model.training and v.weights == "calibrated"
    assert all(not m.training for m in v.model.modules())


def test_calibrated_eval_outputs_depend_on_the_input():
    v = build("preact_resnet18", stem="cifar")
    images = torch.rand(2, 3, 32, 32)
    v.model.train()
    W.calibrate_bn(v, images[:1], seed=1)
    assert v.model.training  # the previous mode comes back
    first = v.model.net.layer1[0].bn1
    assert first.running_mean.abs().sum() > 0 and first.num_batches_tracked == 4
    v.model.eval()
    with torch.no_grad():
        a, b = v.model(images)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


def test_calibrate_bn_is_deterministic_and_leaves_global_rng():
    images = torch.rand(1, 3, 32, 32)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        v = W.calibrate_bn(build("resnet18", stem="cifar"), images, seed=4)
        runs.append((v.model.net.layer2[0].bn1.running_var.clone(), torch.rand(1)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_calibrate_without_bn_and_bad_images():
    v = build("lenet")
    before = {k: t.clone() for k, t in v.model.state_dict().items()}
    W.calibrate_bn(v, torch.rand(1, 3, 32, 32))
    assert v.weights == "calibrated" and all(torch.equal(before[k], t) for k, t in v.model.state_dict().items())
    assert "(B, 3, H, W)" in _error(W.calibrate_bn, v, torch.rand(3, 32, 32))
    assert "positive" in _error(W.calibrate_bn, v, torch.rand(1, 3, 32, 32), batches=0)


def test_calibrate_detection_model():
    v = build("yolov8n")  # ultralytics is a dependency: a YOLO that does not build is a failure
    v.model.eval()
    W.calibrate_bn(v, torch.rand(1, 3, 64, 64), batches=1, views=2)
    bn = next(m for m in v.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.running_mean.abs().sum() > 0 and not v.model.training
