"""Files that scoring commands write: the per-case score table and the anomaly maps.

Maps are written on the model's grid (``.npy`` and a picture) and, for cases read from a
file, in the scan's own geometry (:mod:`medanomaly.outputs.source_maps`,
:mod:`medanomaly.outputs.dicom_maps`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.progress import CaseProgress
from medanomaly.detectors.base import AnomalyResult
from medanomaly.errors import MedanomalyError, problem_text
from medanomaly.image import SourceGrid
from medanomaly.io.atomic import atomic_path, atomic_write
from medanomaly.outputs.source_maps import MapInfo, to_source_grid, write_source_map
from medanomaly.viz.case_figure import save_case_figure

SCORE_COLUMNS = ("id", "label", "score", "prediction", "threshold")


def write_scores_csv(
    path: str | Path,
    ids: Sequence[str],
    labels: np.ndarray,
    result: AnomalyResult,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write one row per case: id, known label (-1 unknown), score, prediction, threshold.

    Args:
        path: CSV file (written atomically).
        ids: Case names.
        labels: Known labels (0, 1 or -1).
        result: Scores and predictions.
        extra: More per-case columns (e.g. conformal p-values).
    """
    extra = extra or {}

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow([*SCORE_COLUMNS, *extra])
        for i, case_id in enumerate(ids):
            row = [case_id, int(labels[i]), f"{result.scores[i]:.8g}", int(result.labels[i])]
            row.append(f"{result.threshold:.8g}")
            row.extend(f"{values[i]:.6g}" for values in extra.values())
            writer.writerow(row)

    atomic_write(path, write, mode="w")
    return Path(path)


def read_scores_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a score table back as a list of rows."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def case_stem(case_id: str, index: int) -> str:
    """A safe, unique file stem for a case."""
    name = Path(case_id).name
    for suffix in (".nii.gz", ".nii", ".npy", ".npz", ".png", ".jpg", ".tif", ".tiff", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "case"
    return f"{index:05d}_{safe}"


@dataclass
class MapsWritten:
    """What :func:`save_maps` wrote, and the cases it could not write a map for (named)."""

    files: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, other: MapsWritten) -> MapsWritten:
        """Take in what another call wrote."""
        self.files += other.files
        self.problems += other.problems
        return self


def save_maps(
    folder: str | Path,
    ids: Sequence[str],
    images: np.ndarray,
    result: AnomalyResult,
    grids: Sequence[SourceGrid | None] | None = None,
    *,
    model: str = "",
    dicom: bool = False,
    first_index: int = 0,
    indices: Sequence[int] | None = None,
    run: str = "",
) -> MapsWritten:
    """Save each case's maps: on the model's grid and, where known, in the scan's geometry.

    Per case ``<stem>`` (``NNNNN_<file name>``)::

        <stem>.npy, <stem>.png      the map on the model's grid, input | reconstruction | map
        <stem>_map.nii.gz           3D: the map on the source file's grid, source affine
        <stem>_map.tiff, <stem>_overlay.png
                                    2D: the map at the image's own size, and over the image
        <stem>_map.json             score, threshold, model, source shape and affine
        <stem>_map.dcm              with ``dicom``, for DICOM volumes: a Parametric Map that
                                    references the source series

    Args:
        folder: Output folder.
        ids: Case names (source paths).
        images: The preprocessed images ``(N, C, *spatial)``.
        result: Their scores and maps.
        grids: Each case's :class:`~medanomaly.image.SourceGrid` (``None``: model grid only).
        model: The detector's name, recorded beside the maps.
        dicom: Also write DICOM Parametric Maps for DICOM input.
        first_index: Index of the first case in the whole batch (stems stay unique when a
            batch is written in chunks).
        indices: Index of each case in the whole batch, instead of ``first_index + i``
            (chunks that are not runs of cases: one rank's share, cases grouped by shape).
        run: What identifies the run (:attr:`MapInfo.run`): DICOM maps get UIDs derived
            from it and their source series.

    Returns:
        The files written and one line per case whose source-geometry map failed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    diff_max = float(np.percentile(result.maps, 99.9)) if result.maps.size else None
    done = MapsWritten()
    for i, case_id in enumerate(ids):
        stem = case_stem(case_id, first_index + i if indices is None else int(indices[i]))
        with atomic_path(folder / f"{stem}.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, result.maps[i].astype(np.float32))
        recon = None if result.reconstructions is None else result.reconstructions[i]
        title = f"{Path(case_id).name}  score {result.scores[i]:.4g}"
        done.files.append(
            save_case_figure(
                images[i], recon, result.maps[i], folder / f"{stem}.png", title, diff_max
            )
        )
        grid = None if grids is None else grids[i]
        if grid is None:
            continue
        info = MapInfo(
            case=str(case_id),
            score=float(result.scores[i]),
            threshold=float(result.threshold),
            flagged=bool(result.labels[i]),
            model=model,
            run=run,
        )
        try:
            done.files += _source_maps(folder, stem, result.maps[i], grid, info, dicom)
        except (MedanomalyError, ValueError, OSError) as error:
            done.problems.append(f"{case_id}: {problem_text(error, case_id)}")
    return done


def _source_maps(
    folder: Path, stem: str, model_map: np.ndarray, grid: SourceGrid, info: MapInfo, dicom: bool
) -> list[Path]:
    """The maps of one case in its source geometry (and the DICOM object when asked)."""
    picture = _picture(info.case) if len(grid.shape) == 2 else None
    values = to_source_grid(model_map, grid)
    written = write_source_map(folder, stem, model_map, grid, info, picture, values)
    if dicom and grid.dicom_files and len(grid.shape) == 3:
        from medanomaly.outputs.dicom_maps import write_parametric_map  # highdicom loads slowly

        written.append(write_parametric_map(folder / f"{stem}_map.dcm", values, grid, info))
    return written


def _picture(source: str) -> np.ndarray | None:
    """The 2D image at its own size, gray, for the overlay (``None`` if it cannot be read)."""
    from medanomaly.io import read_image

    try:
        image = read_image(source)
    except (MedanomalyError, ValueError):
        return None
    return image.array[0] if image.spatial_dims == 2 else None


def save_part_maps(
    folder: str | Path,
    part: Any,
    result: AnomalyResult,
    *,
    model: str = "",
    dicom: bool = False,
    indices: Sequence[int] | None = None,
    threshold: float | None = None,
    run: str = "",
) -> MapsWritten:
    """:func:`save_maps` of a chunk of cases in memory, flagged at ``threshold``.

    Args:
        folder: Output folder.
        part: The chunk, an :class:`~medanomaly.data.sets.ImageSet` (its ``grids`` place the maps).
        result: Its detection.
        model: The detector's name.
        dicom: Also write DICOM Parametric Maps for DICOM volumes.
        indices: Index of each case in the job's table (numbers the file stems).
        threshold: Threshold recorded with the maps (default: ``result``'s).
        run: What identifies the run (see :func:`save_maps`).
    """
    if threshold is not None:
        flagged = (result.scores > threshold).astype(np.int64)
        result = replace(result, threshold=float(threshold), labels=flagged)
    return save_maps(
        folder,
        part.ids,
        part.images,
        result,
        part.grids,
        model=model,
        dicom=dicom,
        indices=indices,
        run=run,
    )


def save_maps_in_chunks(
    detector: Any,
    images: Any,
    folder: str | Path,
    *,
    dicom: bool = False,
    threshold: float | None = None,
    chunk: int = 16,
    indices: Sequence[int] | None = None,
) -> MapsWritten:
    """Detect and :func:`save_maps` a few cases at a time (memory holds one chunk of maps).

    Args:
        detector: A fitted detector.
        images: Any form of :class:`~medanomaly.data.sets.Cases` (its ``grids`` place the maps).
        folder: Output folder.
        dicom: Also write DICOM Parametric Maps for DICOM volumes.
        threshold: Threshold recorded with the maps (default: the detector's).
        chunk: Cases per call to ``detect``.
        indices: Index of each case in the job's table (default: its index in ``images``);
            the file stems are numbered by it.

    Returns:
        Everything written, and the cases whose source-geometry maps failed.
    """
    done = MapsWritten()
    with CaseProgress(len(images), "writing maps") as progress:
        for index in images.chunks(chunk):
            done.add(_chunk_maps(detector, images, index, folder, dicom, threshold, indices))
            progress.update(len(index))
    return done


def _chunk_maps(
    detector: Any,
    images: Any,
    index: np.ndarray,
    folder: str | Path,
    dicom: bool,
    threshold: float | None,
    indices: Sequence[int] | None,
) -> MapsWritten:
    """:func:`save_maps_in_chunks` of one chunk."""
    part = images.subset(index).to_image_set()
    stems = index if indices is None else np.asarray(indices)[index]
    return save_part_maps(
        folder,
        part,
        detector.detect(part),
        model=detector.name,
        dicom=dicom,
        indices=stems,
        threshold=threshold,
    )
