"""Ablation comparisons: seed-paired differences against the unmodified setting (suite.studies.compare)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import suite  # noqa: F401  (offline defaults before mlflow)
from suite.errors import GistressError
from suite.studies import expand_settings, run_study
from suite.studies.compare import LESS, MORE, SAME, paired_changes

FAKE = "test_study:fake_run_setting"
T_975_3 = 3.182446305284263  # Student t quantile, 0.975 and 3 degrees of freedom (tables)


def row(value, seed, image, *, psnr, lpips=None, leaked=False, status="FINISHED", axis="variant_options", **axes):
    metrics = {"psnr": psnr, "ssim": 0.5, "content_gain": psnr - 10.0, "leaked": float(leaked)}
    if lpips is not None:
        metrics["lpips"] = lpips
    return {"status": status, "metrics": metrics if status == "FINISHED" else {}, "seed": seed, "image": image,
            "axes": {axis: value, **axes}}


def grid_rows(value, psnrs, **kw):
    """One row per (seed, image) in the order (0,a), (0,b), (1,a), (1,b)."""
    keys = [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    return [row(value, s, i, psnr=p, **kw) for (s, i), p in zip(keys, psnrs)]


def test_paired_difference_and_interval_match_the_t_table():
    rows = grid_rows("base", [10, 11, 12, 13]) + grid_rows("k=5", [12, 13.5, 14, 15.2]) \
        + grid_rows("k=1", [11, 10, 12.5, 12.6])
    by = {c.label: c for c in paired_changes(rows, "variant_options", {})}
    assert list(by) == ["k=5", "k=1"]  # the baseline itself is no change
    d = by["k=5"].differences["psnr"]
    # differences 2, 2.5, 2, 2.2: mean 2.175, sample sd sqrt(0.1675 / 3)
    half = T_975_3 * (0.1675 / 3) ** 0.5 / 2
    assert d.n == 4 and d.mean == pytest.approx(2.175)
    assert (d.low, d.high) == (pytest.approx(2.175 - half), pytest.approx(2.175 + half))
    assert d.direction == MORE and by["k=5"].differences["content_gain"].direction == MORE
    # +1, -1, +0.5, -0.4: the interval straddles zero
    assert by["k=1"].differences["psnr"].direction == SAME
    assert "lpips" not in by["k=5"].differences  # offline: no LPIPS, no column invented


def test_lower_lpips_is_more_leakage_and_missing_pairs_are_counted():
    rows = grid_rows("base", [10, 11, 12, 13], lpips=0.5) + [
        row("k=5", 0, "a", psnr=9, lpips=0.30), row("k=5", 0, "b", psnr=10, lpips=0.31),
        row("k=5", 1, "a", psnr=11, lpips=0.29), row("k=5", 1, "b", psnr=0, status="FAILED"),
    ]
    rows[3]["status"] = "FAILED"  # the baseline of (1, b) failed too
    rows.append(row("k=5", 2, "a", psnr=9, lpips=0.3))  # a seed the baseline never ran
    (change,) = paired_changes(rows, "variant_options", {})
    assert change.n_pairs == 3 and change.unpaired == 1
    assert change.differences["lpips"].direction == MORE
    assert change.differences["psnr"].direction == LESS


def test_leak_decision_uses_an_exact_sign_test():
    four = grid_rows("base", [10] * 4) + grid_rows("flip", [20] * 4, leaked=True)
    (change,) = paired_changes(four, "variant_options", {})
    # four of four flipped: a t-interval would have zero width; the sign test says p = 0.125
    assert (change.leaks_baseline, change.leaks_change) == (0, 4)
    assert change.leak_p == pytest.approx(0.125) and change.leak_direction == SAME
    six = [row(v, s, "a", psnr=p, leaked=leak) for s in range(6)
           for v, p, leak in (("base", 20, True), ("off", 10, False))]
    (change,) = paired_changes(six, "variant_options", {})
    assert change.leak_p == pytest.approx(2 * 0.5 ** 6) and change.leak_direction == LESS


def test_pairs_stay_within_the_other_axes():
    axis = "variant_options.cut_skips"
    rows = []
    for variant, base, cut in (("resnet18", 20.0, 15.0), ("resnet34", 30.0, 31.0)):
        for seed in (0, 1):
            rows.append(row("none", seed, "a", psnr=base + seed, axis=axis, variant=variant))
            rows.append(row("0", seed, "a", psnr=cut + seed, axis=axis, variant=variant))
    changes = paired_changes(rows, axis, None)
    assert [(c.group, c.label) for c in changes] == [("variant=resnet18", "0"), ("variant=resnet34", "0")]
    assert [c.differences["psnr"].mean for c in changes] == [pytest.approx(-5.0), pytest.approx(1.0)]
    assert changes[0].name == "variant=resnet18 0"


def test_compare_block_is_validated(tmp_path):
    spec = tmp_path / "x.yaml"
    spec.write_text("name: x\nbase: {variant: convnet}\ngrid:\n  variant_options: [{}, {bias: false}]\n"
                    "compare: {axis: variant_option, baseline: {}}\n")
    with pytest.raises(GistressError, match=r"compare.axis 'variant_option' .*:5 .*did you mean 'variant_options'"):
        expand_settings(spec)
    spec.write_text("name: x\nbase: {variant: convnet}\ngrid:\n  variant_options: [{}, {bias: false}]\n"
                    "compare: {axis: variant_options, baseline: {bias: true}}\n")
    with pytest.raises(GistressError, match=r"compare.baseline \{'bias': True\} .* not one of variant_options's values"):
        expand_settings(spec)
    spec.write_text("name: x\nbase: {variant: convnet}\ngrid:\n  variant_options: [{}]\ncompare: {axis: v, basline: 1}\n")
    with pytest.raises(GistressError, match=r"unknown key 'compare.basline'.*did you mean 'baseline'"):
        expand_settings(spec)


@pytest.mark.parametrize("path", ["runs/microdesign_convnet.yaml", "runs/skip_cuts_resnet.yaml"])
def test_ablation_specs_declare_their_baseline(path):
    """Both SoK ablation specs pair every change with a setting that exists in each profile."""
    from suite.studies.spec import load_spec

    repo = Path(__file__).resolve().parents[1]
    spec = load_spec(repo / path)
    assert spec.compare is not None
    for profile in [None, *spec.profiles]:
        settings = expand_settings(spec, profile)
        values = [s.axes.get(spec.compare.axis) for s in settings]
        assert spec.compare.baseline in values and any(v != spec.compare.baseline for v in values)


def _ablation(tmp_path, grid: str, compare: str):
    """A two-seed ablation of the stand-in variant over ``grid``, run with the fake runner."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = tmp_path / "abl.yaml"
    spec.write_text("name: abl\nbase: {variant: alpha, attack: {preset: ig, iterations: 2, log_every: 1}}\n"
                    f"grid:\n  {grid}\nseeds: [0, 1]\nimages: [astronaut]\ncompare: {compare}\n")
    return run_study(spec, tracking_uri=uri, out_root=tmp_path / "out", runner=FAKE, json_out=True), uri, spec


def test_study_writes_and_logs_the_comparison(tmp_path, capsys):
    out, uri, _ = _ablation(tmp_path, "variant_options: [{}, {k: 5}, {k: 1}]", "{axis: variant_options, baseline: {}}")
    assert out.exit_code == 0 and [c.label for c in out.changes] == ["k=5", "k=1"]
    assert all(c.n_pairs == 2 for c in out.changes)
    with out.comparison_path.open() as fh:
        recs = list(csv.DictReader(fh))
    assert [r["value"] for r in recs] == ["k=5", "k=1"] and {r["pairs"] for r in recs} == {"2"}
    # the CSV's differences are the runs' own PSNRs subtracted pair by pair
    psnr = {(tuple(r["axes"].items()), r["seed"]): r["metrics"]["psnr"] for r in out.rows}
    expect = sum(psnr[((("variant_options", "k=5"),), s)] - psnr[((("variant_options", "base"),), s)]
                 for s in (0, 1)) / 2
    assert float(recs[0]["psnr_mean"]) == pytest.approx(expect)
    assert out.comparison_figure.is_file() and out.comparison_figure.stat().st_size > 1000
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    arts = {a.path for a in c.list_artifacts(out.parent_run_id)}
    assert {"comparison.csv", "comparison_table.json"} <= arts
    assert "images/comparison.png" in {a.path for a in c.list_artifacts(out.parent_run_id, "images")}
    printed = capsys.readouterr().out
    assert "paired against variant_options=base" in printed and "comparison:" in printed
    last = json.loads(printed.strip().splitlines()[-1])
    assert [x["change"] for x in last["comparison"]] == ["k=5", "k=1"]
    assert last["also_compared"] == []


def test_also_against_adds_a_table_per_further_baseline(tmp_path, capsys):
    """compare.also_against: the same runs paired against another value ("cut deeper vs cut first")."""
    out, uri, spec = _ablation(tmp_path, "variant_options.cut: [null, [0], [2]]",
                               "{axis: variant_options.cut, baseline: null, also_against: [[0]]}")
    assert out.exit_code == 0 and [c.label for c in out.changes] == ["0", "2"]
    (vs0,) = out.also_compared
    assert vs0.csv_path.name == "comparison_vs_0.csv" and vs0.figure.name == "comparison_vs_0.png"
    assert [c.label for c in vs0.changes] == ["none", "2"]
    # against [0], the uncut net's difference is minus the [0] cut's difference against the uncut net
    with out.comparison_path.open() as a, vs0.csv_path.open() as b:
        first, second = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert float(second[0]["psnr_mean"]) == pytest.approx(-float(first[0]["psnr_mean"]))
    from mlflow import MlflowClient

    arts = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(out.parent_run_id)}
    assert {"comparison_vs_0.csv", "comparison_vs_0_table.json"} <= arts
    printed = capsys.readouterr().out
    assert "paired against variant_options.cut=none" in printed and "paired against variant_options.cut=0" in printed
    last = json.loads(printed.strip().splitlines()[-1])
    assert last["also_compared"][0]["baseline"] == [0] and last["also_compared"][0]["label"] == "0"
    assert last["also_compared"][0]["comparison_figure"].endswith("comparison_vs_0.png")
    assert [x["change"] for x in last["also_compared"][0]["comparison"]] == ["none", "2"]
    text = spec.read_text()
    for also, error in [("[[4]]", r"compare.also_against \[4\] .* not one of variant_options.cut's values"),
                        ("[null]", r"compare.also_against None .* is the baseline itself"),
                        ("[[0], [0]]", r"compare.also_against \[0\] .* repeats \[0\] \(both would write "
                                       r"comparison_vs_0.csv\)")]:
        spec.write_text(text.replace("also_against: [[0]]", f"also_against: {also}"))
        with pytest.raises(GistressError, match=error):
            expand_settings(spec)


def test_a_figure_that_fails_costs_only_the_figure(tmp_path, capsys, monkeypatch):
    """Each summary part is written on its own: a broken figure leaves the tables and summary.json."""
    from suite.reports import figures

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(figures, "study_figure", broken)
    out, _, _ = _ablation(tmp_path, "variant_options: [{}, {k: 5}]", "{axis: variant_options, baseline: {}}")
    assert out.exit_code == 0 and out.figure_path is None
    assert "warning: study summary incomplete: figure not written (RuntimeError: no display)" in capsys.readouterr().err
    assert out.comparison_path.is_file() and [c.label for c in out.changes] == ["k=5"]
    saved = json.loads((out.csv_path.parent / "summary.json").read_text())
    assert [x["change"] for x in saved["comparison"]] == ["k=5"]


# ---------------------------------------------------------------------------------------------
# tuning sweeps: the server's pick and the oracle's (suite.studies.sweep)
# ---------------------------------------------------------------------------------------------


def sweep_row(tv, lr, seed, *, loss, ssim, leaked):
    return {"status": "FINISHED", "name": f"tv={tv} lr={lr}", "seed": seed, "image": "bus",
            "axes": {"attack.tv": tv, "attack.lr": lr, "variant": "yolo"},
            "metrics": {"psnr": 10 + 10 * ssim, "ssim": ssim, "content_gain": ssim, "matching_loss": loss,
                        "leaked": float(leaked)}}


def test_sweep_picks_by_matching_loss_and_keeps_the_oracle_out_of_verdicts():
    from suite.studies.summary import leak_sentence
    from suite.studies.sweep import format_sweep, sweep_groups

    rows = [sweep_row("0.1", "0.1", 0, loss=0.30, ssim=0.20, leaked=False),
            sweep_row("0.01", "0.1", 0, loss=0.10, ssim=0.25, leaked=False),   # the server's pick
            sweep_row("0.1", "0.01", 0, loss=0.50, ssim=0.70, leaked=True),    # the oracle's pick
            sweep_row("0.1", "0.1", 1, loss=0.20, ssim=0.40, leaked=False)]
    before = leak_sentence(rows)
    (g0, g1) = sweep_groups(rows, ["attack.tv", "attack.lr"])
    assert (g0.trials, g1.trials) == (3, 1) and g0.group == "variant=yolo seed=0 image=bus"
    assert g0.by_matching_loss.name == "tv=0.01 lr=0.1" and not g0.leaked_by_matching_loss
    assert g0.oracle.name == "tv=0.1 lr=0.01" and g0.oracle.ssim == pytest.approx(0.70)
    text = format_sweep([g0, g1], ["attack.tv", "attack.lr"])
    first = text.splitlines()[1]
    honest, oracle = first.split(" | ")
    assert "no leak" in honest and "leak" not in oracle  # the oracle's pick never gets a leak word
    assert "never a verdict" in text.splitlines()[0]
    # the study's verdict is the runs' own: picking the oracle changes nothing in it
    assert leak_sentence(rows) == before and rows[2]["metrics"]["leaked"] == 1.0


def test_sweep_axes_are_validated(tmp_path):
    spec = tmp_path / "x.yaml"
    spec.write_text("name: x\nbase: {variant: lenet}\ngrid:\n  attack.tv: [0.1, 0.01]\nsweep: {axes: [attack.t]}\n")
    with pytest.raises(GistressError, match=r"sweep axis 'attack.t' .*:5 .*did you mean 'attack.tv'"):
        expand_settings(spec)
