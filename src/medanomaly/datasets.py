"""Datasets from a CSV manifest or a folder, read and preprocessed into an :class:`ImageSet`.

Manifest: a CSV with the columns ``path,label[,mask][,group][,split]``. ``label`` is ``0`` /
``normal`` or ``1`` / ``abnormal`` (empty = unknown); relative paths resolve against the
manifest's folder; ``group`` is the patient id.

Folder: either sub-folders named after labels (``normal/``, ``abnormal/``; other names can be
mapped with ``label_names``) or image files directly (labels unknown, e.g. all normal for
training). Each image file is a case; each sub-folder of DICOM files is one series (case).
Nothing in a folder is dropped silently: files that are not images and sub-folders that are
not label names are listed in the :class:`LoadReport` as skipped, with the reason.

With ``cache`` on, each case is read and put through the deterministic transforms once;
later loads read the stored arrays (see :mod:`medanomaly.cache`).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.cache import PreprocessCache, Preprocessed
from medanomaly.data import ABNORMAL, NORMAL, UNKNOWN, ImageSet
from medanomaly.errors import (
    ConfigError,
    ImageReadError,
    InvalidImageError,
    MedanomalyError,
    problem_text,
)
from medanomaly.image import SOURCE_GRID_KEY, MedicalImage
from medanomaly.io import IMAGE_SUFFIXES, image_suffix, read_image
from medanomaly.io.dicom import is_dicom_file
from medanomaly.transforms import FOREGROUND_KEY, LESION_KEY, Compose, build_transforms

log = logging.getLogger(__name__)

DEFAULT_LABEL_NAMES = {"normal": NORMAL, "0": NORMAL, "abnormal": ABNORMAL, "1": ABNORMAL}
MIN_SIZE = 2
"""Default ``data.min_size``: images with fewer voxels than this along an axis are skipped."""


@dataclass(frozen=True)
class InputSpec:
    """What a run's model takes: cases that do not fit are skipped before preprocessing.

    Attributes:
        spatial_dims: 2 for slices, 3 for volumes.
        channels: Image channels the model takes (``None``: any).
        shape: The preprocessed ``(C, *spatial)`` the model was trained on (``None``: any).
    """

    spatial_dims: int
    channels: int | None = None
    shape: tuple[int, ...] | None = None


def input_spec(detector: Any) -> InputSpec | None:
    """The :class:`InputSpec` of a detector (fitted or not); ``None`` when it says nothing."""
    dims = getattr(detector, "spatial_dims", None)
    if dims is None:
        return None
    shape = getattr(detector, "input_shape_", None)
    channels = getattr(detector, "in_channels", None)
    if shape is not None:
        channels = int(shape[0])
    if shape is None or getattr(detector, "scores_any_size", False):
        return InputSpec(int(dims), channels)
    return InputSpec(int(dims), channels, tuple(int(n) for n in shape))


@dataclass
class Case:
    """One row of a dataset before reading: where the image is and what is known about it."""

    path: Path
    label: int = UNKNOWN
    mask: Path | None = None
    group: str | None = None
    split: str | None = None
    problem: str | None = None
    """Why the entry is not a readable case (found while listing, e.g. not an image file)."""


@dataclass
class LoadReport:
    """Cases that could not be used, each with the reason, and non-fatal problems of the rest.

    Attributes:
        skipped: ``(path, problem)`` of every case left out.
        warnings: ``(path, problem)`` of problems in cases that were kept (e.g. slices
            missing from a DICOM series); they do not make the report true.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.skipped)

    def lines(self) -> list[str]:
        """One ``path: problem`` line per skipped case."""
        return [f"{path}: {problem}" for path, problem in self.skipped]

    def warning_lines(self) -> list[str]:
        """One ``path: problem`` line per problem of a kept case."""
        return [f"{path}: {problem}" for path, problem in self.warnings]


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


def _entries(folder: Path) -> list[Path]:
    """Everything directly inside ``folder`` except hidden entries, sorted."""
    return [entry for entry in sorted(folder.iterdir()) if not entry.name.startswith(".")]


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
    else:
        cases = _folder_cases(folder)
    if not any(case.problem is None for case in cases):
        found = ", ".join(e.name for e in entries[:5]) or "nothing"
        raise ImageReadError(
            folder, f"no image files found (found: {found}; supported: {', '.join(IMAGE_SUFFIXES)})"
        )
    return cases


def list_cases(source: str | Path, label_names: dict[str, int] | None = None) -> list[Case]:
    """Cases of a manifest (``.csv``) or a folder."""
    source = Path(source)
    if source.suffix.lower() == ".csv":
        return read_manifest(source, label_names)
    return scan_folder(source, label_names)


def _read_facts(image: MedicalImage) -> dict[str, Any]:
    """What the fit checks need to know of a case as read (kept in the cache)."""
    file_shape = image.meta.get("file_shape")
    return {
        "read_shape": [int(n) for n in image.array.shape],
        "file_shape": None if file_shape is None else [int(n) for n in file_shape],
        "format": image.meta.get("format"),
    }


def _size_text(shape: Any) -> str:
    return "×".join(str(int(n)) for n in shape)


def check_fits(
    path: str | Path, facts: dict[str, Any], expect: InputSpec | None, min_size: int
) -> None:
    """Refuse a case whose dimensionality, channels or size do not fit the run.

    Args:
        path: The case (for the error).
        facts: From reading it: ``read_shape`` ``(C, *spatial)`` and the ``file_shape``.
        expect: What the model takes (``None``: only the size is checked).
        min_size: Fewest voxels allowed along any spatial axis longer than one voxel.

    Raises:
        InvalidImageError: The case does not fit; the message says how.
    """
    problem = _misfit(facts, expect, min_size)
    if problem is not None:
        raise InvalidImageError(path, problem)


def _misfit(facts: dict[str, Any], expect: InputSpec | None, min_size: int) -> str | None:
    """Why a case read as ``facts`` cannot go into the model, or ``None``."""
    channels, *spatial = facts["read_shape"]
    stored = _size_text(facts.get("file_shape") or spatial)
    thick = [n for n in spatial if n > 1]
    one_slice = len(spatial) == 3 and len(thick) == 2 and min(thick) >= min_size
    if expect is not None and expect.spatial_dims == 3 and (len(spatial) == 2 or one_slice):
        return f"a 2-D image ({stored}) cannot go into a 3-D model"
    if not thick or min(thick) < min_size:  # one-voxel axes are a slice stored as a volume
        kind = "volume" if len(spatial) == 3 else "image"
        return (
            f"{kind} {_size_text(spatial)} is smaller than the minimum of {min_size} voxels "
            "per axis (data.min_size)"
        )
    if expect is None:
        return None
    if expect.spatial_dims == 2 and len(spatial) == 3:
        return f"a 3-D volume ({stored}) cannot go into a 2-D model"
    if expect.channels is not None and channels != expect.channels:
        return f"{channels} channels (stored as {stored}); the run's model takes {expect.channels}"
    return None


def _preprocess(
    case: Case,
    pipeline: Compose,
    read_options: dict[str, Any],
    expect: InputSpec | None = None,
    min_size: int = MIN_SIZE,
) -> Preprocessed:
    """Read one case (and its lesion mask), check that it fits the run, preprocess both."""
    image = read_image(case.path, **read_options)
    facts = _read_facts(image)
    check_fits(case.path, facts, expect, min_size)
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
    masks = {
        k: np.asarray(image.meta[k], bool) for k in (FOREGROUND_KEY, LESION_KEY) if k in image.meta
    }
    return Preprocessed(
        array=array,
        masks=masks,
        problems=list(image.problems),
        grid=image.meta.get(SOURCE_GRID_KEY),
        facts=facts,
    )


def _load_case(
    case: Case,
    pipeline: Compose,
    read_options: dict[str, Any],
    cache: PreprocessCache | None,
    expect: InputSpec | None,
    min_size: int,
) -> Preprocessed:
    """Preprocess one case, through the cache when there is one; refuse cases that do not fit."""
    if case.problem is not None:
        raise ImageReadError(case.path, case.problem)
    if cache is None:
        result = _preprocess(case, pipeline, read_options, expect, min_size)
    else:
        key = cache.key(case.path, pipeline, read_options, mask=case.mask)
        details = {"source": str(case.path), "transforms": pipeline.to_config()}
        compute = lambda: _preprocess(case, pipeline, read_options, expect, min_size)  # noqa: E731
        result = cache.fetch(key, compute, details)
        if result.facts:  # a hit was stored by another run: check it against this one
            check_fits(case.path, result.facts, expect, min_size)
    if expect is not None and expect.shape is not None and result.array.shape != expect.shape:
        raise InvalidImageError(
            case.path,
            f"preprocessed to shape {tuple(result.array.shape)}, not the model's input "
            f"{expect.shape}",
        )
    return result


def load_dataset(
    source: str | Path,
    transforms: list[dict[str, Any]] | None = None,
    label_names: dict[str, int] | None = None,
    read_options: dict[str, Any] | None = None,
    strict: bool = False,
    augment: bool = False,
    cache: bool | str | Path | None = None,
    min_size: int = MIN_SIZE,
    expect: InputSpec | None = None,
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
        cache: Store the result of the deterministic transforms per case and read it back
            on later loads: ``None``/``False`` off, ``True`` in ``$MEDANOMALY_CACHE`` (else
            ``~/.cache/medanomaly``), a folder name for that folder. Random transforms stay
            live.
        min_size: Skip images with fewer voxels than this along any axis (as read).
        expect: What the run's model takes (:func:`input_spec`): cases of another
            dimensionality, channel count or preprocessed shape are skipped and named.

    Returns:
        The image set and a report of skipped cases (each with its reason).
    """
    pipeline, augmentation = build_transforms(transforms).split_deterministic()
    store = PreprocessCache.from_option(cache)
    report = LoadReport()
    arrays, lesions, foregrounds, grids, kept = [], [], [], [], []
    for case in list_cases(source, label_names):
        try:
            result = _load_case(case, pipeline, read_options or {}, store, expect, min_size)
        except (MedanomalyError, OSError, ValueError) as error:
            if strict:
                raise
            report.skipped.append((str(case.path), problem_text(error, case.path)))
            log.info("skipping %s", case.path, exc_info=True)
            continue
        for problem in result.problems:
            report.warnings.append((str(case.path), problem))
            log.info("%s: %s", case.path, problem)
        arrays.append(result.array)
        lesions.append(result.masks.get(LESION_KEY))
        foregrounds.append(result.masks.get(FOREGROUND_KEY))
        grids.append(result.grid)
        kept.append(case)
    if store is not None:
        log.info(
            "preprocessing cache %s: %d read, %d written", store.root, store.hits, store.misses
        )
    if not arrays:
        raise ImageReadError(source, "no readable images: " + "; ".join(report.lines()[:3]))
    _check_one_grid(source, arrays, kept)
    spatial = arrays[0].shape[1:]
    return (
        ImageSet(
            images=np.stack(arrays),
            labels=np.array([c.label for c in kept]),
            ids=[str(c.path) for c in kept],
            masks=_stack_masks(lesions, spatial, fill=False),
            foreground=_stack_masks(foregrounds, spatial, fill=True),
            groups=np.array([c.group or str(c.path) for c in kept]),
            augment=ArrayAugment(augmentation) if augment and len(augmentation) else None,
            grids=grids,
        ),
        report,
    )


def _check_one_grid(source: str | Path, arrays: list[np.ndarray], cases: list[Case]) -> None:
    """Raise ConfigError naming the cases whose preprocessed shape differs from the most common."""
    shapes = [a.shape for a in arrays]
    common = max(set(shapes), key=shapes.count)
    odd = [f"{c.path.name} {s}" for c, s in zip(cases, shapes, strict=True) if s != common]
    if odd:
        raise ConfigError(
            f"{source}: images end up with different shapes (most are {common}; "
            f"{', '.join(odd[:4])}{' ...' if len(odd) > 4 else ''}); add a 'resize' (or 'pad') "
            "step to data.transforms"
        )


def _stack_masks(
    masks: list[np.ndarray | None], spatial: tuple[int, ...], fill: bool
) -> np.ndarray | None:
    """Stack per-case masks; cases without one get all-``fill``; ``None`` if no case has one."""
    if all(m is None for m in masks):
        return None
    return np.stack([np.full(spatial, fill, bool) if m is None else m for m in masks])


class ArrayAugment:
    """Apply random transforms to a bare array ``(C, *spatial)`` (unit spacing)."""

    def __init__(self, transforms: Compose) -> None:
        self.transforms = transforms

    def set_random_state(self, seed: int | None) -> ArrayAugment:
        """Reseed the random transforms (see :meth:`Compose.set_random_state`)."""
        self.transforms.set_random_state(seed)
        return self

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """One random draw of the transforms applied to ``array``."""
        spacing = (1.0,) * (array.ndim - 1)
        return self.transforms(MedicalImage(array=array, spacing=spacing)).array
