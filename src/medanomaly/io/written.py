"""Recognise what medanomaly itself wrote, so that it is never read back as a case.

A maps folder holds a hidden marker file (:data:`OUTPUT_MARKER`); each case's maps share a stem
``NNNNN_<name>`` with a sidecar ``<stem>_map.json``. Both let the folder reader leave them out
when ``--maps`` points inside ``--data``.
"""

from __future__ import annotations

import re
from pathlib import Path

OUTPUT_MARKER = ".medanomaly-output"
"""Hidden file in every maps folder medanomaly writes."""

_MAP_SUFFIXES = (
    "_map.nii.gz",
    "_map.tiff",
    "_overlay.png",
    "_map.dcm",
    "_map.json",
    ".npy",
    ".png",
)
_STEM = re.compile(r"^\d{5}_.+")


def is_output_folder(folder: Path) -> bool:
    """True for a folder medanomaly wrote (it holds :data:`OUTPUT_MARKER`)."""
    return (folder / OUTPUT_MARKER).is_file()


def is_written_map(path: Path) -> bool:
    """True for a map file medanomaly wrote: ``NNNNN_<name><suffix>`` beside its sidecar."""
    name = path.name
    for suffix in _MAP_SUFFIXES:
        if name.endswith(suffix) and _STEM.match(name):
            stem = name[: -len(suffix)]
            if (path.parent / f"{stem}_map.json").is_file():
                return True
    return False
