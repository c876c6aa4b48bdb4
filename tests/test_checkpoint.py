"""Mid-run checkpoints: a run killed part-way resumes from its saved step into the same folder and
ends where an uninterrupted run ends; a checkpoint from another setting is never used. And the
oracle snapshot columns (best SSIM against the ground truth) are reported but decide nothing."""

from __future__ import annotations

import pytest
import torch

from suite.attack import checkpoint as ckpt
from suite.config import RunConfig
from suite.execution.runner import run_setting


def _cfg(**attack) -> RunConfig:
    # dropout and sequential restarts: the resumed loop must restore the RNG and each restart's state
    return RunConfig(variant="convnet", variant_options={"width": 4}, images=["astronaut"],
                     attack={**dict(preset="ig", iterations=30, log_every=5, restarts=2, control=True), **attack})


class _Kill(Exception):
    pass


def _killer(at_step: int, seen: list):
    def on_step(step, record):
        seen.append(step)
        if len(seen) == at_step:
            raise _Kill  # the process dies here, after the loop saved its state
    return on_step


@pytest.fixture
def always_save(monkeypatch):
    monkeypatch.setattr(ckpt, "DEFAULT_EVERY_S", 0.0)  # every logged step is a checkpoint


def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_ends(tmp_path, always_save):
    torch.set_num_threads(1)
    whole = run_setting(_cfg(), out_dir=tmp_path / "whole", progress=False)
    assert not (tmp_path / "whole" / "checkpoints").exists()  # finished: nothing left to resume
    assert "resumed_from_step" not in whole.tags

    seen: list[int] = []
    with pytest.raises(_Kill):  # killed in restart 1 of the attack, at its step 10
        run_setting(_cfg(), out_dir=tmp_path / "again", progress=False, on_step=_killer(7 + 3, seen))
    saved = sorted(p.name for p in (tmp_path / "again" / "checkpoints").iterdir())
    assert saved == ["attack-restart0.pt", "attack-restart1.pt"]

    curve: list[int] = []
    resumed = run_setting(_cfg(), out_dir=tmp_path / "again", progress=False,
                          on_step=lambda step, record: curve.append(step))
    # the step curves start at 0 again: steps logged before the kill are replayed from the checkpoint
    assert sorted(set(curve)) == [r["step"] for r in whole.reconstruction.history] == [0, 5, 10, 15, 20, 25, 29]
    # the kill came while step 10 was being logged, before its save: restart 1 resumes after step 5
    # (restart 0 had finished: its saved end state is used as it is)
    assert resumed.tags["resumed_from_step"] == "5"
    torch.testing.assert_close(resumed.reconstruction.images, whole.reconstruction.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.control.images, whole.control.images, rtol=0, atol=1e-6)
    assert resumed.metrics["matching_loss"] == pytest.approx(whole.metrics["matching_loss"], rel=1e-5)
    # the chosen restart's logged history is whole again: saved records plus the resumed ones
    assert [r["step"] for r in resumed.reconstruction.history] == [r["step"] for r in whole.reconstruction.history]
    assert not (tmp_path / "again" / "checkpoints").exists()


def test_a_checkpoint_of_another_setting_is_ignored(tmp_path, always_save):
    torch.set_num_threads(1)
    with pytest.raises(_Kill):
        run_setting(_cfg(), out_dir=tmp_path / "o", progress=False, on_step=_killer(4, []))
    with pytest.warns(UserWarning, match="ignoring checkpoint .* written for another setting"):
        other = run_setting(_cfg(tv=0.05), out_dir=tmp_path / "o", progress=False)
    assert "resumed_from_step" not in other.tags
    assert [r["step"] for r in other.reconstruction.history][0] == 0


def test_oracle_snapshot_columns_are_reported_and_decide_nothing(tmp_path):
    """The best-SSIM snapshot (LeakPro's selection rule) is an oracle column: it is at least as
    good as every logged step by construction, and the leak flags ignore it, here checked on a
    run whose oracle column is pushed to a perfect score after the fact."""
    from suite.audit.battery import BATTERY
    from suite.audit.verdict import LevelOutcome, add_result
    from suite.execution.mlflow_ui import describe_result
    from suite.reports.figures import summary_records

    torch.set_num_threads(1)
    res = run_setting(_cfg(restarts=1), out_dir=tmp_path / "o", progress=False)
    m = res.metrics
    logged = [r["ssim"] for r in res.reconstruction.history]
    assert m["oracle_best_snapshot_ssim"] == max(logged)
    assert m["oracle_best_snapshot_step"] in [r["step"] for r in res.reconstruction.history]
    assert not m["leaked"]  # a 30-step attack on a random ConvNet does not leak

    m.update(oracle_best_snapshot_ssim=1.0, oracle_best_snapshot_psnr=100.0, oracle_best_restart_psnr=100.0)
    row = {"metrics": m, "status": "FINISHED", "axes": {}, "variant": "convnet"}
    assert summary_records([row])[0]["leaked"] == "no"
    assert "leaked: no" in describe_result(res.config, m, res.tags)
    level = LevelOutcome(number=1, level=BATTERY[0], status="FINISHED")
    add_result(level, "astronaut", res)
    assert level.leaked is False
