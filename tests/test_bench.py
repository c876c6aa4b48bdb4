"""The benchmark's smoke test: it runs and writes its files (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.__main__ import BEGIN, END


def test_bench_runs_and_writes_json_and_markdown_keeping_the_analysis(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    md.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold table\n{END}\n\n## Where the time goes\nkept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--variants", "lenet", "--devices", "cpu", "--reps", "1", "--iters", "3",
         "--malloc-ab", "--out", str(md), "--json-out", str(js)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(js.read_text())
    row = data["rows"][0]
    assert row["variant"] == "lenet" and "error" not in row
    assert row["train_step_s"] > 0 and row["attack_iter_s"] > 0
    assert row["ratio"] == row["attack_iter_s"] / row["train_step_s"]
    assert row["restarts4_over_1"] > 0 and row["batched4_over_1"] > 0 and row["peak_rss_mib"] > 0
    assert row["attack_iter_s_default_malloc"] > 0 and row["train_step_s_default_malloc"] > 0 and row["malloc_tuned"] is (sys.platform.startswith("linux"))
    text = md.read_text()
    assert "| lenet | cpu |" in text and "Machine:" in text and data["machine"]["torch"] in text
    assert "old table" not in text and "intro" in text and "## Where the time goes\nkept" in text
    assert "attack iter, default malloc (s)" in text and "4 restarts / 1 (batched)" in text


def test_bench_profile_prints_the_operator_table():
    proc = subprocess.run([sys.executable, "-m", "bench", "--profile", "lenet"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout
