"""The whole ``medanomaly screen`` job: stream, screen, draw and write, on one or many ranks."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.sets import ImageSet
from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.errors import MedanomalyError
from medanomaly.jobs.score import JobOptions, MapTarget, start_job
from medanomaly.outputs.archive import store_maps
from medanomaly.outputs.guard import Claim, check_apart, claim_outputs, staging_folder
from medanomaly.outputs.key_objects import FlaggedSeries, write_key_objects
from medanomaly.outputs.viewer import ViewerVolumes, flag_entries, viewer_volumes
from medanomaly.reports.viewer import VIEWER_DIR, install_static
from medanomaly.screening.core import (
    DEFAULT_BATCH,
    DEFAULT_RULE,
    ChunkHook,
    check_settings,
    screen,
    screen_threshold,
)
from medanomaly.screening.facts import DEFAULT_METAL_LEVEL
from medanomaly.screening.files import GALLERY_DIR
from medanomaly.screening.gallery import save_gallery
from medanomaly.screening.latent import DEFAULT_MIN_SAMPLES
from medanomaly.screening.outputs import write_screen_outputs
from medanomaly.screening.result import ScreenResult
from medanomaly.training.distributed import Ranks, Share, ShareAhead, load_share


@dataclass
class ScreenJob:
    """What a screen job did (rank 0's view).

    Attributes:
        result: The screen.
        warnings: ``(path, problem)`` of kept cases with problems.
        map_problems: Cases whose maps in the scan's geometry could not be written.
    """

    result: ScreenResult
    warnings: list[tuple[str, str]] = field(default_factory=list)
    map_problems: list[str] = field(default_factory=list)


def screen_folder(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    threshold: str = DEFAULT_RULE,
    metal_level: float = DEFAULT_METAL_LEVEL,
    eps: float | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    batch: int = DEFAULT_BATCH,
    maps: str | Path | None = None,
    dicom: bool = False,
    options: JobOptions | None = None,
    strict: bool = False,
    store: str | None = None,
    viewer: bool = True,
) -> ScreenJob | None:
    """Screen an unlabelled folder or manifest with a trained run and write every output.

    Each rank prepares and screens its share of the cases (streamed from the cache), writes
    their maps (with ``maps``) and draws its flagged cases; rank 0 clusters the latent
    vectors and writes ``screen.csv``, ``summary.json``, the figures and ``report.html``
    (see :func:`~medanomaly.screening.outputs.write_screen_outputs`).

    Args:
        run: Run directory (or ``model.safetensors``).
        data: Unlabelled folder or manifest.
        out: Output folder.
        threshold: The threshold rule (see :func:`medanomaly.screening.core.screen`).
        metal_level: Raw value above which a voxel counts as metal.
        eps: DBSCAN radius (``None``: automatic).
        min_samples: DBSCAN ``min_samples``.
        batch: Cases scored at a time.
        maps: Folder for every case's maps in the scan's geometry.
        dicom: With ``maps``, DICOM Parametric Maps of DICOM volumes too.
        options: Devices and workers (default: one process).
        strict: Raise on the first unreadable case, before anything is written.
        store: A ``dicomweb+http(s)://`` archive that each DICOM Parametric Map is sent to
            (STOW-RS); implies ``dicom``.
        viewer: Write every case's scan and map into ``OUT/viewer/`` for the report's
            interactive viewer (``medanomaly view OUT``).

    Returns:
        The job's summary on rank 0; ``None`` on the other ranks.
    """
    options = options or JobOptions()
    check_settings(batch, eps, min_samples)
    check_apart(data, out, maps)
    target = MapTarget.of(run, None if maps is None else staging_folder(maps), dicom, store)
    ranks, detector = start_job(run, options)
    main = ranks.is_main
    viewer_dir = Path(out) / VIEWER_DIR if viewer else None
    staged = [maps, viewer_dir]
    claim = claim_outputs(folders=[out], staged=staged, command="screen") if main else Claim()
    settings = {"metal_level": metal_level, "eps": eps, "min_samples": min_samples, "batch": batch}
    volumes = None if viewer_dir is None else viewer_volumes(detector, data, viewer_dir)
    with claim:
        return _screen_share(
            run,
            data,
            Path(out),
            (maps, viewer_dir),
            claim,
            ranks,
            detector,
            threshold,
            strict,
            (target, volumes),
            settings,
            options,
        )


def _screen_share(
    run: str | Path,
    data: str | Path,
    out: Path,
    folders: tuple[str | Path | None, Path | None],
    claim: Claim,
    ranks: Ranks,
    detector: BaseDetector,
    rule: str,
    strict: bool,
    writers: tuple[MapTarget, ViewerVolumes | None],
    settings: dict[str, Any],
    options: JobOptions,
) -> ScreenJob | None:
    """The body of :func:`screen_folder`, its outputs claimed."""
    maps, viewer_dir = folders
    target, volumes = writers
    threshold = screen_threshold(detector, rule).value
    problems: list[str] = []
    flagged: list[FlaggedSeries] = []
    workers = options.num_workers
    with load_share(detector, data, ranks, strict, workers, ahead=True) as preparing:
        hooks = []
        if maps is not None:
            hooks.append(_map_writer(detector, preparing, target, threshold, problems, flagged))
        if volumes is not None:
            hooks.append(
                lambda index, part, result: volumes.write(part, result, preparing.positions(index))
            )
        result = screen(
            detector,
            preparing.cases,
            threshold=rule,
            **settings,
            ranks=ranks,
            index=preparing.index,
            on_chunk=_both(hooks),
        )
        share = preparing.finish()
    result = replace(result, skipped=list(share.skipped))
    batch = settings["batch"]
    gallery = ranks.checked(  # one failing rank stops them all
        lambda: save_gallery(detector, share.cases, result, out / GALLERY_DIR, batch, share.index)
    )
    if target.dicom and flagged:
        problems += _key_objects(target, flagged, threshold, detector.name)
    gathered = ranks.gather((problems, [] if volumes is None else volumes.entries))
    if gathered is None:
        return None
    every_problem = [part[0] for part in gathered]
    cases = flag_entries([entry for part in gathered for entry in part[1]], threshold)
    write_screen_outputs(result, out, gallery, run=str(run), data=str(data), viewer_cases=cases)
    if maps is not None:
        claim.commit(maps)
    if viewer_dir is not None:
        install_static(staging_folder(viewer_dir))
        claim.commit(viewer_dir)
    return ScreenJob(result, share.warnings, [line for part in every_problem for line in part])


def _both(hooks: list[ChunkHook]) -> ChunkHook | None:
    """One hook that calls each of ``hooks`` in turn (``None`` for none)."""
    if not hooks:
        return None

    def call(index: np.ndarray, part: ImageSet, result: AnomalyResult) -> None:
        for hook in hooks:
            hook(index, part, result)

    return call


def _key_objects(
    target: MapTarget, flagged: list[FlaggedSeries], threshold: float, model: str
) -> list[str]:
    """Write (and store) a Key Object Selection per study of flagged series; its problems."""
    try:
        files = write_key_objects(target.folder, flagged, threshold, model, target.run)  # type: ignore[arg-type]
    except (MedanomalyError, ValueError, OSError) as error:
        return [f"no key object selection of the flagged series: {error}"]
    return [] if target.store is None else store_maps(target.store, files)


def _map_writer(
    detector: BaseDetector,
    share: Share | ShareAhead,
    target: MapTarget,
    threshold: float,
    problems: list[str],
    flagged: list[FlaggedSeries],
) -> ChunkHook:
    """Write (and store) each chunk's maps while the screen has them (at its threshold).

    The flagged DICOM volumes are added to ``flagged``.
    """

    def write(index: np.ndarray, part: ImageSet, result: AnomalyResult) -> None:
        written = target.write(
            part, result, detector.name, share.positions(index), threshold=threshold
        )
        problems.extend(written.problems)
        for j, grid in enumerate(part.grids):
            dicom_volume = grid is not None and grid.dicom_files and len(grid.shape) == 3
            if dicom_volume and result.scores[j] > threshold:
                flagged.append(FlaggedSeries(part.ids[j], float(result.scores[j]), grid))

    return write
