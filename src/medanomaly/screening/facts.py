"""What each file holds before preprocessing, and what is odd about it against the folder."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medanomaly.io import read_image

DEFAULT_METAL_LEVEL = 3000.0
#: Relative deviation of a spacing from the folder median that counts as odd.
SPACING_TOLERANCE = 0.2
#: Largest / smallest spacing above which voxels count as strongly anisotropic (nnU-Net's 3).
ANISOTROPY_RATIO = 3.0


@dataclass
class RawFacts:
    """What one file holds before any preprocessing.

    Attributes:
        shape: Spatial shape as read (3D volumes after reorientation to RAS+).
        channels: Channels of the image.
        spacing: Spacing in mm per spatial axis.
        max_intensity: Largest value (raw units, e.g. HU for CT).
        mean_intensity: Mean value over every voxel and channel.
        metal_fraction: Share of values above the metal level.
        orientation: Original axis codes of a 3D file (e.g. ``'LPS'``) when the reader keeps
            them, else ``None``.
        problems: Non-fatal problems the reader reported.
        error: Why the raw read failed (then every other field is empty).
    """

    shape: tuple[int, ...] | None = None
    channels: int | None = None
    spacing: tuple[float, ...] | None = None
    max_intensity: float = math.nan
    mean_intensity: float = math.nan
    metal_fraction: float = math.nan
    orientation: str | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def voxel_count(self) -> int | None:
        """Number of spatial voxels (pixels in 2D), ``None`` when unknown."""
        return None if self.shape is None else int(np.prod(self.shape))


def raw_facts(path: str | Path, metal_level: float = DEFAULT_METAL_LEVEL) -> RawFacts:
    """Read a file as stored (no transforms) and describe it; never raises.

    Args:
        path: An image file or DICOM series folder.
        metal_level: Values strictly above it count as metal (raw units; 3000 = HU of metal).

    Returns:
        The facts, or facts holding only ``error`` when the file cannot be read.
    """
    try:
        image = read_image(path)
    except Exception as error:  # any failure: a second read must never end the screen
        return RawFacts(error=f"{type(error).__name__}: {error}")
    array = image.array
    original = image.meta.get("orientation_original")
    return RawFacts(
        shape=tuple(int(s) for s in array.shape[1:]),
        channels=int(array.shape[0]),
        spacing=tuple(float(s) for s in image.spacing),
        max_intensity=float(array.max()),
        mean_intensity=float(array.mean(dtype=np.float64)),
        metal_fraction=float(np.count_nonzero(array > metal_level) / array.size),
        orientation=str(original) if original else None,
        problems=list(image.problems),
    )


def folder_oddities(facts: Sequence[RawFacts]) -> list[list[str]]:
    """Per case, what is odd about its file compared with the rest of the folder.

    Args:
        facts: The raw facts of every case of the folder.

    Returns:
        One list of short sentences per case (empty when nothing is odd).
    """
    orientations = Counter(f.orientation for f in facts if f.orientation)
    usual = orientations.most_common(1)[0][0] if orientations else None
    medians = _median_spacings(facts)
    oddities = []
    for fact in facts:
        if fact.error is not None:
            oddities.append([f"raw read failed: {fact.error}"])
            continue
        notes = []
        if usual is not None and fact.orientation and fact.orientation != usual:
            notes.append(
                f"original orientation {fact.orientation} differs from the folder's usual "
                f"{usual} ({orientations[usual]} of {sum(orientations.values())} cases); "
                "reoriented to RAS on reading"
            )
        notes += _spacing_notes(fact.spacing, medians.get(len(fact.spacing or ())))
        notes += [f"reader: {problem}" for problem in fact.problems]
        oddities.append(notes)
    return oddities


def _median_spacings(facts: Sequence[RawFacts]) -> dict[int, np.ndarray]:
    """Median spacing per axis, separately for 2D and 3D files."""
    groups: dict[int, list[tuple[float, ...]]] = {}
    for fact in facts:
        if fact.spacing:
            groups.setdefault(len(fact.spacing), []).append(fact.spacing)
    return {n: np.median(np.asarray(s, dtype=np.float64), axis=0) for n, s in groups.items()}


def _spacing_notes(spacing: tuple[float, ...] | None, median: np.ndarray | None) -> list[str]:
    """Spacing far from the folder median, and strongly anisotropic voxels."""
    if not spacing:
        return []
    values = np.asarray(spacing, dtype=np.float64)
    notes = []
    if median is not None and np.all(median > 0):
        deviation = values / median - 1.0
        axes = [
            f"axis {i}: {d:+.0%}" for i, d in enumerate(deviation) if abs(d) > SPACING_TOLERANCE
        ]
        if axes:
            notes.append(
                f"spacing {compact_spacing(spacing)} mm differs from the folder median "
                f"{compact_spacing(tuple(median))} mm by more than {SPACING_TOLERANCE:.0%} "
                f"({', '.join(axes)})"
            )
    if values.min() > 0 and values.max() / values.min() > ANISOTROPY_RATIO:
        notes.append(
            f"strongly anisotropic voxels: largest / smallest spacing "
            f"{values.max() / values.min():.3g} > {ANISOTROPY_RATIO:g}"
        )
    return notes


def compact_spacing(spacing: Sequence[float] | None) -> str:
    """Spacing as ``'0.8x0.8x2.5'`` (empty when unknown)."""
    return "" if not spacing else "x".join(f"{s:.4g}" for s in spacing)
