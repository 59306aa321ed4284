"""Image-level metrics: one anomaly score and one label per image or volume.

Conventions used throughout :mod:`medanomaly.metrics`:

* Scores are "higher = more abnormal".
* Labels are ``1`` = abnormal and ``0`` = normal.
* The decision rule is **abnormal iff score > threshold** (strictly greater). Every threshold
  rule in :mod:`medanomaly.detectors.thresholds` places its cut-off so that this rule
  reproduces the operating point it chose.

Every function returns plain Python ``float``/``int``/``None`` values so that results can be
written with :func:`json.dump` directly. A metric that is undefined for the data at hand
(e.g. AUROC when only one class is present) is ``None`` and the reason is added to the
``notes`` list of the result instead of raising.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from medanomaly.detectors.thresholds import ArrayLike, check_labels_scores

DECISION_RULE = "score > threshold"

_BOOT_CHUNK_ELEMENTS = 4_000_000  # bootstrap resamples are ranked in chunks of this many values


def predict_abnormal(scores: ArrayLike, threshold: float) -> np.ndarray:
    """Apply the package-wide decision rule: abnormal iff ``score > threshold``.

    Args:
        scores: One score per case.
        threshold: The cut-off.

    Returns:
        An int64 array, 1 where the case is called abnormal and 0 elsewhere.
    """
    return (np.asarray(scores, dtype=np.float64) > threshold).astype(np.int64)


def _ratio(num: int, den: int) -> float | None:
    """Return ``num / den`` as a float, or ``None`` when ``den`` is zero."""
    return float(num) / float(den) if den > 0 else None


def _ranking_metrics(labels: np.ndarray, scores: np.ndarray, notes: list[str]) -> dict[str, Any]:
    """AUROC and average precision, ``None`` (with a note) when undefined."""
    n_abnormal = int(labels.sum())
    n_normal = int(labels.size - n_abnormal)
    auroc = auprc = None
    if n_abnormal and n_normal:
        auroc = float(roc_auc_score(labels, scores))
    else:
        notes.append("auroc undefined: only one class present in labels")
    if n_abnormal:
        auprc = float(average_precision_score(labels, scores))
    else:
        notes.append("auprc undefined: no abnormal cases")
    return {"auroc": auroc, "auprc": auprc}


def _threshold_metrics(cm: dict[str, int], notes: list[str]) -> dict[str, float | None]:
    """Sensitivity, specificity, accuracy, precision and F1 from a confusion matrix."""
    tn, fp, fn, tp = cm["tn"], cm["fp"], cm["fn"], cm["tp"]
    out = {
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    reasons = {
        "sensitivity": "no abnormal cases",
        "specificity": "no normal cases",
        "precision": "no case called abnormal",
        "f1": "no abnormal cases and no case called abnormal",
    }
    for key, reason in reasons.items():
        if out[key] is None:
            notes.append(f"{key} undefined: {reason}")
    return out


def image_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, Any]:
    """Image-level detection metrics at one threshold.

    Cases are called abnormal iff ``score > threshold``. Ranking metrics (AUROC, AUPRC) do
    not depend on the threshold. AUPRC is scikit-learn's average precision.

    Args:
        labels: Binary labels, 1 = abnormal, 0 = normal.
        scores: One anomaly score per case, higher = more abnormal.
        threshold: The operating cut-off.

    Returns:
        A JSON-serialisable dict with keys ``auroc``, ``auprc``, ``sensitivity``,
        ``specificity``, ``accuracy``, ``precision``, ``f1``, ``confusion_matrix``
        (``{"tn", "fp", "fn", "tp"}``), ``n_normal``, ``n_abnormal``, ``threshold``,
        ``decision_rule`` and ``notes`` (reasons for every metric that is ``None``).

    Raises:
        ValueError: On malformed input (see :func:`check_labels_scores`).
    """
    y, s = check_labels_scores(labels, scores)
    pred = predict_abnormal(s, threshold)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
    cm = {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    notes: list[str] = []
    result: dict[str, Any] = _ranking_metrics(y, s, notes)
    result.update(_threshold_metrics(cm, notes))
    result.update(
        confusion_matrix=cm,
        n_normal=int(np.sum(y == 0)),
        n_abnormal=int(np.sum(y == 1)),
        threshold=float(threshold),
        decision_rule=DECISION_RULE,
        notes=notes,
    )
    return result


def _bootstrap_aurocs(
    pos: np.ndarray, neg: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """AUROC of ``n_boot`` stratified resamples, via the Mann-Whitney rank formula.

    Resamples are drawn and ranked in chunks so that memory stays bounded for large sets.
    """
    n_pos, n_neg = pos.size, neg.size
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // (n_pos + n_neg))
    aucs = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        sample_pos = pos[rng.integers(0, n_pos, size=(b, n_pos))]
        sample_neg = neg[rng.integers(0, n_neg, size=(b, n_neg))]
        ranks = rankdata(np.concatenate([sample_pos, sample_neg], axis=1), axis=1)
        rank_sum = ranks[:, :n_pos].sum(axis=1)
        aucs[start : start + b] = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return aucs


def bootstrap_auroc_ci(
    labels: ArrayLike,
    scores: ArrayLike,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap confidence interval of the AUROC.

    Resampling is stratified: normal and abnormal cases are each resampled with replacement
    within their own class, so every resample keeps the original class sizes and its AUROC
    is always defined. The result depends only on the inputs and ``seed``.

    Args:
        labels: Binary labels, 1 = abnormal, 0 = normal.
        scores: One anomaly score per case, higher = more abnormal.
        n_boot: Number of bootstrap resamples.
        alpha: One minus the coverage: ``0.05`` gives a 95 % interval.
        seed: Seed of the NumPy random generator.

    Returns:
        ``(low, high)``, the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled
        AUROCs, or ``(None, None)`` when only one class is present.

    Raises:
        ValueError: On malformed input, ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    y, s = check_labels_scores(labels, scores)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return None, None
    aucs = _bootstrap_aurocs(pos, neg, int(n_boot), np.random.default_rng(seed))
    low, high = np.quantile(aucs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)
