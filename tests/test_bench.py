"""The benchmark's smoke test: it runs and writes its files (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_runs_and_writes_json_and_markdown(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--variants", "lenet", "--devices", "cpu", "--reps", "1", "--iters", "3",
         "--out", str(md), "--json-out", str(js)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(js.read_text())
    row = data["rows"][0]
    assert row["variant"] == "lenet" and "error" not in row
    assert row["train_step_s"] > 0 and row["attack_iter_s"] > 0
    assert row["ratio"] == row["attack_iter_s"] / row["train_step_s"]
    assert row["restarts4_over_1"] > 0 and row["peak_rss_mib"] > 0
    text = md.read_text()
    assert "| lenet | cpu |" in text and "Machine:" in text and data["machine"]["torch"] in text
