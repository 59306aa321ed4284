"""Datasets from a CSV manifest or a folder, read and preprocessed into an :class:`ImageSet`.

Manifest: a CSV with the columns ``path,label[,mask][,group][,split]``. ``label`` is ``0`` /
``normal`` or ``1`` / ``abnormal`` (empty = unknown); relative paths resolve against the
manifest's folder; ``group`` is the patient id.

Folder: either sub-folders named after labels (``normal/``, ``abnormal/``; other names can be
mapped with ``label_names``) or image files directly (labels unknown, e.g. all normal for
training). Each image file is a case; each sub-folder of DICOM files is one series (case).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data import ABNORMAL, NORMAL, UNKNOWN, ImageSet
from medanomaly.errors import ConfigError, ImageReadError, InvalidImageError, MedanomalyError
from medanomaly.image import MedicalImage
from medanomaly.io import IMAGE_SUFFIXES, image_suffix, read_image
from medanomaly.transforms import LESION_KEY, Compose, build_transforms

log = logging.getLogger(__name__)

DEFAULT_LABEL_NAMES = {"normal": NORMAL, "0": NORMAL, "abnormal": ABNORMAL, "1": ABNORMAL}


@dataclass
class Case:
    """One row of a dataset before reading: where the image is and what is known about it."""

    path: Path
    label: int = UNKNOWN
    mask: Path | None = None
    group: str | None = None
    split: str | None = None


@dataclass
class LoadReport:
    """Cases that could not be used, each with the reason."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.skipped)

    def lines(self) -> list[str]:
        """One ``path: problem`` line per skipped case."""
        return [f"{path}: {problem}" for path, problem in self.skipped]


def parse_label(value: str, label_names: dict[str, int], where: str) -> int:
    """Map a label string to 0, 1 or -1 (empty)."""
    key = str(value).strip().lower()
    if key in ("", "-1", "nan", "none", "unknown"):
        return UNKNOWN
    if key not in label_names:
        raise ConfigError(f"{where}: unknown label {value!r}; known: {sorted(label_names)}")
    return label_names[key]


def read_manifest(path: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Read a CSV manifest into cases (paths resolved against the manifest's folder)."""
    path = Path(path)
    names = {**DEFAULT_LABEL_NAMES, **(label_names or {})}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns:
            raise ConfigError(f"{path}: a manifest needs a 'path' column, found {columns}")
        cases = []
        for line, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            where = f"{path}:{line}"
            cases.append(
                Case(
                    path=path.parent / row["path"],
                    label=parse_label(row.get("label", ""), names, where),
                    mask=path.parent / row["mask"] if row.get("mask") else None,
                    group=row.get("group") or None,
                    split=row.get("split") or None,
                )
            )
    return cases


def _case_paths(folder: Path) -> list[Path]:
    """Image files and DICOM-series sub-folders directly inside ``folder``, sorted."""
    return [
        entry
        for entry in sorted(folder.iterdir())
        if not entry.name.startswith(".")
        and (entry.is_dir() or image_suffix(entry) in IMAGE_SUFFIXES)
    ]


def scan_folder(folder: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Cases of a folder: ``<label>/`` sub-folders if present, else its files (unlabelled)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(folder, "not a folder or manifest")
    names = {**DEFAULT_LABEL_NAMES, **(label_names or {})}
    labelled = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.lower() in names]
    if labelled:
        return [Case(p, names[d.name.lower()]) for d in labelled for p in _case_paths(d)]
    has_files = any(p.is_file() for p in _case_paths(folder))
    cases = [Case(p) for p in _case_paths(folder) if p.is_file() or not has_files]
    if not cases:
        raise ImageReadError(folder, f"no image files found (supported: {sorted(IMAGE_SUFFIXES)})")
    return cases


def list_cases(source: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Cases of a manifest (``.csv``) or a folder."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, label_names)
    return scan_folder(source, label_names)


def _load_case(
    case: Case, pipeline: Compose, read_options: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one case (and its lesion mask), preprocess both, return arrays."""
    image = read_image(case.path, **read_options)
    if case.mask is not None:
        mask = read_image(case.mask).array[0] > 0
        if mask.shape != image.spatial_shape:
            raise InvalidImageError(
                case.mask, f"mask shape {mask.shape} differs from image shape {image.spatial_shape}"
            )
        image.meta[LESION_KEY] = mask
    image = pipeline(image)
    array = np.asarray(image.array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InvalidImageError(case.path, "preprocessed image contains NaN or infinite values")
    return array, image.meta.get(LESION_KEY)


def load_dataset(
    source: str | Path,
    transforms: list[dict[str, Any]] | None = None,
    label_names: dict[str, int] | None = None,
    read_options: dict[str, Any] | None = None,
    strict: bool = False,
    augment: bool = False,
) -> tuple[ImageSet, LoadReport]:
    """Read and preprocess every case of a manifest or folder.

    Args:
        source: A CSV manifest or a folder.
        transforms: Preprocessing in the YAML list form of :func:`build_transforms`; the
            result must put every image on one grid (e.g. end with ``resize``).
        label_names: Extra label names, e.g. ``{"hemorrhage": 1}``.
        read_options: Keyword arguments of :func:`medanomaly.io.read_image`.
        strict: Raise on the first unreadable case instead of skipping it.
        augment: Attach the random transforms of ``transforms`` (everything from the first
            random one on) to the set, to be drawn anew each time an image is used in
            training. Without it they are left out (validation, scoring).

    Returns:
        The image set and a report of skipped cases (each with its reason).
    """
    pipeline, augmentation = build_transforms(transforms).split_deterministic()
    report = LoadReport()
    arrays, masks, kept = [], [], []
    for case in list_cases(source, label_names):
        try:
            array, mask = _load_case(case, pipeline, read_options or {})
        except (MedanomalyError, OSError, ValueError) as error:
            if strict:
                raise
            report.skipped.append((str(case.path), str(error)))
            log.warning("skipping %s: %s", case.path, error)
            continue
        arrays.append(array)
        masks.append(mask)
        kept.append(case)
    if not arrays:
        raise ImageReadError(source, "no readable images: " + "; ".join(report.lines()[:3]))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ConfigError(
            f"{source}: images end up with different shapes {sorted(shapes)[:4]}; add a "
            "'resize' (or 'pad') step to data.transforms"
        )
    has_masks = any(m is not None for m in masks)
    return (
        ImageSet(
            images=np.stack(arrays),
            labels=np.array([c.label for c in kept]),
            ids=[str(c.path) for c in kept],
            masks=np.stack(
                [m if m is not None else np.zeros(arrays[0].shape[1:], bool) for m in masks]
            )
            if has_masks
            else None,
            groups=np.array([c.group or str(c.path) for c in kept]),
            augment=_ArrayAugment(augmentation) if augment and len(augmentation) else None,
        ),
        report,
    )


class _ArrayAugment:
    """Apply random transforms to a bare array ``(C, *spatial)`` (unit spacing)."""

    def __init__(self, transforms: Compose) -> None:
        self.transforms = transforms

    def __call__(self, array: np.ndarray) -> np.ndarray:
        spacing = (1.0,) * (array.ndim - 1)
        return self.transforms(MedicalImage(array=array, spacing=spacing)).array
