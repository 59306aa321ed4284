"""Unlabelled outlier screening of a folder of scans (seed 004).

A trained detector of normal anatomy scores every case of an unlabelled folder; cases whose
score exceeds mean + k·SD of the run's held-out normal validation scores are flagged. Beside
the score, each case gets the numbers that tell *why* it may stand out, so that a reader can
separate real findings from acquisition problems:

* reconstruction error over all voxels (``mse``) and over the foreground only
  (``masked_mse``), and the foreground size;
* facts of the file as stored (a second, raw read without preprocessing): shape, voxel count,
  spacing, maximum and mean intensity, the fraction of voxels above a metal level (3000 HU);
* oddities against the rest of the folder: original orientation differing from the folder's
  usual one, spacing more than 20 % from the folder median, strongly anisotropic voxels,
  problems the reader reported, a raw read that failed;
* where the model has a latent space: DBSCAN clusters of the standardised latent vectors and a
  2D UMAP map of them;
* size-bias diagnostics: Spearman correlations of both errors with the raw voxel count and the
  foreground voxel count (a screen that mostly ranks big scans first is measuring size).

:func:`screen` computes all of it (a :class:`ScreenResult`), :func:`save_gallery` draws the
flagged cases and :func:`write_screen_outputs` writes ``screen.csv``, ``summary.json``, the
figures and ``report.html``. ``medanomaly screen`` is a thin layer over these three.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medanomaly.base import AnomalyResult, BaseDetector, mean_sd_threshold  # noqa: E402
from medanomaly.checkpoint import atomic_write  # noqa: E402
from medanomaly.data import ImageSet  # noqa: E402
from medanomaly.errors import ConfigError  # noqa: E402
from medanomaly.evaluation.figures import save_figure  # noqa: E402
from medanomaly.evaluation.report import (  # noqa: E402
    Facts,
    Figure,
    Figures,
    Table,
    Text,
    write_report,
)
from medanomaly.evaluation.runner import write_json  # noqa: E402
from medanomaly.evaluation.thresholds import conformal_pvalues  # noqa: E402
from medanomaly.io import read_image  # noqa: E402
from medanomaly.outputs import case_stem  # noqa: E402
from medanomaly.viz import save_case_figure  # noqa: E402

log = logging.getLogger(__name__)

DEFAULT_K = 3.0
DEFAULT_METAL_LEVEL = 3000.0
DEFAULT_BATCH = 16
#: DBSCAN ``min_samples`` (a core case has this many cases, itself included, within eps).
DEFAULT_MIN_SAMPLES = 5
#: Without ``eps``, DBSCAN's eps is this quantile of the distance of each case to its
#: ``min_samples``-th nearest case (itself counted), so that at least 90 % are core cases.
EPS_QUANTILE = 0.9
#: Fewest cases for DBSCAN and UMAP of the latent vectors.
MIN_LATENT_CASES = 5
#: UMAP neighbours (fewer for small sets: ``min(15, n - 1)``) and seed.
UMAP_NEIGHBOURS = 15
UMAP_SEED = 0
#: Relative deviation of a spacing from the folder median that counts as odd.
SPACING_TOLERANCE = 0.2
#: Largest / smallest spacing above which voxels count as strongly anisotropic (nnU-Net's 3).
ANISOTROPY_RATIO = 3.0
#: Flagged cases inlined in report.html (all of them are in gallery/).
REPORT_GALLERY_MAX = 50

CSV_FILE = "screen.csv"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
GALLERY_DIR = "gallery"
UMAP_SCORE_FILE = "umap_score.png"
UMAP_SIZE_FILE = "umap_size.png"
SIZE_BIAS_FILE = "size_bias.png"
SKIPPED_FILE = "skipped.txt"
CSV_COLUMNS = (
    "rank",
    "id",
    "score",
    "flagged",
    "p_value",
    "mse",
    "masked_mse",
    "shape",
    "voxel_count",
    "foreground_voxels",
    "max_intensity",
    "mean_intensity",
    "metal_fraction",
    "spacing",
    "oddities",
    "cluster",
)
ERRORS = ("mse", "masked_mse")
SIZES = ("voxel_count", "foreground_voxels")


# -- per-file facts ---------------------------------------------------------------------------
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


# -- error and foreground -------------------------------------------------------------------
def foreground_masks(images: ImageSet, threshold: float | None = None) -> tuple[np.ndarray, str]:
    """Foreground voxels ``(N, *spatial)`` of preprocessed images, and the rule used.

    The data's own mask (``images.foreground``) when it has one; else any channel above
    ``threshold`` when it is given; else any channel above the image's minimum.

    Args:
        images: The cases.
        threshold: Intensity cut-off in preprocessed units (a detector's
            ``foreground_threshold``), or ``None``.

    Returns:
        ``(masks, rule in words)``.
    """
    if images.foreground is not None:
        return np.asarray(images.foreground, dtype=bool), "foreground mask provided by the data"
    arrays = images.images
    if threshold is not None:
        return (arrays > threshold).any(axis=1), f"any channel > {threshold:g} (preprocessed)"
    lowest = arrays.min(axis=tuple(range(1, arrays.ndim)), keepdims=True)
    return (arrays > lowest).any(axis=1), "any channel above the image's minimum (preprocessed)"


def reconstruction_errors(
    images: np.ndarray, reconstructions: np.ndarray | None, foreground: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean squared residual per case over all voxels and over the foreground only.

    Args:
        images: Inputs ``(N, C, *spatial)``.
        reconstructions: The model's reconstructions (same shape) or ``None``.
        foreground: Foreground masks ``(N, *spatial)``.

    Returns:
        ``(mse, masked_mse)``, NaN where there is no reconstruction or no foreground voxel.
    """
    n = len(images)
    if reconstructions is None or reconstructions.shape != images.shape:
        return np.full(n, np.nan), np.full(n, np.nan)
    squared = np.square(images - reconstructions, dtype=np.float32).mean(axis=1)
    flat = squared.reshape(n, -1)
    mask = foreground.reshape(n, -1)
    mse = flat.mean(axis=1, dtype=np.float64)
    counts = mask.sum(axis=1)
    sums = np.where(mask, flat, 0.0).sum(axis=1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        masked = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return mse, masked


# -- size bias --------------------------------------------------------------------------------
def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Spearman's rho and its p-value over the cases where both values are finite.

    Args:
        x: First variable.
        y: Second variable.

    Returns:
        ``{"rho", "p", "n"}`` plus ``"note"`` when rho is undefined (then rho and p are NaN).
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out: dict[str, Any] = {"rho": math.nan, "p": math.nan, "n": int(keep.sum())}
    if len(a) < 3:
        out["note"] = f"undefined: {len(a)} case(s) with both values (needs 3)"
    elif np.ptp(a) == 0 or np.ptp(b) == 0:
        out["note"] = "undefined: one of the two is the same for every case"
    else:
        result = spearmanr(a, b)
        out.update(rho=float(result.statistic), p=float(result.pvalue))
    return out


def size_bias(
    mse: np.ndarray,
    masked_mse: np.ndarray,
    voxel_count: np.ndarray,
    foreground_voxels: np.ndarray,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Spearman correlation of each error with each size.

    Args:
        mse: Error over all voxels per case.
        masked_mse: Error over the foreground per case.
        voxel_count: Raw voxel count per case (NaN where the raw read failed).
        foreground_voxels: Foreground voxel count per case (preprocessed grid).

    Returns:
        ``{error: {size: {"rho", "p", "n"[, "note"]}}}`` for errors ``mse``, ``masked_mse``
        and sizes ``voxel_count``, ``foreground_voxels``.
    """
    errors = {"mse": mse, "masked_mse": masked_mse}
    sizes = {"voxel_count": voxel_count, "foreground_voxels": foreground_voxels}
    return {e: {s: spearman(errors[e], sizes[s]) for s in SIZES} for e in ERRORS}


# -- latent space -----------------------------------------------------------------------------
@dataclass
class LatentClusters:
    """DBSCAN of the standardised latent vectors (and their UMAP map).

    Attributes:
        labels: Cluster id per case; -1 = DBSCAN noise (in no dense region).
        eps: Neighbourhood radius used (in standardised units).
        eps_source: ``"given"`` or how it was derived.
        min_samples: Cases (itself included) a core case has within ``eps``.
        dimensions: Length of the latent vectors.
        embedding: 2D UMAP coordinates ``(N, 2)``, or ``None`` when not computed.
    """

    labels: np.ndarray
    eps: float
    eps_source: str
    min_samples: int
    dimensions: int
    embedding: np.ndarray | None = None

    @property
    def counts(self) -> dict[int, int]:
        """Cases per cluster id (-1 = noise), sorted by id."""
        ids, counts = np.unique(self.labels, return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}

    def summary(self) -> dict[str, Any]:
        """The DBSCAN settings and cluster sizes, for ``summary.json``."""
        counts = self.counts
        return {
            "eps": self.eps,
            "eps_source": self.eps_source,
            "min_samples": self.min_samples,
            "latent_dimensions": self.dimensions,
            "standardised": True,
            "n_clusters": len([c for c in counts if c != -1]),
            "n_noise": counts.get(-1, 0),
            "cluster_sizes": {str(k): v for k, v in counts.items()},
        }


def standardise(vectors: np.ndarray) -> np.ndarray:
    """Each latent dimension to mean 0 and SD 1 (constant dimensions to 0)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    sd = vectors.std(axis=0)
    return (vectors - vectors.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def latent_clusters(
    vectors: np.ndarray, eps: float | None = None, min_samples: int = DEFAULT_MIN_SAMPLES
) -> LatentClusters:
    """DBSCAN on standardised latent vectors.

    Args:
        vectors: Latent vectors ``(N, D)``.
        eps: Neighbourhood radius in standardised units; ``None`` takes the
            :data:`EPS_QUANTILE` quantile of each case's distance to its ``min_samples``-th
            nearest case (itself counted), so that at least that share are core cases and
            only cases far from every dense region become noise.
        min_samples: DBSCAN's ``min_samples`` (capped at the number of cases).

    Returns:
        The cluster labels and the settings used.

    Raises:
        ConfigError: For fewer than :data:`MIN_LATENT_CASES` cases or bad settings.
    """
    from sklearn.cluster import DBSCAN
    from sklearn.neighbors import NearestNeighbors

    vectors = np.asarray(vectors, dtype=np.float64)
    n = len(vectors)
    if vectors.ndim != 2 or n < MIN_LATENT_CASES:
        raise ConfigError(
            f"latent clusters need at least {MIN_LATENT_CASES} vectors (N, D), got shape "
            f"{vectors.shape}"
        )
    if min_samples < 1 or (eps is not None and not eps > 0):
        raise ConfigError(f"DBSCAN needs eps > 0 and min_samples >= 1 (eps={eps}, {min_samples})")
    scaled = standardise(vectors)
    used = min(int(min_samples), n)
    source = "given"
    if eps is None:
        neighbours = max(used, 2)  # itself first; min_samples 1 uses the nearest other case
        distances, _ = NearestNeighbors(n_neighbors=neighbours).fit(scaled).kneighbors(scaled)
        eps = max(float(np.quantile(distances[:, -1], EPS_QUANTILE)), 1e-9)
        source = (
            f"auto: {EPS_QUANTILE:.0%} quantile of each case's distance to its "
            f"{_ordinal(neighbours - 1)}-nearest other case"
        )
    labels = DBSCAN(eps=float(eps), min_samples=used).fit_predict(scaled)
    return LatentClusters(
        labels=labels.astype(np.int64),
        eps=float(eps),
        eps_source=source,
        min_samples=used,
        dimensions=int(vectors.shape[1]),
    )


def _ordinal(n: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ... ``11th``, ``21st``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def umap_embedding(vectors: np.ndarray, seed: int = UMAP_SEED) -> np.ndarray:
    """2D UMAP of standardised latent vectors (``n_neighbors = min(15, n - 1)``).

    Args:
        vectors: Latent vectors ``(N, D)``, N >= :data:`MIN_LATENT_CASES`.
        seed: UMAP's ``random_state`` (fixes the layout; UMAP then runs single-threaded).

    Returns:
        Coordinates ``(N, 2)``.
    """
    import umap  # slow to import (numba); only screens with latent vectors need it

    n = len(vectors)
    reducer = umap.UMAP(n_neighbors=min(UMAP_NEIGHBOURS, n - 1), random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", message=".*(spectral|disconnected|graph).*")
        return np.asarray(reducer.fit_transform(standardise(vectors)), dtype=np.float64)


# -- the screen -------------------------------------------------------------------------------
@dataclass
class ScreenResult:
    """Everything a screen found, one entry per case in input order.

    Attributes:
        ids: Case ids (file paths).
        scores: Anomaly scores (higher = more abnormal).
        p_values: Conformal p-values against the run's normal validation scores.
        threshold: mean + k·SD of those validation scores; flagged iff score > threshold.
        k: The k of the threshold.
        n_validation: Number of validation scores behind the threshold.
        mse: Mean squared residual over all voxels (NaN without reconstructions).
        masked_mse: The same over the foreground voxels only.
        foreground_voxels: Foreground voxels per case (on the preprocessed grid).
        foreground_rule: How the foreground was found.
        map_p999: 99.9th percentile of each case's anomaly map (shared gallery colour scale).
        raw: Facts of each file as stored.
        oddities: Per case, what is odd about its file against the folder.
        metal_level: Raw value above which a voxel counts as metal.
        size_bias: Spearman correlations of the errors with the sizes (see :func:`size_bias`).
        latent: DBSCAN/UMAP of the latent vectors, or ``None``.
        notes: What could not be computed, and why (e.g. a model without a latent space).
        skipped: ``(path, reason)`` of the files that could not be screened.
        model: The detector's registry name.
    """

    ids: list[str]
    scores: np.ndarray
    p_values: np.ndarray
    threshold: float
    k: float
    n_validation: int
    mse: np.ndarray
    masked_mse: np.ndarray
    foreground_voxels: np.ndarray
    foreground_rule: str
    map_p999: np.ndarray
    raw: list[RawFacts]
    oddities: list[list[str]]
    metal_level: float
    size_bias: dict[str, dict[str, dict[str, Any]]]
    latent: LatentClusters | None = None
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def flagged(self) -> np.ndarray:
        """True where score > threshold."""
        return self.scores > self.threshold

    @property
    def order(self) -> np.ndarray:
        """Case indices by descending score (ties keep input order)."""
        return np.argsort(-self.scores, kind="stable")

    @property
    def ranks(self) -> np.ndarray:
        """Rank of each case (1 = highest score)."""
        ranks = np.empty(len(self), dtype=np.int64)
        ranks[self.order] = np.arange(1, len(self) + 1)
        return ranks

    @property
    def flagged_order(self) -> list[int]:
        """Indices of the flagged cases, highest score first."""
        flagged = self.flagged
        return [int(i) for i in self.order if flagged[i]]

    @property
    def voxel_counts(self) -> np.ndarray:
        """Raw voxel count per case as floats (NaN where the raw read failed)."""
        return np.array([np.nan if f.voxel_count is None else f.voxel_count for f in self.raw])

    def rows(self) -> list[dict[str, Any]]:
        """One dict per case, columns :data:`CSV_COLUMNS`, ranked by score."""
        ranks, flagged = self.ranks, self.flagged
        clusters = None if self.latent is None else self.latent.labels
        return [
            {
                "rank": int(ranks[i]),
                "id": self.ids[i],
                "score": float(self.scores[i]),
                "flagged": int(flagged[i]),
                "p_value": float(self.p_values[i]),
                "mse": float(self.mse[i]),
                "masked_mse": float(self.masked_mse[i]),
                "shape": "x".join(str(s) for s in self.raw[i].shape or ()),
                "voxel_count": self.raw[i].voxel_count,
                "foreground_voxels": int(self.foreground_voxels[i]),
                "max_intensity": self.raw[i].max_intensity,
                "mean_intensity": self.raw[i].mean_intensity,
                "metal_fraction": self.raw[i].metal_fraction,
                "spacing": compact_spacing(self.raw[i].spacing),
                "oddities": "; ".join(self.oddities[i]),
                "cluster": None if clusters is None else int(clusters[i]),
            }
            for i in self.order
        ]

    def summary(self) -> dict[str, Any]:
        """The headline numbers, for ``summary.json``."""
        flagged = self.flagged_order
        return {
            "threshold": self.threshold,
            "k": self.k,
            "threshold_rule": (
                f"mean + {self.k:g}·SD of the run's {self.n_validation} held-out normal "
                "validation scores; flagged iff score > threshold"
            ),
            "n_cases": len(self),
            "n_flagged": len(flagged),
            "flagged_ids": [self.ids[i] for i in flagged],
            "n_with_oddities": sum(1 for o in self.oddities if o),
            "metal_level": self.metal_level,
            "foreground_rule": self.foreground_rule,
            "spearman": self.size_bias,
            "dbscan": None if self.latent is None else self.latent.summary(),
            "umap": self._umap_summary(),
            "notes": list(self.notes),
            "skipped": [{"case": path, "reason": reason} for path, reason in self.skipped],
            "model": self.model,
        }

    def _umap_summary(self) -> dict[str, Any] | None:
        if self.latent is None or self.latent.embedding is None:
            return None
        n = len(self)
        return {"n_neighbors": min(UMAP_NEIGHBOURS, n - 1), "random_state": UMAP_SEED}


def screen(
    detector: BaseDetector,
    images: ImageSet,
    k: float = DEFAULT_K,
    metal_level: float = DEFAULT_METAL_LEVEL,
    eps: float | None = None,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    batch: int = DEFAULT_BATCH,
    skipped: Sequence[tuple[str, str]] = (),
    with_umap: bool = True,
) -> ScreenResult:
    """Screen unlabelled cases for outliers with a fitted detector.

    Cases are scored ``batch`` at a time; only per-case numbers (and latent vectors) are kept,
    never the maps or reconstructions of the whole set.

    Args:
        detector: A fitted detector with ``val_scores_`` (held-out normal scores).
        images: The preprocessed cases; their ids must be the file paths (as
            :func:`medanomaly.datasets.load_dataset` sets them) for the raw facts.
        k: Flag cases whose score exceeds mean + k·SD of the validation scores.
        metal_level: Raw value above which a voxel counts as metal (3000 HU).
        eps: DBSCAN radius in standardised latent units (``None``: automatic, see
            :func:`latent_clusters`).
        min_samples: DBSCAN ``min_samples``.
        batch: Cases per call to ``detect``.
        skipped: Files left out while loading, ``(path, reason)``, to carry into the outputs.
        with_umap: Compute the 2D UMAP map of the latent vectors.

    Returns:
        The :class:`ScreenResult`.

    Raises:
        ConfigError: The run holds no validation scores, or a setting is out of range.
    """
    _check_settings(batch, eps, min_samples)
    if len(images) == 0:
        raise ConfigError("screen: no cases to screen")
    validation = np.asarray(getattr(detector, "val_scores_", []), dtype=np.float64)
    if validation.size == 0:
        raise ConfigError(
            f"screen: the {getattr(detector, 'name', '') or type(detector).__name__} run holds "
            "no held-out normal validation scores, so mean + k·SD cannot be computed; refit it"
        )
    threshold = mean_sd_threshold(validation, k)
    fg_threshold = getattr(detector, "foreground_threshold", None)
    per_case = _score_in_chunks(detector, images, batch, fg_threshold, metal_level)
    notes = list(per_case.pop("notes"))
    raw = per_case.pop("raw")
    if np.isnan(per_case["mse"]).all():
        notes.append("the model gives no reconstructions: mse and masked_mse are empty")
    latent = _latent_analysis(per_case.pop("vectors"), eps, min_samples, with_umap, notes)
    voxel_counts = np.array([np.nan if f.voxel_count is None else f.voxel_count for f in raw])
    return ScreenResult(
        ids=list(images.ids),
        threshold=threshold,
        k=float(k),
        n_validation=int(validation.size),
        p_values=conformal_pvalues(validation, per_case["scores"]),
        raw=raw,
        oddities=folder_oddities(raw),
        metal_level=float(metal_level),
        size_bias=size_bias(
            per_case["mse"], per_case["masked_mse"], voxel_counts, per_case["foreground_voxels"]
        ),
        latent=latent,
        notes=notes,
        skipped=list(skipped),
        model=getattr(detector, "name", "") or type(detector).__name__,
        **per_case,
    )


def _check_settings(batch: int, eps: float | None, min_samples: int) -> None:
    """Refuse settings that cannot work, naming the option."""
    if batch < 1:
        raise ConfigError(f"screen: batch must be at least 1, got {batch}")
    if min_samples < 1:
        raise ConfigError(f"screen: min_samples must be at least 1, got {min_samples}")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"screen: eps must be a positive number, got {eps}")


def _score_in_chunks(
    detector: BaseDetector,
    images: ImageSet,
    batch: int,
    fg_threshold: float | None,
    metal_level: float,
) -> dict[str, Any]:
    """Per-case numbers of every chunk of ``batch`` cases, concatenated."""
    embed: Callable[[ImageSet], np.ndarray | None] | None = getattr(detector, "embed", None)
    notes = [] if callable(embed) else ["the detector has no embed(): no latent vectors"]
    parts: dict[str, list[np.ndarray]] = {
        key: [] for key in ("scores", "mse", "masked_mse", "foreground_voxels", "map_p999")
    }
    vectors: list[np.ndarray] | None = [] if callable(embed) else None
    raw: list[RawFacts] = []
    rule = ""
    for start in range(0, len(images), batch):
        part = images.subset(np.arange(start, min(start + batch, len(images))))
        result = detector.detect(part)
        foreground, rule = foreground_masks(part, fg_threshold)
        mse, masked = reconstruction_errors(part.images, result.reconstructions, foreground)
        parts["scores"].append(np.asarray(result.scores, dtype=np.float64))
        parts["mse"].append(mse)
        parts["masked_mse"].append(masked)
        parts["foreground_voxels"].append(foreground.reshape(len(part), -1).sum(axis=1))
        parts["map_p999"].append(_map_percentiles(result))
        if vectors is not None:
            vectors = _add_vectors(vectors, embed(part) if embed else None, notes)
        raw += [raw_facts(case_id, metal_level) for case_id in part.ids]
        log.info("screened %d / %d cases", min(start + batch, len(images)), len(images))
    per_case: dict[str, Any] = {key: np.concatenate(value) for key, value in parts.items()}
    per_case["foreground_voxels"] = per_case["foreground_voxels"].astype(np.int64)
    per_case.update(
        foreground_rule=rule,
        vectors=None if vectors is None else np.concatenate(vectors),
        raw=raw,
        notes=notes,
    )
    return per_case


def _map_percentiles(result: AnomalyResult) -> np.ndarray:
    """99.9th percentile of each case's anomaly map."""
    maps = np.asarray(result.maps)
    if maps.size == 0:
        return np.full(len(result.scores), np.nan)
    return np.percentile(maps.reshape(len(maps), -1), 99.9, axis=1)


def _add_vectors(
    vectors: list[np.ndarray], chunk: np.ndarray | None, notes: list[str]
) -> list[np.ndarray] | None:
    """Append a chunk's latent vectors; ``None`` once the model says it has no latent."""
    if chunk is None:
        notes.append("the model has no latent space (embed() gave None): no UMAP or clusters")
        return None
    vectors.append(np.asarray(chunk, dtype=np.float64).reshape(len(chunk), -1))
    return vectors


def _latent_analysis(
    vectors: np.ndarray | None,
    eps: float | None,
    min_samples: int,
    with_umap: bool,
    notes: list[str],
) -> LatentClusters | None:
    """DBSCAN (and UMAP) of the latent vectors, or ``None`` with a note saying why not."""
    if vectors is None:
        return None
    if len(vectors) < MIN_LATENT_CASES:
        notes.append(
            f"only {len(vectors)} case(s): UMAP and DBSCAN need at least {MIN_LATENT_CASES}"
        )
        return None
    clusters = latent_clusters(vectors, eps, min_samples)
    if with_umap:
        clusters.embedding = umap_embedding(vectors)
    return clusters


# -- outputs ----------------------------------------------------------------------------------
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
    images: ImageSet,
    result: ScreenResult,
    folder: str | Path,
    batch: int = DEFAULT_BATCH,
) -> list[Path]:
    """Draw input | reconstruction | difference of every flagged case, highest score first.

    The flagged cases are scored again, ``batch`` at a time, so that the screen itself never
    holds their maps. 3D cases show the three orthogonal planes through the voxel with the
    largest difference; 2D cases one row.

    Args:
        detector: The detector that made ``result``.
        images: The cases ``result`` describes (same order).
        result: The screen.
        folder: Where to write ``<rank>_<name>.png``.
        batch: Cases per call to ``detect``.

    Returns:
        The PNG files, in rank order.
    """
    folder = Path(folder)
    order, ranks, scale = result.flagged_order, result.ranks, gallery_scale(result)
    written = []
    for start in range(0, len(order), max(batch, 1)):
        index = order[start : start + max(batch, 1)]
        part = images.subset(index)
        found = detector.detect(part)
        for j, i in enumerate(index):
            recon = None if found.reconstructions is None else found.reconstructions[j]
            title = (
                f"#{ranks[i]} {Path(result.ids[i]).name}  score {result.scores[i]:.4g} "
                f"(threshold {result.threshold:.4g})"
            )
            path = folder / f"{case_stem(result.ids[i], int(ranks[i]))}.png"
            written.append(
                save_case_figure(part.images[j], recon, found.maps[j], path, title, scale)
            )
    return written


def write_screen_csv(result: ScreenResult, path: str | Path) -> Path:
    """Write ``screen.csv`` (columns :data:`CSV_COLUMNS`, ranked by score) atomically."""

    def write(handle: Any) -> None:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in result.rows():
            writer.writerow([_csv_cell(row[c], c) for c in CSV_COLUMNS])

    atomic_write(path, write, mode="w")
    return Path(path)


def _csv_cell(value: Any, column: str) -> str:
    """Numbers with enough digits, missing values empty."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.8g}" if column == "score" else f"{value:.6g}"
    return str(value)


def plot_latent_map(
    embedding: np.ndarray,
    values: np.ndarray,
    flagged: np.ndarray,
    path: str | Path,
    label: str,
    title: str,
    noise: np.ndarray | None = None,
) -> Path:
    """UMAP scatter coloured by ``values``, flagged cases ringed in black.

    Args:
        embedding: 2D coordinates ``(N, 2)``.
        values: Colour per case (NaN drawn grey).
        flagged: True for the flagged cases.
        path: PNG to write.
        label: Colour-bar label.
        title: Figure title.
        noise: True for DBSCAN noise cases (marked with a small cross), or ``None``.

    Returns:
        The path written.
    """
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    values = np.ma.masked_invalid(np.asarray(values, dtype=np.float64))
    dots = ax.scatter(
        embedding[:, 0], embedding[:, 1], c=values, cmap=cmap, s=18, plotnonfinite=True
    )
    fig.colorbar(dots, ax=ax, label=label)
    if flagged.any():
        ax.scatter(
            embedding[flagged, 0],
            embedding[flagged, 1],
            s=90,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
            label=f"flagged ({int(flagged.sum())})",
        )
    if noise is not None and noise.any():
        ax.scatter(
            embedding[noise, 0],
            embedding[noise, 1],
            s=30,
            marker="x",
            color="tab:red",
            linewidths=1.0,
            label=f"DBSCAN noise ({int(noise.sum())})",
        )
    if flagged.any() or (noise is not None and noise.any()):
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_size_bias(result: ScreenResult, path: str | Path) -> Path:
    """2x2 scatter: each error against each size, Spearman's rho in the panel titles."""
    sizes = {"voxel_count": result.voxel_counts, "foreground_voxels": result.foreground_voxels}
    errors = {"mse": result.mse, "masked_mse": result.masked_mse}
    flagged = result.flagged
    fig, axes = plt.subplots(2, 2, figsize=(8, 6.5), squeeze=False)
    for row, error in zip(axes, ERRORS, strict=True):
        for ax, size in zip(row, SIZES, strict=True):
            x, y = np.asarray(sizes[size], dtype=float), np.asarray(errors[error], dtype=float)
            ax.scatter(x[~flagged], y[~flagged], s=12, color="tab:blue", label="not flagged")
            ax.scatter(x[flagged], y[flagged], s=16, color="tab:red", label="flagged")
            found = result.size_bias[error][size]
            ax.set_title(
                f"{error} vs {size}: rho {found['rho']:.2f} (p {found['p']:.2g})"
                if math.isfinite(found["rho"])
                else f"{error} vs {size}: rho n/a",
                fontsize=9,
            )
            ax.set_xlabel(size)
            ax.set_ylabel(error)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def write_screen_outputs(
    result: ScreenResult,
    out_dir: str | Path,
    gallery: Sequence[Path] = (),
    run: str = "",
    data: str = "",
) -> dict[str, Path]:
    """Write the table, the summary, the figures and the report of a screen (atomically).

    Args:
        result: The screen.
        out_dir: Output folder (created).
        gallery: The PNGs of :func:`save_gallery`, in rank order.
        run: The run directory (shown in the report and the summary).
        data: The screened folder or manifest.

    Returns:
        Name -> path of every file written (``csv``, ``summary``, ``report``, the figures).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": write_screen_csv(result, out / CSV_FILE)}
    written["size_bias"] = plot_size_bias(result, out / SIZE_BIAS_FILE)
    latent = result.latent
    if latent is not None and latent.embedding is not None:
        flagged, noise = result.flagged, latent.labels == -1
        written["umap_score"] = plot_latent_map(
            latent.embedding,
            result.scores,
            flagged,
            out / UMAP_SCORE_FILE,
            "anomaly score",
            "Latent space (UMAP), coloured by score",
            noise,
        )
        written["umap_size"] = plot_latent_map(
            latent.embedding,
            result.voxel_counts,
            flagged,
            out / UMAP_SIZE_FILE,
            "raw voxel count",
            "Latent space (UMAP), coloured by voxel count",
            noise,
        )
    summary = {**result.summary(), "run": str(run), "data": str(data)}
    summary["files"] = {k: p.name for k, p in written.items()}
    summary["files"]["gallery"] = [f"{GALLERY_DIR}/{Path(p).name}" for p in gallery]
    written["report"] = write_report(
        out / REPORT_FILE,
        "medanomaly screen",
        report_blocks(result, written, list(gallery)),
        subtitle=f"run {run} · data {data} · model {result.model}",
    )
    summary["files"]["report"] = REPORT_FILE
    written["summary"] = write_json(out / SUMMARY_FILE, summary)
    return written


def report_blocks(
    result: ScreenResult, figures: dict[str, Path], gallery: list[Path]
) -> list[Facts | Table | Figures | Text]:
    """The blocks of ``report.html``: facts, latent space, size bias, gallery, table."""
    flagged = result.flagged_order
    blocks: list[Facts | Table | Figures | Text] = [
        Facts(
            "Screening",
            [
                ("cases screened", len(result)),
                ("flagged", f"{len(flagged)} ({len(flagged) / max(len(result), 1):.1%})"),
                ("threshold", result.threshold),
                ("threshold rule", result.summary()["threshold_rule"]),
                ("cases with file oddities", sum(1 for o in result.oddities if o)),
                ("metal level (raw units)", result.metal_level),
                ("foreground", result.foreground_rule),
                ("files skipped", len(result.skipped)),
            ],
        )
    ]
    blocks += _latent_blocks(result, figures)
    blocks += _size_bias_blocks(result, figures)
    if gallery:
        shown = gallery[:REPORT_GALLERY_MAX]
        more = len(gallery) - len(shown)
        blocks.append(
            Figures(
                "Flagged cases: input | reconstruction | difference",
                [Figure(p, p.stem) for p in shown],
                note="Highest score first. 3D: the three planes through the voxel with the "
                "largest difference. Colour scale shared: red = at least the largest residual "
                "seen in an unflagged case."
                + (f" {more} more flagged case(s) are in {GALLERY_DIR}/." if more else ""),
            )
        )
    blocks.append(_case_table(result))
    if result.skipped:
        lines = "; ".join(f"{path}: {reason}" for path, reason in result.skipped)
        blocks.append(Text(f"Skipped files ({len(result.skipped)})", lines))
    return blocks


def _latent_blocks(result: ScreenResult, figures: dict[str, Path]) -> list[Any]:
    latent = result.latent
    if latent is None:
        why = "; ".join(n for n in result.notes if "latent" in n or "UMAP" in n)
        return [Text("Latent space", f"No latent-space analysis: {why or 'no latent vectors'}.")]
    info = latent.summary()
    sizes = ", ".join(
        f"{'noise' if k == '-1' else 'cluster ' + k}: {v}" for k, v in info["cluster_sizes"].items()
    )
    blocks: list[Any] = [
        Facts(
            "Latent clusters (DBSCAN on standardised latent vectors)",
            [
                ("latent dimensions", latent.dimensions),
                ("eps", latent.eps),
                ("eps from", latent.eps_source),
                ("min_samples", latent.min_samples),
                ("clusters", info["n_clusters"]),
                ("noise cases (cluster -1)", info["n_noise"]),
                ("cases per cluster", sizes),
            ],
        )
    ]
    shown = [figures[k] for k in ("umap_score", "umap_size") if k in figures]
    if shown:
        blocks.append(
            Figures(
                "Latent space (UMAP)",
                [Figure(p, p.stem) for p in shown],
                note="2D UMAP of the standardised latent vectors; black rings = flagged cases, "
                "red crosses = DBSCAN noise (cluster -1).",
            )
        )
    return blocks


def _size_bias_blocks(result: ScreenResult, figures: dict[str, Path]) -> list[Any]:
    items = []
    for error in ERRORS:
        for size in SIZES:
            found = result.size_bias[error][size]
            text = (
                f"rho {found['rho']:.3f}, p {found['p']:.3g} (n {found['n']})"
                if math.isfinite(found["rho"])
                else found.get("note", "n/a")
            )
            items.append((f"{error} vs {size}", text))
    return [
        Facts("Size bias (Spearman)", items),
        Figures(
            "Error against size",
            [Figure(figures["size_bias"], "size_bias")] if "size_bias" in figures else [],
            note="A strong correlation means the error ranks scans by size rather than content.",
        ),
    ]


def _case_table(result: ScreenResult) -> Table:
    rows = result.rows()
    columns = [c for c in CSV_COLUMNS if c != "cluster" or result.latent is not None]
    return Table(
        "Cases (ranked by score)",
        columns,
        [[bool(row[c]) if c == "flagged" else row[c] for c in columns] for row in rows],
        note="flagged = score > threshold; p_value = conformal p-value against the run's "
        "normal validation scores; cluster -1 = DBSCAN noise.",
        row_classes=["abnormal" if row["flagged"] else "" for row in rows],
    )


def summary_line(result: ScreenResult, out_dir: str | Path) -> str:
    """One line for the terminal: cases, flagged, threshold, skipped, where the outputs are."""
    skipped = f", {len(result.skipped)} file(s) skipped" if result.skipped else ""
    return (
        f"screened {len(result)} cases: {len(result.flagged_order)} flagged above threshold "
        f"{result.threshold:.6g} (mean + {result.k:g}·SD){skipped} -> {out_dir}"
    )
