"""Batch jobs over a trained run: what ``score`` does, and what ``evaluate`` and ``screen`` share.

A job streams its cases: each rank (one process, or ``--devices N`` of them, see
:mod:`medanomaly.training.distributed`) prepares its share into the cache, then scores it chunk by
chunk (``chunk`` cases read into memory at a time), writes the maps it made, and sends the
per-case rows to rank 0, which writes the table in input order. In a single process
``score`` and ``screen`` score each chunk as soon as its cases are prepared, while the first
pass prepares (and retrieves from an archive) the next ones in the background
(:mod:`medanomaly.data.ahead`); ``--strict`` prepares every case first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.ahead import PreparingSet
from medanomaly.data.progress import CaseProgress
from medanomaly.data.sets import Cases, ImageSet
from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.io.dicomweb import Archive
from medanomaly.outputs.archive import open_store, run_identity, store_maps
from medanomaly.outputs.guard import Claim, check_apart, claim_outputs, staging_folder
from medanomaly.outputs.writers import MapsWritten, save_part_maps, write_scores_csv
from medanomaly.training.distributed import (
    Ranks,
    Share,
    ShareAhead,
    cpu_threads_per_rank,
    launch,
    load_share,
    merge_rows,
)

#: Cases read into memory and scored at a time.
SCORE_CHUNK = 32


@dataclass(frozen=True)
class JobOptions:
    """Where a job runs (``--accelerator``, ``--devices``, ``--num-nodes``, ``--num-workers``).

    Attributes:
        accelerator: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"gpu"``.
        devices: Processes (devices) per node.
        num_nodes: Machines.
        num_workers: First-pass worker processes per rank (``None``: the run's
            ``data.num_workers``, else the cores available).
        share_cores: Divide torch's CPU threads between the ranks of a CPU job. Only the
            command line sets it: a library call never changes the process's thread count.
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int | None = None
    share_cores: bool = False


def start_job(run: str | Path, options: JobOptions) -> tuple[Ranks, BaseDetector]:
    """Launch the job's processes and load the run onto this process's device."""
    ranks = launch(options.accelerator, options.devices, options.num_nodes)
    if options.share_cores:
        cpu_threads_per_rank(ranks)
    return ranks, BaseDetector.load(run).to(ranks.device)


def in_chunks(
    cases: Cases | PreparingSet, size: int, desc: str = "scoring"
) -> Iterator[tuple[np.ndarray, ImageSet]]:
    """``(index, cases in memory)`` for chunks of at most ``size`` cases of one shape.

    The progress (cases/s, time left) counts a chunk as done when the caller asks for the
    next one, so it covers what the caller does with each chunk (scoring, writing maps).
    A set still being prepared (:class:`~medanomaly.data.ahead.PreparingSet`) hands out each
    chunk once its cases are ready, and counts against the cases listed.
    """
    total = cases.listed if isinstance(cases, PreparingSet) else len(cases)
    with CaseProgress(total, desc) as progress:
        for index in cases.chunks(size):
            yield index, cases.subset(index).to_image_set()
            progress.update(len(index))


@dataclass(frozen=True)
class MapTarget:
    """Where a job's maps go: a folder, DICOM Parametric Maps too, an archive to store them in.

    Attributes:
        folder: The maps folder (``None``: no maps).
        dicom: Also write DICOM Parametric Maps of DICOM volumes.
        store: The DICOMweb archive the Parametric Maps are sent to (STOW-RS).
        run: What identifies the run (the DICOM maps' UIDs derive from it).
    """

    folder: str | Path | None = None
    dicom: bool = False
    store: Archive | None = None
    run: str = ""

    @classmethod
    def of(
        cls, run: str | Path, folder: str | Path | None, dicom: bool, store: str | None
    ) -> MapTarget:
        """Check the store's access first (a refusal is one error before any work)."""
        archive = None if store is None else open_store(store)
        dicom = dicom or archive is not None
        return cls(folder, dicom, archive, run_identity(run) if dicom else "")

    def write(
        self, part: ImageSet, result: AnomalyResult, model: str, indices: Any, **kwargs: Any
    ) -> MapsWritten:
        """Write (and store) the maps of one chunk of cases."""
        assert self.folder is not None
        written = save_part_maps(
            self.folder,
            part,
            result,
            model=model,
            dicom=self.dicom,
            indices=indices,
            run=self.run,
            **kwargs,
        )
        if self.store is not None:
            written.problems += store_maps(self.store, written.files)
        return written


@dataclass
class ScoreSummary:
    """What a score job did (rank 0's view).

    Attributes:
        n_cases: Cases scored.
        n_flagged: Cases above the threshold.
        threshold: The run's threshold.
        skipped: ``(path, reason)`` of the cases left out, in input order.
        warnings: ``(path, problem)`` of kept cases with problems.
        map_problems: Cases whose maps in the scan's geometry could not be written.
    """

    n_cases: int
    n_flagged: int
    threshold: float
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    map_problems: list[str] = field(default_factory=list)


def score_run(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    maps: str | Path | None = None,
    dicom: bool = False,
    strict: bool = False,
    options: JobOptions | None = None,
    chunk: int = SCORE_CHUNK,
    store: str | None = None,
) -> ScoreSummary | None:
    """Score a folder or manifest with a trained run; write the score table (and maps).

    The table has one row per case in input order: id, label, score, prediction,
    threshold, p_value (conformal, against the run's held-out normal validation scores).

    Args:
        run: Run directory (or ``model.safetensors``).
        data: Folder or manifest.
        out: The CSV (written by rank 0, atomically).
        maps: Folder for every case's maps (see :func:`medanomaly.outputs.writers.save_maps`),
            written by the rank that scored the case.
        dicom: With ``maps``, also DICOM Parametric Maps of DICOM volumes.
        strict: Raise on the first unreadable case.
        options: Devices and workers (default: one process).
        chunk: Cases read into memory at a time.
        store: A ``dicomweb+http(s)://`` archive that each DICOM Parametric Map is sent to
            (STOW-RS); implies ``dicom``.

    Returns:
        The summary on rank 0; ``None`` on the other ranks.
    """
    check_apart(data, maps)
    target = MapTarget.of(run, None if maps is None else staging_folder(maps), dicom, store)
    ranks, detector = start_job(run, options or JobOptions())
    claim = claim_outputs([out], staged=[maps], command="score") if ranks.is_main else Claim()
    workers = (options or JobOptions()).num_workers
    with claim, load_share(detector, data, ranks, strict, workers, ahead=True) as preparing:
        gathered = ranks.together(  # one failing rank stops them all
            lambda: _score_share(detector, preparing, target, chunk), to_main=True
        )
        share = preparing.finish()
        if gathered is None:
            return None
        summary = _write_table(detector, share, gathered, out)
        if maps is not None:
            claim.commit(maps)
    return summary


def _write_table(
    detector: BaseDetector, share: Share, gathered: list[Any], out: str | Path
) -> ScoreSummary:
    """Write the score table of every rank's rows; the job's summary."""
    from medanomaly.detectors.thresholds import conformal_pvalues

    table = merge_rows([rows for rows, _ in gathered], share.n_cases)
    ids = [row[0] for row in table]
    labels = np.array([row[1] for row in table], dtype=np.int64)
    scores = np.array([row[2] for row in table], dtype=np.float64)
    threshold = float(detector.threshold_)
    result = AnomalyResult(
        scores, (scores > threshold).astype(np.int64), np.empty(0), None, threshold
    )
    p_values = conformal_pvalues(detector.val_scores_, scores)
    write_scores_csv(out, ids, labels, result, extra={"p_value": p_values})
    return ScoreSummary(
        n_cases=len(ids),
        n_flagged=int(result.labels.sum()),
        threshold=threshold,
        skipped=share.skipped,
        warnings=share.warnings,
        map_problems=[line for _, written in gathered for line in written.problems],
    )


def _score_share(
    detector: BaseDetector,
    share: Share | ShareAhead,
    target: MapTarget,
    chunk: int,
) -> tuple[list[tuple[int, Any]], MapsWritten]:
    """Rows ``(index, (id, label, score))`` of this rank's cases, and the maps it wrote."""
    rows: list[tuple[int, Any]] = []
    written = MapsWritten()
    desc = "scoring and writing maps" if target.folder is not None else "scoring"
    for index, part in in_chunks(share.cases, chunk, desc):
        positions = share.positions(index)
        if target.folder is None:
            scores = np.asarray(detector.score(part), dtype=np.float64)
        else:
            result = detector.detect(part)
            scores = np.asarray(result.scores, dtype=np.float64)
            written.add(target.write(part, result, detector.name, positions))
        for j, position in enumerate(positions):
            row = (part.ids[j], int(part.labels[j]), float(scores[j]))
            rows.append((int(position), row))
    return rows, written


def score_in_chunks(
    detector: BaseDetector, images: ImageSet, keep_maps: bool, chunk: int = SCORE_CHUNK
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scores (and optionally float32 maps) of every case, ``chunk`` cases at a time.

    Reconstructions are dropped after each chunk, so memory holds at most the maps.

    Args:
        detector: A fitted detector.
        images: The cases.
        keep_maps: Keep the anomaly maps (needed for pixel metrics).
        chunk: Cases per call to ``detect``.

    Returns:
        ``(scores, maps or None)``.
    """
    if not keep_maps:
        return np.asarray(detector.score(images), dtype=np.float64), None
    scores, maps = [], []
    for start in range(0, len(images), chunk):
        part = images.subset(np.arange(start, min(start + chunk, len(images))))
        result = detector.detect(part)
        scores.append(np.asarray(result.scores, dtype=np.float64))
        if keep_maps:
            maps.append(np.asarray(result.maps, dtype=np.float32))
    return np.concatenate(scores), (np.concatenate(maps) if keep_maps else None)
