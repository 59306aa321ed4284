"""Serve a report folder on the loopback interface, so that its viewer can fetch the volumes.

Browsers refuse ``fetch`` from a ``file://`` page; :func:`report_server` answers GET requests
for the files under one folder on ``127.0.0.1`` only (never another interface), on a free
port unless one is given. Nothing outside the folder is served, and every answer carries the
report's Content-Security-Policy, so the page cannot load anything from elsewhere.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Any

from medanomaly.errors import ConfigError, MissingFileError
from medanomaly.reports.files import REPORT_FILE
from medanomaly.reports.viewer import VIEWER_CSP

HOST = "127.0.0.1"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of one folder, read-only, with the report's policy and no caching."""

    extensions_map = {  # noqa: RUF012 -- the base class's own attribute
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".gz": "application/gzip",  # a .nii.gz is sent as it is: NiiVue decompresses it
        ".js": "text/javascript",
    }

    def end_headers(self) -> None:
        self.send_header("Content-Security-Policy", VIEWER_CSP)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: one line per request is noise for a person reading a report."""


def report_server(folder: str | Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server of ``folder`` on 127.0.0.1 (``port`` 0: a free one); run ``serve_forever``.

    Raises:
        MissingFileError: ``folder`` holds no ``report.html``.
        ConfigError: The port is taken.
    """
    folder = Path(folder)
    if not (folder / REPORT_FILE).is_file():
        raise MissingFileError(f"{folder}: no {REPORT_FILE} here (give an evaluate or screen OUT)")
    handler = functools.partial(_Handler, directory=str(folder.resolve()))
    try:
        return http.server.ThreadingHTTPServer((HOST, port), handler)
    except OSError as error:
        raise ConfigError(f"cannot serve on {HOST}:{port}: {error.strerror}") from None


def report_url(server: http.server.ThreadingHTTPServer) -> str:
    """The report's address on a :func:`report_server`."""
    return f"http://{HOST}:{server.server_address[1]}/{REPORT_FILE}"


def serve_in_background(folder: str | Path, port: int = 0) -> tuple[Any, str]:
    """Start :func:`report_server` in a daemon thread; ``(server, url)`` (``server.shutdown()``)."""
    server = report_server(folder, port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, report_url(server)
