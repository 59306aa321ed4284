"""Temporary folders that a killed run does not leave behind for long.

Each folder's name holds the id of the process that made it
(``medanomaly-<kind>-<pid>-XXXX`` in the system's temporary folder). Python removes it when the
command ends; after ``kill -9`` it stays, and the next command that makes one removes every
such folder whose process is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

_NAME = re.compile(r"^medanomaly-[a-z]+-(\d+)-")


def temporary_folder(kind: str) -> tempfile.TemporaryDirectory:
    """A new temporary folder for ``kind`` (e.g. ``"stream"``), after clearing stale ones."""
    clear_stale_folders()
    return tempfile.TemporaryDirectory(prefix=f"medanomaly-{kind}-{os.getpid()}-")


def clear_stale_folders(root: str | Path | None = None) -> list[Path]:
    """Remove medanomaly's temporary folders whose process has ended; return them."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob("medanomaly-*-*-*"):
        match = _NAME.match(folder.name)
        if match and folder.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
