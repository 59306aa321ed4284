"""The per-rank part of ``medanomaly evaluate``: score a share, then put the ranks together.

Each rank scores its share of the labelled cases chunk by chunk. Where lesion masks exist,
the anomaly map, lesion mask and foreground of every case that enters the pixel metrics go
to a temporary folder (memory holds one chunk), so that the pixel histograms can be binned
once the score range over *all* ranks is known: the binned metrics are then exactly those
of one process over the whole set. Rank 0 merges the histograms
(:meth:`~medanomaly.metrics.pixel.PixelMetricAccumulator.merge`) and the gallery cases
that the other ranks detected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.listing import list_cases
from medanomaly.detectors.base import BaseDetector
from medanomaly.jobs.score import in_chunks
from medanomaly.metrics.blocks import foreground_masks
from medanomaly.metrics.pixel import PixelMetricAccumulator, scan_range
from medanomaly.outputs.viewer import ViewerVolumes
from medanomaly.outputs.writers import case_stem
from medanomaly.reports import figures as figs
from medanomaly.training.distributed import Ranks, Share, merge_rows
from medanomaly.viz.case_figure import unique_names


@dataclass
class Scored:
    """Every case of the job in input order (the same on every rank after :func:`merged`).

    Attributes:
        ids: Case ids.
        labels: Known labels (0, 1, -1).
        scores: Scores.
        include: True for the cases that enter the pixel metrics (lesion mask known).
    """

    ids: list[str]
    labels: np.ndarray
    scores: np.ndarray
    include: np.ndarray


@dataclass
class LocalPass:
    """What one rank found: its rows, and the cases it spilled for the pixel metrics."""

    rows: list[tuple[int, tuple[str, int, float, bool]]] = field(default_factory=list)
    viewer: list[dict[str, Any]] = field(default_factory=list)
    spilled: list[int] = field(default_factory=list)
    range: tuple[float, float] | None = None
    foreground_rule: str = ""


def score_share(
    detector: BaseDetector,
    share: Share,
    data: str | Path,
    label_names: dict[str, int] | None,
    pixel: bool,
    foreground_threshold: float | None,
    spill: Path,
    chunk: int,
    volumes: ViewerVolumes | None = None,
) -> LocalPass:
    """Score this rank's cases; with ``pixel``, spill what the pixel metrics need.

    Args:
        detector: The run's detector.
        share: This rank's cases.
        data: The folder or manifest (which cases have a lesion mask file).
        label_names: The run's extra label names.
        pixel: Some case of the job carries a lesion mask.
        foreground_threshold: See :func:`medanomaly.metrics.blocks.foreground_masks`.
        spill: Temporary folder for the maps, masks and foregrounds.
        chunk: Cases in memory at a time.
        volumes: Writes each case's scan and map for the report's viewer (``None``: none).
    """
    with_mask = {str(c.path) for c in list_cases(data, label_names) if c.mask is not None}
    local = LocalPass()
    for index, part in in_chunks(share.cases, chunk):
        known = np.array([i in with_mask for i in part.ids]) | (part.labels == 0)
        include = known & (part.labels != -1) & pixel
        if pixel or volumes is not None:
            result = detector.detect(part)
            scores = np.asarray(result.scores, dtype=np.float64)
            if volumes is not None:
                local.viewer += volumes.write(part, result, share.index[index])
        if pixel:
            fg, local.foreground_rule = foreground_masks(part, foreground_threshold)
            masks = part.masks if part.masks is not None else np.zeros_like(fg)
            for j in np.flatnonzero(include):
                position = int(share.index[index[j]])
                _spill(spill, position, result.maps[j], masks[j], fg[j])
                local.range = _widest(local.range, scan_range([result.maps[j]], [fg[j]]))
                local.spilled.append(position)
        elif volumes is None:
            scores = np.asarray(detector.score(part), dtype=np.float64)
        for j, i in enumerate(index):
            row = (part.ids[j], int(part.labels[j]), float(scores[j]), bool(include[j]))
            local.rows.append((int(share.index[i]), row))
    return local


def _spill(folder: Path, position: int, score_map: np.ndarray, mask: Any, fg: Any) -> None:
    for name, array in (("map", score_map), ("mask", mask), ("fg", fg)):
        np.save(folder / f"{position:08d}_{name}.npy", np.asarray(array))


def _widest(
    a: tuple[float, float] | None, b: tuple[float, float] | None
) -> tuple[float, float] | None:
    if a is None or b is None:
        return a or b
    return min(a[0], b[0]), max(a[1], b[1])


def merged(parts: list[LocalPass], n_cases: int) -> Scored:
    """Every rank's rows as one table in input order."""
    rows = merge_rows([part.rows for part in parts], n_cases)
    return Scored(
        ids=[r[0] for r in rows],
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        scores=np.array([r[2] for r in rows], dtype=np.float64),
        include=np.array([r[3] for r in rows], dtype=bool),
    )


def pixel_result(
    ranks: Ranks, local: LocalPass, scored: Scored, spill: Path
) -> tuple[dict[str, Any], str] | None:
    """Pooled and per-image pixel metrics over every rank's spilled cases (rank 0 only).

    Returns:
        ``(result of PixelMetricAccumulator.compute, foreground rule)`` on rank 0.
    """
    everyone = ranks.all_gather((local.range, local.foreground_rule))
    span = None
    for found, _ in everyone:
        span = _widest(span, found)
    rule = next((r for _, r in everyone if r), "")
    ordinal = np.cumsum(scored.include) - 1  # the case's place among the included ones

    def accumulate() -> PixelMetricAccumulator:
        acc = PixelMetricAccumulator(range=span, per_image=True)
        for position in local.spilled:
            score_map, mask, fg = (
                np.load(spill / f"{position:08d}_{name}.npy") for name in ("map", "mask", "fg")
            )
            acc.update(score_map, mask, fg, name=str(int(ordinal[position])))
        return acc

    parts = ranks.together(accumulate, to_main=True)  # one failing rank stops them all
    if parts is None:
        return None
    total = PixelMetricAccumulator(range=span, per_image=True)
    for part in parts:
        total.merge(part)
    total.images.sort(key=lambda result: int(result["name"]))
    return total.compute(), rule


def gallery(
    ranks: Ranks,
    detector: BaseDetector,
    share: Share,
    scored: Scored,
    folder: Path,
    per_group: int,
) -> list[Path]:
    """Input | reconstruction | difference map of the cases worth looking at (rank 0 draws).

    Each rank detects the chosen cases of its share and sends their arrays to rank 0, so
    that the colour scale is shared over the whole gallery as in one process.
    """
    chosen = figs.gallery_indices(scored.labels, scores=scored.scores, per_group=per_group)
    here = {int(position): j for j, position in enumerate(share.index)}
    mine = [i for i in chosen if i in here]

    def detect_mine() -> list[tuple[int, np.ndarray, np.ndarray | None, np.ndarray]]:
        found = []
        picked = share.cases.subset([here[i] for i in mine])
        for index, part in in_chunks(picked, len(mine) or 1):
            result = detector.detect(part)
            for j, k in enumerate(index):
                recon = None if result.reconstructions is None else result.reconstructions[j]
                found.append((mine[k], part.images[j], recon, result.maps[j]))
        return found

    parts = ranks.together(detect_mine, to_main=True)  # one failing rank stops them all
    if parts is None or not chosen:
        return []
    drawn = {case[0]: case for part in parts for case in part}
    cases = [drawn[i] for i in chosen]
    names = {0: "normal", 1: "abnormal"}
    shown = unique_names(scored.ids)
    titles = [
        f"{shown[i]} ({names.get(int(scored.labels[i]), '?')}) score {scored.scores[i]:.4g}"
        for i in chosen
    ]
    return figs.save_gallery(
        folder,
        [c[1] for c in cases],
        _recons([c[2] for c in cases]),
        [c[3] for c in cases],
        titles,
        [case_stem(scored.ids[i], i) for i in chosen],
    )


def _recons(recons: Sequence[np.ndarray | None]) -> list[np.ndarray] | None:
    return None if any(r is None for r in recons) else list(recons)  # type: ignore[arg-type]
