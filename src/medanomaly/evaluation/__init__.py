"""Evaluation: image-level metrics, threshold rules and pixel/voxel-level metrics.

Scores are "higher = more abnormal", labels are 1 = abnormal / 0 = normal, and a case (or
voxel) is called abnormal iff ``score > threshold`` everywhere in this package.

Owns image- and pixel-level metrics, the ``evaluate`` and ``cv`` pipelines, their
figures and reports, and the anatomical-fidelity scores.

May import: ``jobs``, ``models``, ``outputs``, ``config``, ``detectors`` and the layers below.
"""

from medanomaly.detectors.thresholds import (
    THRESHOLD_RULES,
    choose_threshold,
    conformal_pvalues,
    conformal_threshold,
    f1_threshold,
    mean_sd_threshold,
    percentile_threshold,
    youden_threshold,
)
from medanomaly.evaluation.fidelity import (
    FidelityScores,
    anatomical_fidelity,
    overlap_score,
    quality_score,
)
from medanomaly.evaluation.metrics import (
    DECISION_RULE,
    bootstrap_auroc_ci,
    image_metrics,
    predict_abnormal,
)
from medanomaly.evaluation.pixel import PixelMetricAccumulator, pixel_metrics

__all__ = [
    "DECISION_RULE",
    "FidelityScores",
    "THRESHOLD_RULES",
    "PixelMetricAccumulator",
    "anatomical_fidelity",
    "bootstrap_auroc_ci",
    "choose_threshold",
    "conformal_pvalues",
    "conformal_threshold",
    "f1_threshold",
    "image_metrics",
    "mean_sd_threshold",
    "overlap_score",
    "percentile_threshold",
    "pixel_metrics",
    "predict_abnormal",
    "quality_score",
    "youden_threshold",
]
