"""Send a job's DICOM Parametric Maps back into a DICOMweb archive (STOW-RS).

Each map written with ``--dicom`` (:mod:`medanomaly.outputs.dicom_maps`) references its
source series on the same frame of reference, so the archive's viewer shows it beside the
scan. Its UIDs are derived from the source series and the run, so storing it again (a rerun,
a resumed run) replaces the stored map rather than adding a second one. The maps of a chunk
of cases go in one STOW-RS request (up to :data:`~medanomaly.io.dicomweb.STOW_MAX_INSTANCES`
instances and :data:`~medanomaly.io.dicomweb.STOW_MAX_BYTES` bytes per request).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from medanomaly.detectors.base import EXPORT_FILE, LEGACY_MODEL_FILE, MODEL_FILE
from medanomaly.errors import ConfigError
from medanomaly.io.dicomweb import Archive, check_access, store_instances

#: Bytes read at a time when digesting a run's model file.
_CHUNK = 1 << 20


def run_identity(run: str | Path) -> str:
    """A digest of a run's model file (the one in a run folder, or the file given).

    An export folder (``medanomaly export``) is identified by its source run's digest, so that
    the maps it writes replace those of the run it came from.
    """
    path = Path(run)
    if path.is_dir() and (path / EXPORT_FILE).is_file():
        return str(json.loads((path / EXPORT_FILE).read_text())["source_run"]["digest"])
    if path.is_dir():
        saved = path / MODEL_FILE
        path = saved if saved.exists() else path / LEGACY_MODEL_FILE
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def open_store(url: str) -> Archive:
    """The archive maps go to, after checking that it lets this user in (one request).

    Raises:
        ArchiveAccessError: It refused the credentials.
        ArchiveUnreachableError: It could not be reached.
    """
    archive = Archive.parse(url)
    check_access(archive)
    return archive


def store_maps(archive: Archive, files: Sequence[str | Path]) -> list[str]:
    """Store the ``.dcm`` maps among ``files``, several per STOW-RS request.

    Returns:
        One problem line per map not stored (see
        :func:`~medanomaly.io.dicomweb.store_instances`).
    """
    maps = [Path(f) for f in files if str(f).endswith(".dcm")]
    if not maps:
        return []
    try:
        report = store_instances(archive, maps)
    except ConfigError as error:  # the archive refused the credentials: every map
        return [f"{file.name}: not stored in the archive: {error}" for file in maps]
    return [f"{file.name}: not stored in the archive: {problem}" for file, problem in report.failed]
