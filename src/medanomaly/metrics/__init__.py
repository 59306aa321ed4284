"""Metrics: how good a score or a map is against the labels and masks that exist.

Owns the image-level metrics (:mod:`~medanomaly.metrics.image`), the pixel/voxel-level metrics
inside the foreground (:mod:`~medanomaly.metrics.pixel`), the blocks of ``metrics.json`` built
from them (:mod:`~medanomaly.metrics.blocks`) and the anatomical fidelity of reconstructions
(:mod:`~medanomaly.metrics.fidelity`, with its segmentation network in
:mod:`~medanomaly.metrics.segmentation`).

Scores are "higher = more abnormal", labels are 1 = abnormal / 0 = normal, and a case (or
voxel) is called abnormal iff ``score > threshold`` everywhere in this package.

May import: ``detectors`` and the layers below.
"""

from medanomaly.metrics.fidelity import (
    FidelityScores,
    anatomical_fidelity,
    overlap_score,
    quality_score,
)
from medanomaly.metrics.image import (
    DECISION_RULE,
    bootstrap_auroc_ci,
    image_metrics,
    predict_abnormal,
)
from medanomaly.metrics.pixel import PixelMetricAccumulator, pixel_metrics

__all__ = [
    "DECISION_RULE",
    "FidelityScores",
    "PixelMetricAccumulator",
    "anatomical_fidelity",
    "bootstrap_auroc_ci",
    "image_metrics",
    "overlap_score",
    "pixel_metrics",
    "predict_abnormal",
    "quality_score",
]
