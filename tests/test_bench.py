"""The benchmark's smoke test: it runs and writes its files. One timing assertion, with a wide
margin: an attack iteration costs more than the training step it differentiates through."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.__main__ import BEGIN, END

REPO = Path(__file__).resolve().parents[1]
# bench is not installed: `python -m bench` finds it on the repository root (tests run elsewhere)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}


def test_bench_runs_and_writes_json_and_markdown_keeping_the_analysis(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    md.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Where the time goes\nkept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--variants", "lenet", "--devices", "cpu", "--reps", "1", "--iters", "3",
         "--malloc-ab", "--out", str(md), "--json-out", str(js)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(js.read_text())
    row = data["rows"][0]
    assert row["variant"] == "lenet" and "error" not in row
    assert row["train_step_s"] > 0 and row["attack_iter_s"] > 0
    # an ig iteration runs the training step's forward and backward and then differentiates through
    # them: it cannot cost less than the step (measured 3.6x for LeNet on CPU, docs/benchmarks.md)
    assert row["ratio"] > 1, row
    assert row["restarts4_over_1"] > 0 and row["batched4_over_1"] > 0 and row["peak_rss_mib"] > 0
    assert row["attack_iter_s_default_malloc"] > 0 and row["train_step_s_default_malloc"] > 0 and row["malloc_tuned"] is (sys.platform.startswith("linux"))
    text = md.read_text()
    assert "| lenet | cpu |" in text and "Machine:" in text and data["machine"]["torch"] in text
    assert f"| {row['ratio']:.2f} |" in text  # the table shows the JSON's numbers
    assert "old table" not in text and "intro" in text and "## Where the time goes\nkept" in text
    assert "attack iter, default malloc (s)" in text and "4 restarts / 1 (batched)" in text


def test_bench_profile_prints_the_operator_table():
    proc = subprocess.run([sys.executable, "-m", "bench", "--profile", "lenet"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout


def test_parity_smoke_both_engines_agree_at_the_start_and_return_finite_images(tmp_path):
    """`python -m bench parity` at a tiny budget: the objectives agree at the start (the harness
    asserts it before attacking), both engines return images, and the report is written."""
    md, fig, js, rows = tmp_path / "b.md", tmp_path / "parity.png", tmp_path / "parity.json", tmp_path / "rows.jsonl"
    md.write_text("# Benchmarks\n\nanalysis kept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "parity", "--iterations", "2", "--seeds", "0", "--results", str(rows),
         "--out", str(md), "--figure", str(fig), "--json-out", str(js)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(js.read_text())
    assert {r["case"] for r in data["rows"]} == {"resnet18-train", "resnet18-eval", "convnet", "lenet-dlg"}
    for r in data["rows"]:
        assert abs(r["objective_gistress"] - r["objective_breaching"]) <= 1e-5
        assert r["s_per_iter_breaching"] > 0 and r["s_per_iter_gistress"] > 0
    # each PSNR is the one of the images the row carries (the --results rows keep them), recomputed
    # here: 10 log10(1 / MSE) against the target, capped at 100 dB
    for r in map(json.loads, rows.read_text().splitlines()):
        target = torch.tensor(r["images"]["target"])
        for engine in ("breaching", "gistress"):
            mse = float(((torch.tensor(r["images"][engine]) - target) ** 2).mean())
            assert r[f"psnr_{engine}"] == pytest.approx(min(100.0, 10 * math.log10(1 / mse)), abs=1e-3), \
                (r["case"], engine)
    text = md.read_text()
    assert "analysis kept" in text and "| resnet18-eval | 2 | 1 |" in text and "parity.png" in text
    assert fig.stat().st_size > 1000


def test_parity_refuses_an_unknown_case_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bench", "parity", "--cases", "resnet99"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "unknown case 'resnet99'" in proc.stderr


def test_cli_bench_writes_startup_and_dlg_rows(tmp_path):
    md, js = tmp_path / "b.md", tmp_path / "cli.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "cli", "--iterations", "3", "--reps", "1", "--loads", "0",
         "--out", str(md), "--json-out", str(js)],
        capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(js.read_text())
    assert set(row["startup_s"]) == {"--help", "variants", "doctor"} and all(v > 0 for v in row["startup_s"].values())
    assert row["engine_s"] > 0 and row["cli_s"] > row["engine_s"] and row["cli_fixed_s"] > 0
    assert "| 0 |" in md.read_text()


def test_parity_paired_difference_interval_and_report_from_the_json(tmp_path):
    """The seed-paired PSNR difference gets a Student-t interval (t(0.975, 2) = 4.303), and the
    report can be rebuilt from a previous parity.json without its images (the figure is kept)."""
    from bench.parity import figure, markdown, paired_difference, read_rows, summarize, verdict

    d = paired_difference([1.0, 2.0, 3.0])
    assert d["psnr_diff_mean"] == pytest.approx(2.0)
    assert d["psnr_diff_low"] == pytest.approx(2.0 - 4.3027 / 3 ** 0.5, abs=1e-3)
    assert d["psnr_diff_high"] == pytest.approx(2.0 + 4.3027 / 3 ** 0.5, abs=1e-3)
    assert paired_difference([0.5])["psnr_diff_low"] is None  # one seed: no interval

    row = dict(case="convnet", iterations=10, objective_gistress=1.0, objective_breaching=1.0,
               ssim_breaching=0.1, ssim_gistress=0.1, s_per_iter_breaching=1.0, s_per_iter_gistress=0.5)
    rows = [dict(row, seed=0, psnr_breaching=10.0, psnr_gistress=11.0),
            dict(row, seed=1, psnr_breaching=12.0, psnr_gistress=11.0)]
    (tmp_path / "parity.json").write_text(json.dumps(dict(summary=[], rows=rows)))
    back = read_rows([tmp_path / "parity.json", tmp_path / "missing.jsonl"])
    (s,) = summarize(back)
    assert s["psnr_diff_mean"] == pytest.approx(0.0) and s["psnr_diff_low"] < -1 < 1 < s["psnr_diff_high"]
    assert "| convnet | 10 | 2 |" in markdown([s], None) and "+0.00 [" in markdown([s], None)
    assert verdict(s) == "no difference shown"
    assert verdict(dict(psnr_diff_low=-3.0, psnr_diff_high=-0.1)) == "weaker"
    assert verdict(dict(psnr_diff_low=0.2, psnr_diff_high=2.0)) == "stronger"
    assert verdict(dict(psnr_diff_low=None, psnr_diff_high=None)) == "– (one seed)"

    old = tmp_path / "parity.png"
    old.write_bytes(b"the earlier figure")
    pictured = dict(rows[0], images={"target": [[[0.0]]] * 3, "breaching": [[[0.0]]] * 3, "gistress": [[[0.0]]] * 3})
    lenet = dict(rows[1], case="lenet-dlg")  # a case rerun without images: the old figure stays
    assert figure([pictured, lenet], old) == old and old.read_bytes() == b"the earlier figure"
    smaller = dict(pictured, case="lenet-dlg", iterations=5)  # pictured, but below lenet's largest budget
    assert figure([pictured, lenet, smaller], old) == old and old.read_bytes() == b"the earlier figure"
    assert figure([pictured, dict(smaller, iterations=10)], tmp_path / "new.png") == tmp_path / "new.png"
    assert (tmp_path / "new.png").stat().st_size > 1000
    assert figure(back, tmp_path / "none.png") is None
