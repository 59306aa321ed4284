"""The latent space of a screen: DBSCAN clusters and a 2D UMAP of the latent vectors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from medanomaly.errors import ConfigError

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


def latent_analysis(
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
