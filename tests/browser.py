"""Headless Chromium driven over the DevTools protocol (a websocket on loopback), for tests.

Debian packages Chromium (``.ci/run`` installs it); ``websocket-client`` (a ``dev``
dependency) speaks the protocol. WebGL runs in software (SwiftShader), which is what the
report viewer's tests need. Every request the page makes is recorded, so that a test can
check that none leaves loopback.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",  # WebGL2 in software: no GPU here or in CI
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
#: Console lines that are the software GL driver's performance notes, not page errors.
DRIVER_NOTES = ("GPU stall due to ReadPixels", "GL Driver Message")


class Browser:
    """One headless Chromium with one page; use as a context manager.

    Attributes:
        requests: Every URL the page requested, in order.
        console: Every console message and uncaught exception (driver notes left out).
    """

    def __init__(self, width: int = 1200, height: int = 1000) -> None:
        if CHROMIUM is None:
            pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run does)")
        websocket = pytest.importorskip("websocket", reason="pip install websocket-client")
        # Chromium's helper processes can still write to the profile just after it exits
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        command = [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={self._profile.name}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        port = self._port(Path(self._profile.name) / "DevToolsActivePort")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [t for t in json.load(answer) if t["type"] == "page"]
        self._socket = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True
        )
        self._ids = itertools.count(1)
        self.requests: list[str] = []
        self.console: list[str] = []
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _port(self, marker: Path) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if marker.is_file() and marker.read_text().strip():
                return int(marker.read_text().splitlines()[0])
            if self._process.poll() is not None:
                raise RuntimeError("chromium exited at start")
            time.sleep(0.05)
        raise RuntimeError("chromium did not open its DevTools port")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Call a DevTools method and return its result (events meanwhile are recorded)."""
        ident = next(self._ids)
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._record(message)

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self._note(f"{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self._note(f"exception: {details.get('exception', {}).get('description', details)}")
        elif method == "Log.entryAdded":
            self._note(f"{params['entry']['level']}: {params['entry']['text']}")

    def _note(self, line: str) -> None:
        if not any(note in line for note in DRIVER_NOTES):
            self.console.append(line)

    def open(self, url: str) -> None:
        """Navigate and wait for the page's load event."""
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60.0) -> Any:
        """Wait until a JavaScript expression is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(condition)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"not true within {timeout} s: {condition}")

    def screenshot(self, clip: dict[str, float] | None = None) -> Any:
        """The page (or ``clip``: x, y, width, height in CSS pixels) as an RGB PIL image."""
        from PIL import Image

        params: dict[str, Any] = {"format": "png"}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
            params["captureBeyondViewport"] = True
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        return Image.open(io.BytesIO(data)).convert("RGB")

    def close(self) -> None:
        """Close the connection, stop Chromium (by its process) and remove its profile."""
        try:
            self._socket.close()
        finally:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            for _ in range(20):  # until the helper processes have let go of the profile
                self._profile.cleanup()
                if not Path(self._profile.name).exists():
                    break
                time.sleep(0.1)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
