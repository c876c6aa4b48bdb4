"""The MLflow UI as a user first meets it: `gistress ui` on a tiny study, read in headless Chromium.

A real study (two LeNet settings, 32 px, 3 iterations) goes into a fresh store; `gistress ui`
serves it on a free loopback port; a browser with a fresh profile opens the links the command
prints and must see the runs table with each child run and its PSNR, control PSNR and gain, and
the chart view with the key charts first and an image grid holding one reconstruction per run;
the experiment's description must link to the study's parent run and to each run's page in
model-training mode; a child run's page must show its reconstruction at a legible size. Then the
port is freed on SIGTERM.

The two browser tests skip, with the reason, where Chromium is absent (``GISTRESS_CHROMIUM``
names another binary); with ``GISTRESS_REQUIRE_BROWSER=1`` (set by .ci/run) they fail instead,
naming the fix. The busy-port and SIGTERM tests need no browser and always run.

``GISTRESS_REFRESH_SCREENSHOTS=1`` saves the screenshots as the README's pictures
(docs/mlflow-runs.png, docs/mlflow-compare.png, docs/mlflow-run-images.png);
``GISTRESS_UI_STORE=sqlite:///...`` serves an existing store (e.g. the quickstart's) instead of
the tiny study.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import Browser, require_chromium

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
REFRESH = os.environ.get("GISTRESS_REFRESH_SCREENSHOTS") == "1"


TINY = """
name: ui_tiny
description: two LeNet settings for the browser test
base:
  variant: lenet
  size: 32
  images: [astronaut]
  device: cpu
  attack: {preset: ig, iterations: 3, control: true}
grid:
  attack.tv: [0.0, 0.2]
"""
ROWS_JS = """(() => {
  const rows = {};
  for (const cell of document.querySelectorAll('.ag-row .ag-cell[col-id]')) {
    const i = cell.closest('.ag-row').getAttribute('row-index');
    (rows[i] = rows[i] || {})[cell.getAttribute('col-id')] = cell.innerText.trim();
  }
  return Object.values(rows);
})()"""
PSNR, CONTROL, GAIN, NAME = "metrics.`score/psnr`", "metrics.`control/psnr`", "metrics.`gain/psnr`", "attributes.`Run Name`"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """The tracking URI the UI serves: a fresh tiny study, or GISTRESS_UI_STORE."""
    given = os.environ.get("GISTRESS_UI_STORE")
    if given:
        return given
    from suite.studies import run_study

    root = tmp_path_factory.mktemp("ui")
    (root / "tiny.yaml").write_text(TINY)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    t0 = time.perf_counter()
    out = run_study(root / "tiny.yaml", tracking_uri=uri, out_root=root / "out")
    assert out.counts == {"FINISHED": 2}, out.rows
    print(f"tiny study: {time.perf_counter() - t0:.1f} s")
    return uri


@pytest.fixture(scope="module")
def expected(store, tmp_path_factory) -> dict:
    """The newest study's settings, from MLflow itself (not from the view under test): the
    finished run of each setting its latest invocation listed, by name, and every name it listed."""
    from mlflow import MlflowClient

    from suite.execution.tracking import finished_runs

    client = MlflowClient(tracking_uri=store)
    (parent,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                   filter_string="tags.`gistress.kind` = 'study'", order_by=["start_time DESC"],
                                   max_results=1)
    exp = client.get_experiment(parent.info.experiment_id)
    listed = json.loads(Path(client.download_artifacts(parent.info.run_id, "settings.json",
                                                       str(tmp_path_factory.mktemp("settings")))).read_text())
    done = finished_runs(exp.name, store, client=client)
    runs = {s["name"]: client.get_run(done[s["config_hash"]]) for s in listed["settings"] if s["config_hash"] in done}
    assert runs, "the newest study has no finished setting"
    return {"experiment_id": exp.experiment_id, "runs": runs, "names": {s["name"] for s in listed["settings"]},
            "parent_run_id": parent.info.run_id}


@pytest.fixture(scope="module")
def ui(store):
    """`gistress ui` on a free port: (process, port, the link it printed, the link to its charts)."""
    port = _free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"gistress-ui-{port}.log", "w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "suite.cli", "ui", "--port", str(port), "--tracking-uri", store],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        text = ""
        while time.monotonic() < deadline and proc.poll() is None:
            log.seek(0)
            text = log.read()
            if "serving at" in text:
                break
            time.sleep(0.3)
        assert "serving at" in text, f"gistress ui did not come up:\n{text}"
        print(f"gistress ui ready in {time.perf_counter() - t0:.1f} s")
        link = re.search(r"runs of the newest study \(.*?\): (\S+)", text).group(1)
        charts = re.search(r"reconstructions side by side: (\S+)", text).group(1)
        yield proc, port, link, charts
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _shot(browser: Browser, name: str, tmp_path: Path) -> Path:
    """Screenshot into the test's folder, or over the README's picture when refreshing."""
    return browser.screenshot(DOCS / name if REFRESH else tmp_path / name)


def _close_assistant(browser: Browser) -> None:
    """MLflow opens its Assistant panel on a first visit; a user closes it once (for the pictures)."""
    browser.evaluate("(() => { const b = Array.from(document.querySelectorAll('button'))"
                     ".find(x => x.getAttribute('aria-label') === 'Close'); if (b) b.click(); return !!b; })()")
    time.sleep(1)


def test_printed_link_opens_the_runs_table_with_psnr_control_and_gain(ui, expected, tmp_path):
    require_chromium()  # skips, or fails under GISTRESS_REQUIRE_BROWSER=1
    proc, port, link, _ = ui
    assert link == f"http://127.0.0.1:{port}/#/experiments/{expected['experiment_id']}/runs?" \
                   "viewStateShareKey=gistress&workflowType=machine_learning"
    t0 = time.perf_counter()
    with Browser() as b:  # a fresh profile: nothing remembered from an earlier visit
        b.goto(link)
        n = len(expected["runs"])  # the finished ones at least, each with its PSNR
        rows = b.wait_for(f"(() => {{ const r = {ROWS_JS}; return r.length >= {n} && "
                          f"r.every(x => x['{PSNR}']) ? r : null; }})()", timeout=90)
        print(f"runs table rendered in {time.perf_counter() - t0:.1f} s")
        assert "/runs" in b.evaluate("location.hash") and "Model training" in b.text()
        shown = {r[NAME].splitlines()[-1]: r for r in rows}
        assert set(expected["runs"]) <= set(shown) <= expected["names"]  # the study's runs, and only them
        for name, run in expected["runs"].items():
            m = run.data.metrics
            for col, key in ((PSNR, "score/psnr"), (CONTROL, "control/psnr"), (GAIN, "gain/psnr")):
                if key not in m:  # a closed-form run has no prior-only control, so no gain either
                    assert shown[name][col] in ("", "-"), (name, col)
                    continue
                assert float(shown[name][col]) == pytest.approx(m[key], abs=1e-3), (name, col)
        # the three score columns are on screen, not scrolled off to the right
        right = b.evaluate("document.querySelector('.ag-body-viewport, .ag-center-cols-viewport')"
                           ".getBoundingClientRect().right")
        for col in (PSNR, CONTROL, GAIN):
            edge = b.evaluate(f"document.querySelector('.ag-header-cell[col-id=\"{col}\"]').getBoundingClientRect().right")
            assert edge <= right, col
        _close_assistant(b)
        _shot(b, "mlflow-runs.png", tmp_path)


GRID_ROW_JS = """(() => {{
  const label = Array.from(document.querySelectorAll('[role=row] [role=cell]')).find(c => c.innerText.trim() === '{key}');
  if (!label) return null;
  const row = label.closest('[role=row]'), table = row.closest('[role=table]');
  return {{images: Array.from(row.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length,
          runs: table.querySelector('[role=row]').innerText, top: label.getBoundingClientRect().top}};
}})()"""
KEY_TITLES = ("score/psnr", "gain/psnr", "score/ssim", "score/psnr_affine", "loss/matching")


def test_chart_link_shows_key_charts_then_every_runs_reconstruction(ui, expected, tmp_path):
    require_chromium()
    proc, port, _, charts = ui
    assert charts == f"http://127.0.0.1:{port}/#/experiments/{expected['experiment_id']}/runs?" \
                     "viewStateShareKey=gistress&compareRunsMode=CHART&workflowType=machine_learning"
    n = len(expected["runs"])
    t0 = time.perf_counter()
    with Browser(height=1250) as b:  # a fresh profile; tall enough for the picture to show the grid's rows
        b.goto(charts)
        # the image grid's reconstruction row: one image per run of the study, no click needed
        row = b.wait_for(f"(() => {{ const r = {GRID_ROW_JS.format(key='reconstruction')}; "
                         f"return r && r.images >= {n} ? r : null; }})()", timeout=90)
        print(f"image grid rendered in {time.perf_counter() - t0:.1f} s")
        assert row["images"] == n and all(name in row["runs"] for name in expected["runs"])
        # the rows beside it: one image per run that has one (a closed form has no start or control)
        has = {"target": n, "control": sum("control/psnr" in r.data.metrics for r in expected["runs"].values()),
               "start": sum("score/init_psnr" in r.data.metrics for r in expected["runs"].values())}
        for key, count in has.items():
            assert b.wait_for(f"(() => {{ const r = {GRID_ROW_JS.format(key=key)}; "
                              f"return r && r.images >= {count} ? r.images : null; }})()", timeout=30) == count, key
        # the key charts come first, drawn, then the images, then the sections MLflow adds itself
        text = b.text()
        pos = text.find("Key charts")
        for title in (*KEY_TITLES, "Reconstructions side by side"):  # in this order after the section's name
            assert pos >= 0 and text.find(title, pos) > pos, (title, text[pos:pos + 300])
            pos = text.find(title, pos)
        assert "Model training" in text and text.find("Reconstructions side by side") < text.find("control\n(")
        assert b.wait_for("document.querySelectorAll('.js-plotly-plot').length", timeout=30) >= len(KEY_TITLES)
        # the experiment's description: its parent run and every run page, in model-training mode
        links = {label: href for label, href in b.evaluate(
            "Array.from(document.querySelectorAll('a[href]')).map(a => [a.innerText.trim(), a.getAttribute('href')])")
            if "workflowType" in href}  # MLflow's own run links (the runs list) carry no mode
        parent = next(href for label, href in links.items() if "parent run" in label)
        assert parent == f"#/experiments/{expected['experiment_id']}/runs/{expected['parent_run_id']}" \
                         "?workflowType=machine_learning"
        for name, run in expected["runs"].items():
            assert links[name].endswith(f"/runs/{run.info.run_id}?workflowType=machine_learning"), name
        _close_assistant(b)
        _shot(b, "mlflow-compare.png", tmp_path)
        name = next(iter(expected["runs"]))
        b.goto(f"http://127.0.0.1:{port}/{links[name]}")  # where the link leads (it opens a new tab)
        b.wait_for(f"location.hash.includes({json.dumps(expected['runs'][name].info.run_id)}) && "
                   "document.body.innerText.includes('Overview')", timeout=60)
        side = b.evaluate("document.querySelector('aside').innerText")
        assert "Model registry" in side and "Evaluation runs" not in side, side  # not MLflow's GenAI pages


def test_a_child_run_shows_its_reconstruction_legibly(ui, store, expected, tmp_path):
    require_chromium()
    from mlflow import MlflowClient

    proc, port, _, _ = ui
    # the best reconstruction of the study that ran its prior-only control (the one worth a picture)
    name, run = max(((k, r) for k, r in expected["runs"].items() if "control/psnr" in r.data.metrics),
                    key=lambda kv: kv[1].data.metrics["score/psnr"])
    client = MlflowClient(tracking_uri=store)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    large = next(p for p in images if re.fullmatch(r"figures/reconstruction_x\d+\.png", p))
    grid = next(p for p in images if p.startswith("figures/comparison_"))
    base = f"http://127.0.0.1:{port}/#/experiments/{expected['experiment_id']}/runs/{run.info.run_id}"
    t0 = time.perf_counter()
    with Browser() as b:
        b.goto(f"{base}/artifacts/{large}?workflowType=machine_learning")
        # the artifact viewer draws the PNG (a blob URL) at its own size: at least 256 px wide
        width = b.wait_for("(() => { const i = Array.from(document.images).filter(i => i.src.startsWith('blob:')"
                           " && i.complete && i.naturalWidth >= 256); return i.length ? i[0].width : 0; })()",
                           timeout=90)
        print(f"run page image rendered in {time.perf_counter() - t0:.1f} s")
        assert width >= 256 and name in b.text() and large.split("/")[-1] in b.text()
        b.goto(f"{base}/artifacts/{grid}?workflowType=machine_learning")
        b.wait_for("Array.from(document.images).some(i => i.src.startsWith('blob:') && i.naturalWidth > 600)",
                   timeout=60)
        _close_assistant(b)
        _shot(b, "mlflow-run-images.png", tmp_path)
        b.goto(f"{base}?workflowType=machine_learning")  # the overview: the run's description
        assert "prior-only control" in b.wait_for("document.body.innerText.includes('PSNR') && document.body.innerText")


def test_a_second_ui_on_the_busy_port_says_so_in_one_line(ui, store):
    _, port, _, _ = ui
    res = subprocess.run([sys.executable, "-m", "suite.cli", "ui", "--port", str(port), "--tracking-uri", store],
                         capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: port {port} on 127.0.0.1 is busy") and "(fix: " in lines[0]


def test_sigterm_ends_the_server_tree_and_frees_the_port(ui):
    proc, port, _, _ = ui
    children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert children, "gistress ui has no server process"
    groups = {os.getpgid(c) for c in children}
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    print(f"gistress ui stopped {time.perf_counter() - t0:.1f} s after SIGTERM")
    from suite.cli.commands.ui import live_members

    for pgid in groups:  # no uvicorn worker or server process is left running
        assert live_members(pgid) == []
    assert _port_free(port)


def test_a_missing_browser_skips_with_the_reason_or_fails_naming_the_fix():
    """The gate itself, on a path that does not exist (no browser started)."""
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y chromium"):
        require_chromium("/nonexistent/chromium", required=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        require_chromium("/nonexistent/chromium", required=True)
    (line,) = str(failed.value).splitlines()
    assert "GISTRESS_REQUIRE_BROWSER=1" in line and "(fix: apt-get install -y chromium)" in line
