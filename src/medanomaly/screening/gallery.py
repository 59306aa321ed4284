"""The gallery of a screen: input | reconstruction | difference of every flagged case."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medanomaly.data.sets import Cases
from medanomaly.detectors.base import BaseDetector
from medanomaly.outputs.writers import case_stem
from medanomaly.screening.core import DEFAULT_BATCH
from medanomaly.screening.result import ScreenResult
from medanomaly.viz.case_figure import save_case_figure, unique_names


def gallery_scale(result: ScreenResult) -> float | None:
    """Shared colour-scale top of the gallery's difference maps.

    The largest 99.9th map percentile among the cases that were *not* flagged: red then means
    "at least as large as the worst residual of an unflagged case". ``None`` (each figure on
    its own scale) when every case is flagged or the maps are missing.
    """
    values = result.map_p999[~result.flagged]
    values = values[np.isfinite(values)]
    return float(values.max()) if values.size and values.max() > 0 else None


def save_gallery(
    detector: BaseDetector,
    images: Cases,
    result: ScreenResult,
    folder: str | Path,
    batch: int = DEFAULT_BATCH,
    index: Sequence[int] | None = None,
) -> list[Path]:
    """Draw input | reconstruction | difference of every flagged case, highest score first.

    The flagged cases are scored again, ``batch`` at a time, so that the screen itself never
    holds their maps. 3D cases show the three orthogonal planes through the voxel with the
    largest difference; 2D cases one row. In a distributed job each rank draws the flagged
    cases of its share.

    Args:
        detector: The detector that made ``result``.
        images: The cases ``result`` describes (same order), or one rank's share of them.
        result: The screen.
        folder: Where to write ``<rank>_<name>.png``.
        batch: Cases per call to ``detect``.
        index: Position of each of ``images`` among ``result``'s cases (a rank's share);
            ``None``: ``images`` are all of them.

    Returns:
        Every flagged case's PNG (those drawn by other ranks too), in rank order.
    """
    folder = Path(folder)
    names = unique_names(result.ids)
    order, ranks, scale = result.flagged_order, result.ranks, gallery_scale(result)
    positions = range(len(images)) if index is None else index
    here = {int(position): j for j, position in enumerate(positions)}
    paths = {i: folder / f"{case_stem(result.ids[i], int(ranks[i]))}.png" for i in order}
    mine = [i for i in order if i in here]
    flagged = images.subset([here[i] for i in mine])
    for chunk in flagged.chunks(max(batch, 1)):
        part = flagged.subset(chunk).to_image_set()
        found = detector.detect(part)
        for j, i in enumerate(mine[k] for k in chunk):
            recon = None if found.reconstructions is None else found.reconstructions[j]
            title = (
                f"#{ranks[i]} {names[i]}  score {result.scores[i]:.4g} "
                f"(threshold {result.threshold:.4g})"
            )
            fg = None if part.foreground is None else part.foreground[j]
            save_case_figure(part.images[j], recon, found.maps[j], paths[i], title, scale, fg)
    return [paths[i] for i in order]
