"""A DICOM Key Object Selection document per study listing the series a screen flagged.

A radiologist finds the flagged series from the worklist or the archive's viewer: the
document (title "Of Interest", DCM 113000) references every instance of each flagged series
of its study, and its description lists each series with its score and the threshold. Its
UIDs follow from the study and the run, so a rerun replaces it (highdicom writes it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom.sr.codedict import codes

from medanomaly._version import __version__
from medanomaly.image import SourceGrid
from medanomaly.io.atomic import atomic_path
from medanomaly.outputs.dicom_maps import derived_uid, source_headers

SERIES_NUMBER = 9902
"""Series number of the key object documents (the maps are 9901)."""


@dataclass(frozen=True)
class FlaggedSeries:
    """A flagged DICOM case: its id, score and source grid (which names its files)."""

    case: str
    score: float
    grid: SourceGrid


def write_key_objects(
    folder: str | Path,
    flagged: Sequence[FlaggedSeries],
    threshold: float,
    model: str,
    run: str,
) -> list[Path]:
    """Write one Key Object Selection document per study that has flagged series.

    Args:
        folder: Where the documents go (``<study uid>_flagged.dcm``).
        flagged: The flagged DICOM cases.
        threshold: The screen's threshold (in the description).
        model: The detector's name.
        run: What identifies the run (the documents' UIDs derive from it).

    Returns:
        The files written.
    """
    studies: dict[str, list[tuple[FlaggedSeries, list]]] = {}
    for item in flagged:
        headers = source_headers(item.grid, Path(folder) / "none.dcm")
        studies.setdefault(str(headers[0].StudyInstanceUID), []).append((item, headers))
    written = []
    for study, items in sorted(studies.items()):
        path = Path(folder) / f"{study}_flagged.dcm"
        written.append(_write_one(path, study, items, threshold, model, run))
    return written


def _write_one(
    path: Path,
    study: str,
    items: list[tuple[FlaggedSeries, list]],
    threshold: float,
    model: str,
    run: str,
) -> Path:
    evidence = [header for _, headers in items for header in headers]
    lines = [f"{item.case} score {item.score:.5g}" for item, _ in items]
    description = f"medanomaly {model}: flagged above {threshold:.5g}: " + "; ".join(lines)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        content = hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=evidence,
            description=description[:1024],
        )
        document = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=derived_uid(study, run, model, "key objects series"),
            series_number=SERIES_NUMBER,
            sop_instance_uid=derived_uid(study, run, model, "key objects"),
            instance_number=1,
            manufacturer=f"medanomaly {__version__}",
            series_description=f"medanomaly {model} flagged series"[:64],
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        document.save_as(tmp)
    return path
