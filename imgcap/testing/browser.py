"""Headless Chromium for the tests of the HTML contact sheet: driven over the Chrome DevTools protocol on a pipe
(``--remote-debugging-pipe``: no port, no network, no extra Python package), so a test reads the rendered DOM,
whether each embedded JPEG decoded (``naturalWidth``), what the page tried to load and its console errors, and
takes screenshots. `chromium_binary` is None where Debian's chromium is not installed (the tests then skip).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image


def chromium_binary() -> str | None:
    """The Chromium executable, or None."""
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


# The DevTools pipe must be the browser's fds 3 (commands in) and 4 (replies out): this moves it there and execs
# Chromium (a tiny Python trampoline rather than preexec_fn, which is unsafe in a threaded process).
_ON_FDS_3_AND_4 = ("import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
                   "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])")


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class Browser:
    """Headless Chromium driven over the DevTools protocol on fds 3/4 (JSON messages ended by NUL)."""

    def __init__(self, binary: str, profile: str, log: Path) -> None:
        # fds >= 10, so moving them to 3 and 4 in the child never overwrites one with the other.
        to_chrome, self._writer = (_high_fd(fd) for fd in os.pipe())
        self._reader, from_chrome = (_high_fd(fd) for fd in os.pipe())
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self._log = log.open("wb")
        # Its own session, so a Chromium that will not close is killed with every child it started; its XDG
        # dirs in the throwaway profile, so nothing (crash database, dconf) lands in the user's home.
        env = {**os.environ, "XDG_CONFIG_HOME": profile, "XDG_CACHE_HOME": profile}
        self.process = subprocess.Popen([sys.executable, "-c", _ON_FDS_3_AND_4, str(to_chrome), str(from_chrome),
                                         binary, *flags], pass_fds=(to_chrome, from_chrome), start_new_session=True,
                                        env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        os.close(to_chrome)
        os.close(from_chrome)
        self._next_id = 0
        self._buffer = b""
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._writer, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["method"] == method and event.get("sessionId") == session:
                    self.events.remove(event)
                    return event
            reply = self._read(deadline)
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._reader], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium (see chromium.log)")
            chunk = os.read(self._reader, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (code {self.process.poll()}; see chromium.log)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, path: Path, *, javascript: bool = True) -> "Page":
        """A fresh tab showing `path`, 1200 px wide at device scale 1, after its load event."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Log", "Runtime"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": 1200, "height": 800, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=session)
        if not javascript:
            self.send("Emulation.setScriptExecutionDisabled", {"value": True}, session=session)
        self.send("Page.navigate", {"url": path.as_uri()}, session=session)
        self.wait_event("Page.loadEventFired", session)
        return Page(self, target, session, path.as_uri())

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self._writer)
        os.close(self._reader)
        self._log.close()


class Page:
    """A tab of the `Browser`, showing one page."""

    def __init__(self, browser: Browser, target: str, session: str, url: str) -> None:
        self.browser, self.target, self.session, self.url = browser, target, session, url

    def eval(self, expression: str):
        result = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                        "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def own_events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events
                if e["method"] == method and e.get("sessionId") == self.session]

    def requests(self) -> list[str]:
        """Every URL the page asked for besides itself and its data: URIs."""
        urls = [e["request"]["url"] for e in self.own_events("Network.requestWillBeSent")]
        return [u for u in urls if u != self.url and not u.startswith("data:")]

    def errors(self) -> list[str]:
        """Console and browser log errors (a CSP violation, a script error)."""
        logged = [e["entry"]["text"] for e in self.own_events("Log.entryAdded") if e["entry"]["level"] == "error"]
        thrown = [str(e["exceptionDetails"]) for e in self.own_events("Runtime.exceptionThrown")]
        return logged + thrown

    def screenshot(self, path: Path) -> Image.Image:
        height = self.eval("document.documentElement.scrollHeight")
        shot = self.browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1200, "height": height, "scale": 1}}, session=self.session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return Image.open(path).convert("RGB")

    def close(self) -> None:
        self.browser.send("Target.closeTarget", {"targetId": self.target})
