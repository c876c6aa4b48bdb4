"""A headless Chromium driven over the DevTools protocol, for the UI tests.

Chromium talks the protocol over two pipes (``--remote-debugging-pipe``: it reads commands on
fd 3 and writes replies on fd 4, each a JSON message ended by a NUL byte), so no port, no
websocket library and no driver package are needed.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# GISTRESS_CHROMIUM points the tests at another binary (or, to check the skip path, a missing one)
CHROMIUM = os.environ.get("GISTRESS_CHROMIUM", "/usr/bin/chromium")
INSTALL = "apt-get install -y chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe"]


def require_chromium(path: str = CHROMIUM, required: bool | None = None) -> None:
    """Skip the calling test, with the reason, when Chromium is absent; with
    ``GISTRESS_REQUIRE_BROWSER=1`` (CI) fail instead, in one line naming the fix."""
    import pytest

    if Path(path).exists():
        return
    if required is None:
        required = os.environ.get("GISTRESS_REQUIRE_BROWSER") == "1"
    if required:
        pytest.fail(f"{path} is absent and GISTRESS_REQUIRE_BROWSER=1 (fix: {INSTALL})", pytrace=False)
    pytest.skip(f"{path} is absent ({INSTALL}); the browser tests need it")


class BrowserError(RuntimeError):
    """The browser did not answer, or a page never reached the expected state."""


class Browser:
    """One Chromium process with a fresh profile and one page (``with Browser() as b: ...``)."""

    def __init__(self, width: int = 1500, height: int = 950, timeout: float = 60.0):
        self.profile = tempfile.mkdtemp(prefix="gistress-chromium-")
        self.timeout = timeout
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        def fds():  # in the child: fd 3 reads our commands, fd 4 carries the replies
            r, w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=False, preexec_fn=fds, start_new_session=True,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next = 0
        self.session = None
        try:
            targets = self.call("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            self.session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                     flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Runtime.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    # ----- protocol -----------------------------------------------------------------------
    def call(self, method: str, timeout: float | None = None, **params):
        """Send one command (to the page once attached) and return its result."""
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    raise BrowserError("chromium exited")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    # ----- page helpers -------------------------------------------------------------------
    def goto(self, url: str) -> None:
        """Load ``url`` afresh. Going through about:blank makes a change of the #fragment alone a
        full page load (a single-page app may read its route only once)."""
        self.call("Page.navigate", url="about:blank")
        self.wait_for("location.href === 'about:blank'", timeout=10, interval=0.05)
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise BrowserError(f"{expression[:80]}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.5):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError:
                value = None
            if value:
                return value
            time.sleep(interval)
        text = self.text()[:600]
        raise BrowserError(f"timed out waiting for {expression[:120]!r}; the page reads: {text!r}")

    def text(self) -> str:
        """The rendered text of the page (what a user can read)."""
        try:
            return self.evaluate("document.body ? document.body.innerText : ''") or ""
        except BrowserError:
            return ""

    def screenshot(self, path: str | Path) -> Path:
        """Save a PNG of the viewport."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    # ----- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """End chromium (its whole process group) and delete the profile."""
        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, 15)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, 9)
                    self.proc.wait(10)
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
