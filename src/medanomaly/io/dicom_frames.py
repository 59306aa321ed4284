"""Slices of a DICOM series: one per single-frame file, one per frame of a multi-frame file.

An enhanced CT/MR image stores the geometry of each frame in its functional groups: the
Plane Position (``ImagePositionPatient``), Plane Orientation (``ImageOrientationPatient``),
Pixel Measures (``PixelSpacing``, ``SliceThickness``) and Pixel Value Transformation
(``RescaleSlope``/``RescaleIntercept``) macros, per frame or shared by all. Each frame becomes a
:class:`Slice` whose header is a small dataset holding those values beside the file's own
attributes, so that the series reader stacks frames exactly as it stacks single-frame files.
Legacy multi-frame images that place frames by ``GridFrameOffsetVector`` (RT Dose, NM) are
handled likewise; frames without any geometry are returned without position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medanomaly.errors import ImageReadError

#: Functional-group macros and the attributes each carries into a frame's header.
_MACROS = {
    "PlanePositionSequence": ("ImagePositionPatient",),
    "PlaneOrientationSequence": ("ImageOrientationPatient",),
    "PixelMeasuresSequence": ("PixelSpacing", "SliceThickness", "SpacingBetweenSlices"),
    "PixelValueTransformationSequence": ("RescaleSlope", "RescaleIntercept", "RescaleType"),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth"),
}
#: Large or per-frame elements not copied into the frame headers.
_NOT_COPIED = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "GridFrameOffsetVector",
    "NumberOfFrames",
}


@dataclass
class Slice:
    """One 2D slice of a series.

    Attributes:
        file: The file holding it.
        header: Its attributes (the file's header, or a per-frame view of a multi-frame file).
        frame: Its frame index in a multi-frame file (``None`` for a single-frame file).
        problems: Problems found while reading the file (e.g. no preamble).
    """

    file: Path
    header: Dataset
    frame: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """How messages name the slice: the file name, or ``frame N`` (1-based)."""
        return self.file.name if self.frame is None else f"frame {self.frame + 1}"

    @property
    def where(self) -> str:
        """Prefix that places a problem inside a multi-frame file ('' for a single frame)."""
        return "" if self.frame is None else f"{self.label}: "


def tag_name(keyword: str) -> str:
    """``Keyword (gggg,eeee)`` for messages."""
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} {Tag(tag)}"


def attribute_problem(keyword: str, value: Any, problem: str = "has an invalid value") -> str:
    """``NumberOfFrames (0028,0008) has an invalid value '1A'``-style text."""
    return f"{tag_name(keyword)} {problem} {value!r}"


def int_attribute(header: Dataset, keyword: str, path: Path, default: int) -> int:
    """An integer attribute; a value that is not an integer names the file and the tag.

    Raises:
        ImageReadError: The value is present but not an integer.
    """
    value = header.get(keyword)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(path, attribute_problem(keyword, value)) from exc


def frame_slices(path: Path, header: Dataset, problems: list[str]) -> list[Slice]:
    """One slice per frame of a multi-frame file, each with its own geometry and rescale.

    Args:
        path: The file.
        header: Its dataset (pixel data may be deferred).
        problems: Problems found while reading it.

    Returns:
        The frames in file order.
    """
    n_frames = int_attribute(header, "NumberOfFrames", path, default=1)
    base = _base_header(header)
    offsets = _grid_offsets(header, path, n_frames)
    shared = _first_item(header, "SharedFunctionalGroupsSequence")
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    slices = []
    for index in range(n_frames):
        frame = Dataset()
        frame.update(base)
        groups = per_frame[index] if index < len(per_frame) else None
        _copy_macros(frame, groups, shared)
        if offsets is not None:
            _place_by_offset(frame, offsets[index], path)
        slices.append(Slice(path, frame, index, problems))
    return slices


def _base_header(header: Dataset) -> Dataset:
    """The file's top-level attributes, without pixel data and per-frame sequences."""
    base = Dataset()
    for element in header:
        if element.keyword not in _NOT_COPIED:
            base.add(element)
    base.file_meta = header.file_meta
    return base


def _first_item(dataset: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a sequence attribute, ``None`` when absent or empty."""
    if dataset is None:
        return None
    sequence = dataset.get(keyword)
    return sequence[0] if sequence else None


def _copy_macros(frame: Dataset, groups: Dataset | None, shared: Dataset | None) -> None:
    """Copy each macro's attributes into ``frame``: the frame's own, else the shared ones."""
    for macro, keywords in _MACROS.items():
        item = _first_item(groups, macro) or _first_item(shared, macro)
        if item is None:
            continue
        for keyword in keywords:
            if keyword in item:
                frame.add(item[keyword])


def _grid_offsets(header: Dataset, path: Path, n_frames: int) -> np.ndarray | None:
    """``GridFrameOffsetVector`` (mm along the slice normal), when it places the frames."""
    values = header.get("GridFrameOffsetVector")
    if not values or "ImagePositionPatient" not in header:
        return None
    try:
        offsets = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ImageReadError(path, attribute_problem("GridFrameOffsetVector", values)) from exc
    if offsets.size != n_frames:
        raise ImageReadError(
            path,
            f"{tag_name('GridFrameOffsetVector')} has {offsets.size} values for {n_frames} frames",
        )
    return offsets


def _place_by_offset(frame: Dataset, offset: float, path: Path) -> None:
    """Move a legacy frame's ImagePositionPatient ``offset`` mm along the slice normal."""
    try:
        origin = np.array([float(v) for v in frame.ImagePositionPatient], dtype=float)
        iop = np.array([float(v) for v in frame.ImageOrientationPatient], dtype=float)
    except (AttributeError, TypeError, ValueError) as exc:
        problem = "invalid ImagePositionPatient or ImageOrientationPatient"
        raise ImageReadError(path, problem) from exc
    normal = np.cross(iop[:3], iop[3:])
    del frame.ImagePositionPatient  # the element is shared with the other frames: replace it
    frame.ImagePositionPatient = [float(v) for v in origin + offset * normal]
    dose_scaling = frame.get("DoseGridScaling")
    if dose_scaling is not None and "RescaleSlope" not in frame:
        frame.RescaleSlope = dose_scaling
        frame.RescaleIntercept = 0
