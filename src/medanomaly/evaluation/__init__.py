"""Evaluation: image-level metrics, threshold rules and pixel/voxel-level metrics.

Scores are "higher = more abnormal", labels are 1 = abnormal / 0 = normal, and a case (or
voxel) is called abnormal iff ``score > threshold`` everywhere in this package.
"""

from medanomaly.evaluation.metrics import (
    DECISION_RULE,
    bootstrap_auroc_ci,
    image_metrics,
    predict_abnormal,
)
from medanomaly.evaluation.pixel import PixelMetricAccumulator, pixel_metrics
from medanomaly.evaluation.thresholds import (
    THRESHOLD_RULES,
    choose_threshold,
    conformal_pvalues,
    conformal_threshold,
    f1_threshold,
    mean_sd_threshold,
    percentile_threshold,
    youden_threshold,
)

__all__ = [
    "DECISION_RULE",
    "THRESHOLD_RULES",
    "PixelMetricAccumulator",
    "bootstrap_auroc_ci",
    "choose_threshold",
    "conformal_pvalues",
    "conformal_threshold",
    "f1_threshold",
    "image_metrics",
    "mean_sd_threshold",
    "percentile_threshold",
    "pixel_metrics",
    "predict_abnormal",
    "youden_threshold",
]
