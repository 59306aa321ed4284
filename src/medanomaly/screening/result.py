"""What a screen found: :class:`ScreenResult`, one entry per case in input order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medanomaly.screening.facts import RawFacts, compact_spacing
from medanomaly.screening.latent import UMAP_NEIGHBOURS, UMAP_SEED, LatentClusters

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


@dataclass
class ScreenResult:
    """Everything a screen found, one entry per case in input order.

    Attributes:
        ids: Case ids (file paths).
        scores: Anomaly scores (higher = more abnormal).
        p_values: Conformal p-values against the run's normal validation scores.
        threshold: The cut-off; flagged iff score > threshold.
        threshold_rule: Its rule, spelled as in evaluate, cv and specs (``mean_sd(k=3)``,
            ``percentile(q=99)``, ``conformal(alpha=0.05)`` or ``run``).
        n_validation: Number of held-out normal validation scores behind the threshold.
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
    threshold_rule: str
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
            "threshold_rule": self.threshold_rule,
            "threshold_n": self.n_validation,
            "decision_rule": "flagged iff score > threshold",
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
