"""A real Orthanc server with the DICOMweb plugin on a free loopback port, for tests.

Debian packages it: ``apt-get install orthanc orthanc-dicomweb`` (``.ci/run`` does so).
The server runs as a plain process with a JSON config in a temporary folder: storage there,
HTTP on 127.0.0.1 only, the DICOM port off, one user with a password.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ORTHANC = "Orthanc"
PLUGIN_FOLDERS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
PLUGIN = "libOrthancDicomWeb.so"
INSTALL = "apt-get install orthanc orthanc-dicomweb"
USER, PASSWORD = "medanomaly", "s3cret-Pw-4-tests"


def dicomweb_plugin() -> Path | None:
    """The DICOMweb plugin's library, or ``None``."""
    for folder in PLUGIN_FOLDERS:
        found = sorted(Path(folder).glob(f"{PLUGIN}*")) if Path(folder).is_dir() else []
        if found:
            return found[0]
    return None


def skip_without_orthanc() -> Path:
    """The plugin's path; skips the test (naming the install command) without Orthanc."""
    plugin = dicomweb_plugin()
    if shutil.which(ORTHANC) is None or plugin is None:
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed (run: {INSTALL})")
    return plugin


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancServer:
    """One Orthanc process; :meth:`stop` and :meth:`start` again keep its storage.

    Args:
        folder: Its config, storage and log go here.
        plugin: The DICOMweb plugin library.
    """

    def __init__(self, folder: Path, plugin: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        config = {
            "Name": "medanomaly-test",
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "OverwriteInstances": True,
            "StableAge": 1,
        }
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps(config))

    @property
    def rest(self) -> str:
        """The REST API's root."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The archive's ``dicomweb+http://`` URL (service root)."""
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web/"

    def start(self, timeout: float = 30.0) -> OrthancServer:
        """Start the process and wait until it answers."""
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 (lives with the process)
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: see {self.folder / 'orthanc.log'}")
            try:
                if self.get("/system").ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not answer within {timeout} s")

    def stop(self) -> None:
        """Stop the process (and wait for it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def get(self, path: str) -> requests.Response:
        """``GET`` on the REST API with the server's user."""
        return requests.get(self.rest + path, auth=(USER, PASSWORD), timeout=30)
