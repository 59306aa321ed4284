"""Which cases a data source holds, before anything is read: manifests, folders, archives.

Manifest: a CSV with the columns ``path,label[,mask][,group][,split]``. ``label`` is ``0`` /
``normal`` or ``1`` / ``abnormal`` (empty = unknown); relative paths resolve against the
manifest's folder; ``group`` is the patient id.

Folder: either sub-folders named after labels (``normal/``, ``abnormal/``; other names can be
mapped with ``label_names``) or image files directly (labels unknown, e.g. all normal for
training). Each image file is a case; each sub-folder of DICOM files is one series (case);
a DICOM series folder itself is one case, and a folder of patient folders gives every image
in them, grouped by patient (see :mod:`medanomaly.data.layouts`).
Nothing in a folder is dropped silently: files that are not images and sub-folders that are
not label names are listed as cases with a :attr:`Case.problem`, to be reported as skipped.

Archive: a ``dicomweb+http(s)://`` URL lists the series its QIDO-RS query finds.

Reading and preprocessing the listed cases is :mod:`medanomaly.data.loading`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medanomaly.data.layouts import holds_patient_folders, is_series_folder, patient_entries
from medanomaly.data.sets import ABNORMAL, NORMAL, UNKNOWN
from medanomaly.errors import ConfigError, ImageReadError, MissingFileError
from medanomaly.io import IMAGE_SUFFIXES, image_suffix
from medanomaly.io.atomic import atomic_write
from medanomaly.io.dicom import is_dicom_file
from medanomaly.io.dicomweb import Archive, RemoteSeries, find_series, is_dicomweb_url
from medanomaly.io.written import is_output_folder, is_written_map

DEFAULT_LABEL_NAMES = {"normal": NORMAL, "0": NORMAL, "abnormal": ABNORMAL, "1": ABNORMAL}


@dataclass
class Case:
    """One row of a dataset before reading: where the image is and what is known about it.

    ``path`` is a file or DICOM series folder, or a series in a DICOMweb archive.
    """

    path: Path | RemoteSeries
    label: int = UNKNOWN
    mask: Path | None = None
    group: str | None = None
    split: str | None = None
    problem: str | None = None
    """Why the entry is not a readable case (found while listing, e.g. not an image file)."""


def parse_label(value: str, label_names: dict[str, int], where: str) -> int:
    """Map a label string to 0, 1 or -1 (empty)."""
    key = str(value).strip().lower()
    if key in ("", "-1", "nan", "none", "unknown"):
        return UNKNOWN
    if key not in label_names:
        raise ConfigError(f"{where}: unknown label {value!r}; known: {sorted(label_names)}")
    return label_names[key]


def read_manifest(path: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Read a CSV manifest into cases (paths resolved against the manifest's folder).

    A row naming the same image as an earlier row is kept as a case with a problem (skipped
    and named with both row numbers; fatal with ``strict``), so no image is used twice.
    """
    path = Path(path)
    names = {**DEFAULT_LABEL_NAMES, **(label_names or {})}
    if not path.is_file():
        raise MissingFileError(f"{path}: no such manifest")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ConfigError(f"{path}: a manifest needs a 'path' column, found {columns}")
        cases = []
        first_row: dict[Path, int] = {}
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            where = f"{path}:{line}"
            if is_dicomweb_url(row["path"]):  # every series the query finds, with this row's label
                label = parse_label(row.get("label", ""), names, where)
                found = find_series(Archive.parse(row["path"]))
                group, split = row.get("group") or None, row.get("split") or None
                cases += [Case(path=s, label=label, group=group, split=split) for s in found]
                continue
            image = path.parent / row["path"]
            seen = first_row.setdefault(_same_file_key(image), line)
            duplicate = f"{path.name} row {line} repeats row {seen} (the same image)"
            cases.append(
                Case(
                    path=image,
                    label=parse_label(row.get("label", ""), names, where),
                    mask=path.parent / row["mask"] if row.get("mask") else None,
                    group=row.get("group") or None,
                    split=row.get("split") or None,
                    problem=duplicate if seen != line else None,
                )
            )
    return cases


def manifest_column(path: str | Path, column: str) -> dict[str, str]:
    """``{case id: value}`` of one extra column of a manifest (ids as :func:`read_manifest`'s).

    Raises:
        ConfigError: ``path`` is not a manifest or has no such column.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"{path}: column {column!r} needs a CSV manifest, not a folder")
    if not path.is_file():
        raise MissingFileError(f"{path}: no such manifest")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if column not in columns:
            raise ConfigError(f"{path}: no column {column!r} (found {columns})")
        rows = [{k.strip(): (v or "").strip() for k, v in raw.items() if k} for raw in reader]
    return {str(path.parent / row["path"]): row[column] for row in rows}


MANIFEST_COLUMNS = ("path", "label", "group", "mask")


def write_manifest(path: str | Path, cases: Sequence[Case]) -> Path:
    """Write ``cases`` as a manifest that :func:`read_manifest` reads back as the same cases.

    Paths are written relative to the manifest's folder where they lie below it; unknown
    labels are left empty.
    """
    path = Path(path)
    base = path.parent.resolve()

    def where(file: Path | None) -> str:
        if file is None:
            return ""
        file = file.resolve()
        return file.relative_to(base).as_posix() if base in file.parents else str(file)

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for case in cases:
            label = "" if case.label == UNKNOWN else str(case.label)
            writer.writerow([where(case.path), label, case.group or "", where(case.mask)])

    atomic_write(path, write, mode="w")
    return path


def _same_file_key(path: Path) -> Path:
    """``path`` without ``..`` and symlinks where it exists, to spot the same file twice."""
    try:
        return path.resolve()
    except OSError:
        return path


def _entries(folder: Path) -> list[Path]:
    """Entries of ``folder``, sorted: not hidden, not maps medanomaly wrote (its outputs)."""
    return [
        entry
        for entry in sorted(folder.iterdir())
        if not entry.name.startswith(".")
        and not (is_output_folder(entry) if entry.is_dir() else is_written_map(entry))
    ]


def _is_image_file(path: Path) -> bool:
    """A file with a known image suffix, or a DICOM file of any name (preamble or not)."""
    return path.is_file() and (
        image_suffix(path) in IMAGE_SUFFIXES or is_dicom_file(path, force=True)
    )


def _folder_cases(folder: Path, label: int = UNKNOWN) -> list[Case]:
    """Cases of one folder: image files and sub-folders (DICOM series); other files as problems."""
    cases = []
    for entry in _entries(folder):
        problem = None
        if not entry.is_dir() and not _is_image_file(entry):
            problem = (
                f"not an image file (suffix '{image_suffix(entry) or '(none)'}' and no DICOM "
                f"header; supported: {', '.join(IMAGE_SUFFIXES)})"
            )
        cases.append(Case(entry, label, problem=problem))
    return cases


def scan_folder(folder: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Cases of a folder: ``<label>/`` sub-folders if present, else its files (unlabelled).

    Entries that cannot be cases (non-image files, sub-folders not named after a label
    beside label folders) are returned with :attr:`Case.problem` set, to be reported.

    Raises:
        ImageReadError: ``folder`` is not a folder or holds no image at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "not a folder or manifest")
    names = {**DEFAULT_LABEL_NAMES, **(label_names or {})}
    entries = _entries(folder)
    labelled = [d for d in entries if d.is_dir() and d.name.lower() in names]
    if labelled:
        cases = [c for d in labelled for c in _folder_cases(d, names[d.name.lower()])]
        problem = (
            f"not read: beside the label folders only folders named after a label are read "
            f"(labels: {', '.join(sorted(names))}; map other names with label_names)"
        )
        cases += [Case(e, problem=problem) for e in entries if e not in labelled]
    elif is_series_folder(folder, entries):
        cases = [Case(folder)]
    elif holds_patient_folders(entries, _entries):
        cases = _patient_folder_cases(entries)
    else:
        cases = _folder_cases(folder)
    if not any(case.problem is None for case in cases):
        found = ", ".join(e.name for e in entries[:5]) or "nothing"
        raise ImageReadError(
            folder, f"no image files found (found: {found}; supported: {', '.join(IMAGE_SUFFIXES)})"
        )
    return cases


def _patient_folder_cases(entries: Sequence[Path]) -> list[Case]:
    """Cases of a folder of patient folders (see :mod:`medanomaly.data.layouts`)."""
    cases = []
    for entry in entries:
        if entry.is_dir():
            found = patient_entries(entry, _entries, _is_image_file)
            cases += [Case(e.path, mask=e.mask, group=e.group, problem=e.problem) for e in found]
        elif _is_image_file(entry):
            cases.append(Case(entry))
        else:
            cases.append(Case(entry, problem="not an image file"))
    return cases


def list_cases(
    source: str | Path, label_names: dict[str, int] | None = None, ca_bundle: str | None = None
) -> list[Case]:
    """Cases of a manifest (``.csv``), a folder, or a DICOMweb archive's series.

    A ``dicomweb+http(s)://HOST:PORT/PATH?FILTERS`` URL lists the series that match the
    QIDO-RS filters (labels unknown; see :mod:`medanomaly.io.dicomweb`); a manifest's
    ``path`` may be such a URL too, giving every series it finds the row's label.

    Raises:
        ArchiveAccessError: The archive refused the credentials.
        ArchiveUnreachableError: It could not be reached.
        ImageReadError: No case at all (the query matched no series, the folder is empty).
    """
    if is_dicomweb_url(source):
        archive = Archive.parse(str(source), ca_bundle)
        series = find_series(archive)
        if not series:
            raise ImageReadError(archive, f"no series match the query {dict(archive.filters)}")
        return [Case(s) for s in series]
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, label_names)
    return scan_folder(source, label_names)


SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
"""The values of a manifest's ``split`` column and the part each one names."""


def check_groups_apart(groups_by_part: dict[str, Sequence[str]], where: str) -> None:
    """Refuse parts that share a patient group.

    Args:
        groups_by_part: The group of every case of each part (``train``, ``val``, ``test``).
        where: What is being split, for the error.

    Raises:
        ConfigError: Naming the first shared group, both parts and how many groups straddle.
    """
    owners: dict[str, str] = {}
    straddling: list[tuple[str, str, str]] = []
    for part, groups in groups_by_part.items():
        for group in sorted({str(g) for g in groups}):
            first = owners.setdefault(group, part)
            if first != part:
                straddling.append((group, first, part))
    if straddling:
        group, first, second = straddling[0]
        raise ConfigError(
            f"{where}: patient group {group!r} has cases in both {first} and {second} "
            f"({len(straddling)} group(s) straddle parts); a patient must stay in one part"
        )


def split_part_names(values: Sequence[str | None], where: str) -> list[str]:
    """The part (``train``, ``val``, ``test``) each ``split`` value names.

    Raises:
        ConfigError: A missing or unknown value (with the count of such cases).
    """
    cleaned = [(v or "").strip().lower() for v in values]
    bad = sorted({v for v in cleaned if v not in SPLIT_NAMES})
    if bad:
        raise ConfigError(
            f"{where}: the split column holds {bad}; use train, val (or validation) and "
            f"test for every case ({sum(v not in SPLIT_NAMES for v in cleaned)} case(s) left)"
        )
    return [SPLIT_NAMES[v] for v in cleaned]


def split_parts(cases: Sequence[Case], source: str | Path) -> dict[str, list[Case]] | None:
    """The cases of a manifest's ``split`` column by part, or ``None`` when no case has one.

    Raises:
        ConfigError: A case without a split or with an unknown one (with the count), or a
            patient group in two parts (named).
    """
    if not any(case.split for case in cases):
        return None
    names = split_part_names([case.split for case in cases], str(source))
    parts: dict[str, list[Case]] = {"train": [], "val": [], "test": []}
    for case, name in zip(cases, names, strict=True):
        parts[name].append(case)
    groups = {part: [c.group or str(c.path) for c in found] for part, found in parts.items()}
    check_groups_apart(groups, f"{source}: the split column")
    return parts
