"""The screen itself: score every case chunk by chunk, keep only per-case numbers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medanomaly.data.ahead import PreparingSet
from medanomaly.data.sets import Cases, ImageSet
from medanomaly.detectors.base import AnomalyResult, BaseDetector
from medanomaly.detectors.thresholds import ThresholdChoice, conformal_pvalues, run_threshold
from medanomaly.errors import ConfigError
from medanomaly.image import SourceGrid
from medanomaly.jobs.score import in_chunks
from medanomaly.screening.facts import DEFAULT_METAL_LEVEL, RawFacts, folder_oddities, raw_facts
from medanomaly.screening.latent import DEFAULT_MIN_SAMPLES, LatentClusters, latent_analysis
from medanomaly.screening.residuals import foreground_masks, map_percentiles, reconstruction_errors
from medanomaly.screening.result import ScreenResult
from medanomaly.screening.size_bias import size_bias
from medanomaly.training.distributed import Ranks

log = logging.getLogger(__name__)

DEFAULT_RULE = "mean_sd:k=3"
"""The outlier rule of Hjohlman 2022: mean + 3·SD of the run's held-out normal scores."""
DEFAULT_BATCH = 16


#: ``on_chunk(index, part, result)``: called with every chunk's cases and detection (their
#: ``index`` among the screened cases), e.g. to write their maps while they are in memory.
ChunkHook = Callable[[np.ndarray, ImageSet, AnomalyResult], None]


def screen_threshold(detector: Any, rule: str = DEFAULT_RULE) -> ThresholdChoice:
    """The screening threshold: a rule on the run's held-out normal scores, or its own.

    Raises:
        ConfigError: A rule that needs labels, or a run without held-out normal scores.
    """
    return run_threshold(rule, detector.threshold_, detector.threshold_rule_, detector.val_scores_)


def screen(
    detector: BaseDetector,
    images: Cases | PreparingSet,
    threshold: str = DEFAULT_RULE,
    metal_level: float = DEFAULT_METAL_LEVEL,
    eps: float | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    batch: int = DEFAULT_BATCH,
    skipped: Sequence[tuple[str, str]] = (),
    with_umap: bool = True,
    ranks: Ranks | None = None,
    index: np.ndarray | None = None,
    on_chunk: ChunkHook | None = None,
) -> ScreenResult:
    """Screen unlabelled cases for outliers with a fitted detector.

    Cases are scored ``batch`` at a time; only per-case numbers (and latent vectors) are kept,
    never the maps or reconstructions of the whole set. In a distributed job each rank
    screens its share and the per-case numbers of all ranks are put together in input order.

    Args:
        detector: A fitted detector with ``val_scores_`` (held-out normal scores).
        images: The preprocessed cases (an ``ImageSet`` or a streamed set, or a
            :class:`~medanomaly.data.ahead.PreparingSet` whose chunks are screened as they
            are prepared); their ids must be the file paths (as
            :func:`medanomaly.data.loading.load_dataset` sets them) for the raw facts.
        threshold: The threshold rule, spelled as in evaluate, cv and compare specs:
            ``mean_sd[:k=..]``, ``percentile[:q=..]``, ``conformal[:alpha=..]`` on the run's
            held-out normal scores, or ``run`` (the run's own threshold, e.g. the rule
            ``compare`` learnt for ``OUT/best``).
        metal_level: Raw value above which a voxel counts as metal (3000 HU).
        eps: DBSCAN radius in standardised latent units (``None``: automatic, see
            :func:`latent_clusters`).
        min_samples: DBSCAN ``min_samples``.
        batch: Cases per call to ``detect``.
        skipped: Files left out while loading, ``(path, reason)``, to carry into the outputs.
        with_umap: Compute the 2D UMAP map of the latent vectors.
        ranks: The processes of a distributed job (``None``: this one alone). Only rank 0
            clusters the latent vectors; every rank gets the rest.
        index: Position of each of ``images`` among all screened cases (a rank's share).
        on_chunk: Called with every chunk (see :data:`ChunkHook`).

    Returns:
        The :class:`ScreenResult` of every screened case.

    Raises:
        ConfigError: The run holds no validation scores, or a setting is out of range.
    """
    check_settings(batch, eps, min_samples)
    choice = screen_threshold(detector, threshold)

    def score() -> CaseNumbers:
        return score_cases(detector, images, batch, metal_level, index, on_chunk)

    if ranks is not None and ranks.world_size > 1:
        numbers = CaseNumbers.merge(ranks.together(score))  # a failing rank stops them all
    else:
        numbers = score()
    if len(numbers.ids) == 0:
        raise ConfigError("screen: no cases to screen")
    notes = list(numbers.notes)
    if np.isnan(numbers.mse).all():
        notes.append("the model gives no reconstructions: mse and masked_mse are empty")
    main = ranks is None or ranks.is_main
    vectors = numbers.vectors if main else None  # the other ranks draw, rank 0 clusters

    def cluster() -> LatentClusters | None:
        return latent_analysis(vectors, eps, min_samples, with_umap and main, notes)

    # rank 0 clusters while the others wait; a failure there stops them all
    latent = cluster() if ranks is None else ranks.checked(cluster)
    raw = numbers.raw
    voxel_counts = np.array([np.nan if f.voxel_count is None else f.voxel_count for f in raw])
    validation = np.asarray(detector.val_scores_, dtype=np.float64)
    return ScreenResult(
        ids=numbers.ids,
        scores=numbers.scores,
        threshold=choice.value,
        threshold_rule=choice.rule,
        n_validation=choice.n,
        p_values=conformal_pvalues(validation, numbers.scores),
        mse=numbers.mse,
        masked_mse=numbers.masked_mse,
        foreground_voxels=numbers.foreground_voxels,
        foreground_rule=numbers.foreground_rule,
        map_p999=numbers.map_p999,
        raw=raw,
        oddities=folder_oddities(raw),
        metal_level=float(metal_level),
        size_bias=size_bias(
            numbers.mse, numbers.masked_mse, voxel_counts, numbers.foreground_voxels
        ),
        latent=latent,
        notes=notes,
        skipped=list(skipped),
        model=detector.name or type(detector).__name__,
    )


def check_settings(batch: int, eps: float | None, min_samples: int) -> None:
    """Refuse settings that cannot work, naming the option."""
    if batch < 1:
        raise ConfigError(f"screen: batch must be at least 1, got {batch}")
    if min_samples < 1:
        raise ConfigError(f"screen: min_samples must be at least 1, got {min_samples}")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"screen: eps must be a positive number, got {eps}")


@dataclass
class CaseNumbers:
    """What one pass over (a share of) the cases keeps: small per-case numbers.

    Attributes:
        index: Position of each case among all screened cases.
        ids: Case ids.
        scores, mse, masked_mse, foreground_voxels, map_p999: One value per case.
        raw: The raw facts of each file.
        vectors: Latent vectors ``(N, D)``, or ``None`` for a model without a latent.
        foreground_rule: How the foreground was found.
        notes: What could not be computed.
    """

    index: np.ndarray
    ids: list[str]
    scores: np.ndarray
    mse: np.ndarray
    masked_mse: np.ndarray
    foreground_voxels: np.ndarray
    map_p999: np.ndarray
    raw: list[RawFacts]
    vectors: np.ndarray | None
    foreground_rule: str = ""
    notes: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, parts: Sequence[CaseNumbers]) -> CaseNumbers:
        """The numbers of every rank as one set, in input order."""
        filled = [p for p in parts if len(p.ids)]
        order = np.argsort(np.concatenate([p.index for p in filled]), kind="stable")

        def joined(name: str) -> np.ndarray:
            return np.concatenate([getattr(p, name) for p in filled])[order]

        def listed(name: str) -> list[Any]:
            values = [v for p in filled for v in getattr(p, name)]
            return [values[i] for i in order]

        with_vectors = all(p.vectors is not None for p in filled)
        return cls(
            index=joined("index"),
            ids=listed("ids"),
            scores=joined("scores"),
            mse=joined("mse"),
            masked_mse=joined("masked_mse"),
            foreground_voxels=joined("foreground_voxels"),
            map_p999=joined("map_p999"),
            raw=listed("raw"),
            vectors=joined("vectors") if filled and with_vectors else None,
            foreground_rule=next((p.foreground_rule for p in filled), ""),
            notes=list(dict.fromkeys(n for p in parts for n in p.notes)),
        )


def score_cases(
    detector: BaseDetector,
    images: Cases | PreparingSet,
    batch: int,
    metal_level: float,
    index: np.ndarray | None = None,
    on_chunk: ChunkHook | None = None,
) -> CaseNumbers:
    """Per-case numbers of every chunk of ``batch`` cases (of one shape), in input order."""
    embed: Callable[[ImageSet], np.ndarray | None] | None = (
        detector.embed if detector.has_latent else None
    )
    notes = [] if embed is not None else ["the detector has no latent space: no latent vectors"]
    fg_threshold = detector.foreground_threshold
    parts: list[tuple[np.ndarray, list[str], dict[str, Any], list[RawFacts]]] = []
    vectors: dict[int, np.ndarray] | None = {} if embed is not None else None
    foreground_rule = ""
    for done, (chunk, part) in enumerate(in_chunks(images, batch, "screening"), start=1):
        result = detector.detect(part)
        foreground, foreground_rule = foreground_masks(part, fg_threshold)
        mse, masked = reconstruction_errors(part.images, result.reconstructions, foreground)
        found = {
            "scores": result.scores,
            "mse": mse,
            "masked_mse": masked,
            "foreground_voxels": foreground.reshape(len(part), -1).sum(axis=1),
            "map_p999": map_percentiles(result),
        }
        if vectors is not None and embed is not None:
            _add_vectors(vectors, chunk, embed(part))
        sources = [_raw_source(part.ids[j], part.grids[j]) for j in range(len(chunk))]
        raw = [raw_facts(source, metal_level) for source in sources]
        parts.append((chunk, list(part.ids), found, raw))
        if on_chunk is not None:
            on_chunk(chunk, part, result)
        log.info("screened %d chunks of %d cases", done, batch)
    return _case_numbers(parts, index, vectors, foreground_rule, notes)


def _case_numbers(
    parts: list[tuple[np.ndarray, list[str], dict[str, Any], list[RawFacts]]],
    index: np.ndarray | None,
    vectors: dict[int, np.ndarray] | None,
    foreground_rule: str,
    notes: list[str],
) -> CaseNumbers:
    """Every chunk's numbers in their cases' places (the chunks hold every case once)."""
    n = sum(len(chunk) for chunk, *_ in parts)
    numbers = CaseNumbers(
        index=np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64),
        ids=[""] * n,
        scores=np.zeros(n),
        mse=np.zeros(n),
        masked_mse=np.zeros(n),
        foreground_voxels=np.zeros(n, dtype=np.int64),
        map_p999=np.zeros(n),
        raw=[RawFacts()] * n,
        vectors=None,
        foreground_rule=foreground_rule,
        notes=notes,
    )
    for chunk, ids, found, raw in parts:
        for name, values in found.items():
            getattr(numbers, name)[chunk] = values
        for j, i in enumerate(chunk):
            numbers.ids[i] = ids[j]
            numbers.raw[i] = raw[j]
    if vectors is not None:
        width = next((v.size for v in vectors.values()), 0)
        numbers.vectors = np.array([vectors[i] for i in range(n)]).reshape(n, width)
    return numbers


def _raw_source(case_id: str, grid: SourceGrid | None) -> str | Path:
    """Where a case's data lie as stored: its path, or the folder of its DICOM files.

    A series from a DICOMweb archive has its UID as id and lies where it was retrieved to.
    """
    if grid is not None and grid.dicom_files and not Path(case_id).exists():
        return Path(grid.dicom_files[0]).parent
    return case_id


def _add_vectors(vectors: dict[int, np.ndarray], chunk: np.ndarray, found: np.ndarray) -> None:
    """Keep a chunk's latent vectors by case."""
    found = np.asarray(found, dtype=np.float64).reshape(len(chunk), -1)
    vectors.update({int(i): found[j] for j, i in enumerate(chunk)})
