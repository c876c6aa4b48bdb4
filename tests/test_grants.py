"""Honest grants: whatever the attacker gets from the target is named, logged and counted in
the assumption level, or refused."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from suite.config import RunConfig
from suite.errors import GistressError


def test_calibrating_bn_on_the_attacked_images_themselves_is_refused(tmp_path):
    """A source with only the target image would calibrate eval-mode BN on the target's own
    statistics (exact-statistics access reported as realistic): refused, naming the fix."""
    from suite.execution.runner import prepare_setting

    root = tmp_path / "one"
    (root / "cls").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(root / "cls" / "a.png")
    cfg = RunConfig(variant="resnet18", variant_options={"stem": "cifar"}, weights="calibrated",
                    data=f"imagefolder:{root}", images=["0"], size=32, device="cpu", threat={"bn_mode": "eval"})
    with pytest.raises(GistressError) as err:
        prepare_setting(cfg)
    line = err.value.one_line()
    assert "weights=calibrated needs images other than the attacked ones" in line
    assert "exact batch statistics" in line and "--weights file:" in line


def test_calibration_uses_other_images_of_the_source_and_says_which():
    from suite import data
    from suite.execution.runner import calibration_images

    cfg = RunConfig(variant="resnet18", images=["astronaut"], size=32)
    targets = data.load("samples", task="classification", size=32, images=["astronaut"], num_classes=10)
    pool, said = calibration_images(cfg, "classification", 32, targets)
    assert "astronaut" not in said and said.startswith("other images of the source: ") and len(pool) >= 2


def test_detection_boxes_are_a_batch_grant_at_sok_level_4():
    realistic = RunConfig(variant="yolov8n", attack={"preset": "ig"})
    assert realistic.assumption_level("detection") == 4
    assert realistic.assumption_level() == 4  # the task comes from the variant
    # a classifier's shared label is not ranked (iDLG infers a single label from the gradient)
    assert RunConfig(variant="lenet", attack={"preset": "ig"}).assumption_level() == 1
    assert RunConfig(variant="lenet", attack={"preset": "dlg"}).assumption_level() == 0


def test_init_file_is_hashed_and_marked_user_supplied(tmp_path):
    from suite.execution.runner import run_setting

    start = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8")).save(start)
    cfg = RunConfig(variant="lenet", size=32, device="cpu",
                    attack={"preset": "ig", "iterations": 2, "init": "file", "init_file": str(start)})
    res = run_setting(cfg, out_dir=tmp_path / "out", progress=False)
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    assert res.tags["init_file_sha256"] == digest
    assert res.tags["init_source"] == f"user-supplied file start.png (sha256 {digest})"
    assert cfg.flat_params()["init_file"] == str(start)


def test_the_control_starts_where_the_attack_starts_with_the_same_restarts(tmp_path, monkeypatch):
    import torch

    from suite.attack.attacker import Attacker
    from suite.execution.runner import run_setting

    # record the starts where each restart's descent begins, whoever picked them; the spies pass
    # everything through unchanged (the runner's inits, None included)
    starts: dict[bool, list[torch.Tensor]] = {}
    running = []
    real_reconstruct, real_start = Attacker.reconstruct, Attacker._start

    def reconstruct(self, inits=None, *, control=False, callback=None, **checkpointing):
        running.append(control)
        starts[control] = []
        try:
            return real_reconstruct(self, inits, control=control, callback=callback, **checkpointing)
        finally:
            running.pop()

    def start(self, x0):
        starts[running[-1]].append(x0.detach().clone())
        return real_start(self, x0)

    monkeypatch.setattr(Attacker, "reconstruct", reconstruct)
    monkeypatch.setattr(Attacker, "_start", start)
    cfg = RunConfig(variant="lenet", size=32, device="cpu",
                    attack={"preset": "dlg", "iterations": 3, "restarts": 2, "control": True})
    res = run_setting(cfg, out_dir=tmp_path / "out", progress=False)
    assert len(starts[True]) == len(starts[False]) == 2 == len(res.control.restart_images)
    for a, c in zip(starts[False], starts[True]):
        assert torch.equal(a, c)  # the same unclamped N(0, 1) starts, restart by restart
    assert float(starts[True][0].min()) < 0  # not clamped into [0, 1]
