"""The anomaly map as a DICOM Parametric Map that references its source series (highdicom).

The map, already sampled onto the series' own grid
(:func:`medanomaly.outputs.source_maps.to_source_grid`),
is written one frame per source slice. highdicom takes each frame's position and orientation
from its source image, so the object shares the series' FrameOfReferenceUID and lists the
source SOP Instance UIDs (per frame and in the Referenced Series Sequence): a viewer that
knows Parametric Maps (3D Slicer, OHIF) lays it over the scan. The source files are only
read, never written; the map goes through a temporary file renamed into place.
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medanomaly._version import __version__
from medanomaly.errors import ImageReadError
from medanomaly.image import SourceGrid
from medanomaly.io.atomic import atomic_path
from medanomaly.io.dicom_frames import tag_name
from medanomaly.outputs.source_maps import MapInfo

#: Type 2 patient/study attributes highdicom copies from the source; absent ones are left
#: empty in the copy it reads (the source file is not touched).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
SERIES_NUMBER = 9901
"""Series number of the written maps (a new series in the source's study)."""


def write_parametric_map(
    path: str | Path, values: np.ndarray, grid: SourceGrid, info: MapInfo
) -> Path:
    """Write the map on the source grid as a Parametric Map (float32 frames).

    Args:
        path: The ``.dcm`` file to write.
        values: The map on the source grid ``grid.shape`` (columns, rows, slices).
        grid: The case's grid, with the DICOM files (and frames) it came from.
        info: Score, threshold and model, recorded in the content description.

    Returns:
        ``path``.

    Raises:
        ImageReadError: The case is not a DICOM image with patient geometry, ``path`` is one
            of its source files, or highdicom refuses the sources.
    """
    path = Path(path)
    sources = _source_images(grid, path)
    frames = _frames(values, grid, sources)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="anomaly",
        lut_explanation=f"medanomaly {info.model} anomaly map",
        unit=codes.UCUM.NoUnits,
        value_range=(float(frames.min()), float(frames.max())),
        slope=1.0,
        intercept=0.0,
    )
    series_uid, instance_uid = map_uids(sources[0], info)
    low, high = float(frames.min()), float(frames.max())
    window = hd.VOILUTTransformation(
        window_center=(low + high) / 2, window_width=max(high - low, 1e-6)
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # highdicom's notes on optional attributes
            parametric_map = hd.pm.ParametricMap(
                source_images=sources,
                pixel_array=frames,
                series_instance_uid=series_uid,
                series_number=SERIES_NUMBER,
                sop_instance_uid=instance_uid,
                instance_number=1,
                manufacturer="medanomaly",
                manufacturer_model_name=info.model or "medanomaly",
                software_versions=__version__,
                device_serial_number="none",
                contains_recognizable_visual_features=False,
                real_world_value_mappings=[mapping],
                voi_lut_transformations=[window],
                content_description=_description(info),
                content_label="ANOMALY",
                series_description=f"medanomaly {info.model} anomaly map"[:64],
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        problem = f"no Parametric Map written: highdicom: {type(exc).__name__}: {exc}"
        raise ImageReadError(info.case, problem) from exc
    with atomic_path(path) as tmp:
        parametric_map.save_as(tmp)
    return path


def map_uids(source: Dataset, info: MapInfo) -> tuple[str, str]:
    """The map's Series and SOP Instance UIDs.

    With :attr:`MapInfo.run` set they are derived from the source series and the run (UUID
    version 5 UIDs ``2.25.<uuid>``, DICOM PS3.5 B.2), so that the same run writing the
    map of the same series again gives the same UIDs: an archive then replaces the stored
    map instead of keeping two. Without it they are new each time.
    """
    if not info.run:
        return hd.UID(), hd.UID()
    seed = [str(source.get("SeriesInstanceUID", "")), info.run, info.model]
    return derived_uid(*seed, "series"), derived_uid(*seed, "instance")


def _description(info: MapInfo) -> str:
    """Content Description (64 characters at most): score, threshold, verdict."""
    verdict = "flagged" if info.flagged else "not flagged"
    return f"score {info.score:.5g} thr {info.threshold:.5g} {verdict}"[:64]


def source_headers(grid: SourceGrid, out: str | Path) -> list[Dataset]:
    """The headers of a DICOM case's source files, ready to derive an object from.

    Raises:
        ImageReadError: The case is not a DICOM volume or its sources lack a UID.
    """
    return _source_images(grid, Path(out))


def derived_uid(*parts: str) -> str:
    """A UID (``2.25.<uuid>``, UUID version 5, DICOM PS3.5 B.2) that follows from ``parts``."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


def _source_images(grid: SourceGrid, out: Path) -> list[Dataset]:
    """The source headers highdicom derives the map from (one per file, in slice order)."""
    if not grid.dicom_files or grid.affine is None:
        raise ImageReadError(out, "no Parametric Map written: the case is not a DICOM volume")
    files = list(dict.fromkeys(grid.dicom_files))
    resolved = {Path(f).resolve() for f in files}
    if out.resolve() in resolved:
        raise ImageReadError(out, "refusing to overwrite a source file with the map")
    headers = []
    for file in files:
        header = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        if "FrameOfReferenceUID" not in header:
            raise ImageReadError(
                file,
                f"no Parametric Map written: the source has no {tag_name('FrameOfReferenceUID')}, "
                "so no viewer could place a map on it",
            )
        _identify(header, Path(file))
        for keyword in _TYPE2:
            if keyword not in header:
                setattr(header, keyword, "")
        headers.append(header)
    return headers


def _identify(header: Dataset, file: Path) -> None:
    """Fill an empty SOP Class / Instance UID from the File Meta that mirrors it (in the copy)."""
    for keyword, meta_keyword in (
        ("SOPClassUID", "MediaStorageSOPClassUID"),
        ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ):
        if header.get(keyword):
            continue
        value = getattr(header, "file_meta", Dataset()).get(meta_keyword)
        if not value:
            raise ImageReadError(
                file, f"no Parametric Map written: the source has no {tag_name(keyword)}"
            )
        setattr(header, keyword, value)


def _frames(values: np.ndarray, grid: SourceGrid, sources: list[Dataset]) -> np.ndarray:
    """The map as frames ``(n, rows, cols)`` in the order of the source frames / files."""
    frames = np.ascontiguousarray(np.transpose(values, (2, 1, 0)), dtype=np.float32)
    if not grid.dicom_frames:  # a series of single-frame files, in slice order
        return frames
    n_frames = int(sources[0].get("NumberOfFrames") or 1)
    order = np.asarray(grid.dicom_frames)
    if sorted(order.tolist()) != list(range(n_frames)):
        raise ImageReadError(
            grid.dicom_files[0],
            "no Parametric Map written: some frames share a position and were dropped",
        )
    in_file_order = np.empty_like(frames)
    in_file_order[order] = frames
    return in_file_order
