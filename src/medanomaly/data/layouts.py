"""The folder layouts people have, recognised where that is unambiguous.

* **A DICOM series folder** (the DICOM files of one ``SeriesInstanceUID``, perhaps beside a few
  text files): the folder itself is one case, as ``medanomaly inspect`` reads it.
* **A folder of series**: each sub-folder of DICOM files is one case.
* **A folder of patient folders** (BraTS, kaggle_3m): each sub-folder holds NIfTI, DICOM or
  picture files, or series folders; every image in it is a case whose ``group`` is the
  patient folder's name, so grouped splits work without a manifest. Files whose names say
  they are masks (``*_mask*``, ``*seg*``, ``*mask*``) are not cases: ``X_mask.ext`` is the
  lesion mask of ``X.ext``, and a single ``*seg*`` file is the mask of every image beside it.

:func:`~medanomaly.data.listing.list_cases` lists a folder's cases by these layouts;
``medanomaly manifest`` writes them out as an editable CSV manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from medanomaly.io import IMAGE_SUFFIXES, image_suffix
from medanomaly.io.dicom import is_dicom_file, series_uids

MAX_DEPTH = 3
"""Folder levels searched below a patient folder (patient / study / series)."""


@dataclass(frozen=True)
class Entry:
    """One case found in a folder: its path, patient group and lesion mask, if any."""

    path: Path
    group: str | None = None
    mask: Path | None = None
    problem: str | None = None


def is_mask_name(path: Path) -> bool:
    """True for a file whose name says it is a mask or segmentation, not an image."""
    stem = path.name.lower()
    return "mask" in stem or "seg" in stem


def is_series_folder(folder: Path, entries: Sequence[Path]) -> bool:
    """True when ``folder`` holds the DICOM files of exactly one series and no sub-folders.

    Args:
        folder: The folder.
        entries: Its visible entries (as the folder reader lists them).
    """
    if any(entry.is_dir() for entry in entries):
        return False
    files = [e for e in entries if image_suffix(e) in ("", ".dcm") or e.suffix.isdigit()]
    others = [e for e in entries if e not in files and image_suffix(e) in IMAGE_SUFFIXES]
    if others or len(files) < 2:
        return False
    dicom = [f for f in files if is_dicom_file(f, force=True)]
    return len(dicom) >= 2 and len(series_uids(dicom)) == 1


def holds_patient_folders(
    entries: Sequence[Path], list_entries: Callable[[Path], list[Path]]
) -> bool:
    """True when a folder's sub-folders are patient folders rather than DICOM series.

    A sub-folder is a patient folder when it holds a sub-folder or a non-DICOM image file
    (NIfTI, a picture, ...); a folder of plain series folders keeps one case per series.
    """
    for folder in (e for e in entries if e.is_dir()):
        inside = list_entries(folder)
        if any(e.is_dir() for e in inside):
            return True
        if any(image_suffix(e) in IMAGE_SUFFIXES and image_suffix(e) != ".dcm" for e in inside):
            return True
    return False


def patient_entries(
    folder: Path,
    list_entries: Callable[[Path], list[Path]],
    is_image: Callable[[Path], bool],
    group: str | None = None,
    depth: int = 0,
) -> list[Entry]:
    """The cases of one patient folder (``group`` defaults to its name).

    Args:
        folder: The patient folder (or a folder below it).
        list_entries: Lists a folder's visible entries.
        is_image: Whether a file is an image the readers take.
        group: The patient's group (the top patient folder's name).
        depth: Levels below the patient folder already.
    """
    group = group or folder.name
    entries = list_entries(folder)
    if is_series_folder(folder, entries):
        return [Entry(folder, group)]
    images = [e for e in entries if e.is_file() and is_image(e)]
    masks = [e for e in images if is_mask_name(e)]
    found = []
    for entry in entries:
        if entry.is_dir():
            if depth + 1 < MAX_DEPTH:
                found += patient_entries(entry, list_entries, is_image, group, depth + 1)
            else:
                found.append(Entry(entry, group, problem="too deep below the patient folder"))
        elif entry in masks:
            continue
        elif entry in images:
            found.append(Entry(entry, group, _mask_of(entry, masks)))
        else:
            found.append(Entry(entry, group, problem="not an image file"))
    return found


def _mask_of(image: Path, masks: Sequence[Path]) -> Path | None:
    """``X_mask.ext`` beside ``X.ext``; else the folder's only ``*seg*`` file; else none."""
    suffix = image_suffix(image)
    stem = image.name[: -len(suffix)] if suffix else image.name
    for mask in masks:
        if mask.name == f"{stem}_mask{suffix}":
            return mask
    segmentations = [m for m in masks if "seg" in m.name.lower()]
    return segmentations[0] if len(segmentations) == 1 else None
