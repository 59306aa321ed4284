"""Evaluation (compatibility): the public names that lived here before the package was split.

The metrics moved to :mod:`medanomaly.metrics`, the threshold rules live in
:mod:`medanomaly.detectors.thresholds`, the splits, ``cv`` and ``compare`` moved to
:mod:`medanomaly.model_selection`, the reports and figures to :mod:`medanomaly.reports` and
``evaluate`` to :mod:`medanomaly.jobs.evaluate`. ``from medanomaly.evaluation import ...``
keeps working for the names below; new code imports from their homes.

May import: ``metrics``, ``detectors``.
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
from medanomaly.metrics import (
    DECISION_RULE,
    FidelityScores,
    PixelMetricAccumulator,
    anatomical_fidelity,
    bootstrap_auroc_ci,
    image_metrics,
    overlap_score,
    pixel_metrics,
    predict_abnormal,
    quality_score,
)

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
