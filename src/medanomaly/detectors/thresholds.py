"""Threshold rules that turn anomaly scores into normal/abnormal decisions.

All rules return a cut-off for the package-wide decision rule **abnormal iff score >
threshold** (see :mod:`medanomaly.metrics.image`).

Rules:

* ``youden``: maximise sensitivity + specificity - 1 on labelled validation data (Chung & Choi
2023).
* ``f1``: maximise F1 on labelled validation data (the UAD slide deck).
* ``mean_sd``: mean + k·SD of held-out normal scores, no labels needed (Hjohlman 2022).
* ``percentile``: the q-th percentile of held-out normal scores.
* ``conformal``: split-conformal cut-off bounding the false-positive rate on fresh normal
  cases by ``alpha``.

Label-based rules place the cut-off midway between two adjacent distinct validation scores,
so that ``score > threshold`` reproduces the chosen operating point exactly. When the
validation set holds no abnormal case they fall back to mean + 3·SD of the normal scores and
log a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medanomaly.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

FALLBACK_K = 3.0
_CONFORMAL_EPS = 1e-9  # absorbs float error in (n + 1) * (1 - alpha) before the ceiling


ArrayLike = Sequence[float] | np.ndarray


def check_scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a 1D float64 array, rejecting empty input and NaN/inf.

    Args:
        scores: One score per case.
        name: Name used in error messages.

    Returns:
        The scores as a 1D float64 array.

    Raises:
        ValueError: If the input is empty, not 1D, or holds non-finite values.
    """
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        n_bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{name} holds {n_bad} non-finite value(s) (NaN or inf)")
    return arr


def check_labels_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate a label vector and a score vector of the same length.

    Args:
        labels: Binary labels, 1 = abnormal, 0 = normal (bool or integer-valued).
        scores: One score per case, higher = more abnormal.

    Returns:
        ``(labels, scores)`` as an int64 array of 0/1 and a float64 array.

    Raises:
        ValueError: If the lengths differ, labels are not binary, or scores are not finite.
    """
    score_arr = check_scores(scores)
    label_arr = np.asarray(labels)
    if label_arr.shape != score_arr.shape:
        raise ValueError(
            f"labels and scores differ in shape: {label_arr.shape} vs {score_arr.shape}"
        )
    unique = set(np.unique(label_arr).tolist())
    if not unique <= {0, 1}:
        raise ValueError(f"labels must be 0 (normal) or 1 (abnormal), got values {sorted(unique)}")
    return label_arr.astype(np.int64), score_arr


def _midpoint(low: float, high: float) -> float:
    """A cut-off ``t`` with ``low <= t < high``: ``score > t`` flags exactly scores >= high."""
    t = low + (high - low) / 2.0
    return t if low <= t < high else low


def _operating_points(
    labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate cut-offs and the true/false positives each one gives under ``>``.

    Candidates are the midpoints between adjacent distinct scores plus the largest score
    (which flags nothing). The "flag everything" point is not a candidate: a cut-off below
    every validation score is not a usable operating point.

    Returns:
        ``(thresholds, tp, fp)`` ordered from the highest cut-off to the lowest.
    """
    uniq, inverse = np.unique(scores, return_inverse=True)
    pos_per_value = np.bincount(inverse, weights=labels, minlength=uniq.size)
    all_per_value = np.bincount(inverse, minlength=uniq.size).astype(np.float64)
    # Cut-off k (k = 0 .. m-1, descending) flags the k highest distinct values.
    tp = np.concatenate([[0.0], np.cumsum(pos_per_value[::-1])[:-1]])
    fp = np.concatenate([[0.0], np.cumsum((all_per_value - pos_per_value)[::-1])[:-1]])
    desc = uniq[::-1]
    mids = [_midpoint(float(lo), float(hi)) for hi, lo in zip(desc[:-1], desc[1:], strict=True)]
    thresholds = np.array([float(desc[0]), *mids], dtype=np.float64)
    return thresholds, tp, fp


def _labelled_rule(
    name: str,
    labels: ArrayLike,
    scores: ArrayLike,
    objective: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray],
) -> float:
    """Shared driver of label-based rules: maximise ``objective`` over operating points.

    Ties are broken towards the highest cut-off (fewest false positives).
    """
    y, s = check_labels_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_neg == 0:
        raise ValueError(f"{name} threshold needs normal cases (label 0); none were given")
    if n_pos == 0:
        logger.warning(
            "%s threshold: validation set holds no abnormal case; falling back to "
            "mean + %.1f*SD of the normal scores",
            name,
            FALLBACK_K,
        )
        return mean_sd_threshold(s, k=FALLBACK_K)
    thresholds, tp, fp = _operating_points(y, s)
    values = objective(tp, fp, n_pos, n_neg)
    return float(thresholds[int(np.argmax(values))])


def _youden_objective(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """Youden's J = sensitivity + specificity - 1 = TPR - FPR."""
    return tp / n_pos - fp / n_neg


def _f1_objective(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> np.ndarray:
    """F1 = 2TP / (2TP + FP + FN), with FN = n_pos - TP."""
    del n_neg
    return 2.0 * tp / (tp + fp + n_pos)


def youden_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC cut-off maximising Youden's J = sensitivity + specificity - 1 (Chung & Choi 2023).

    Args:
        labels: Binary validation labels, 1 = abnormal, 0 = normal.
        scores: Validation anomaly scores, higher = more abnormal.

    Returns:
        A cut-off midway between two adjacent distinct scores, so that ``score > threshold``
        reproduces the optimal operating point. Ties go to the highest cut-off. With no
        abnormal case, mean + 3·SD of the scores (logged as a warning).

    Raises:
        ValueError: On malformed input or when no normal case is given.
    """
    return _labelled_rule("youden", labels, scores, _youden_objective)


def f1_threshold(labels: ArrayLike, scores: ArrayLike) -> float:
    """Cut-off maximising the F1 score of the abnormal class (the UAD slide deck).

    Args:
        labels: Binary validation labels, 1 = abnormal, 0 = normal.
        scores: Validation anomaly scores, higher = more abnormal.

    Returns:
        A cut-off midway between two adjacent distinct scores, so that ``score > threshold``
        reproduces the optimal operating point. Ties go to the highest cut-off. The trivial
        "call everything abnormal" point is never chosen. With no abnormal case,
        mean + 3·SD of the scores (logged as a warning).

    Raises:
        ValueError: On malformed input or when no normal case is given.
    """
    return _labelled_rule("f1", labels, scores, _f1_objective)


def mean_sd_threshold(normal_scores: ArrayLike, k: float = 3.0) -> float:
    """Mean + k·SD of held-out normal scores, the outlier rule of thumb (Hjohlman 2022).

    The SD is the sample standard deviation (``ddof=1``); a single score gives SD 0.

    Args:
        normal_scores: Scores of held-out normal cases.
        k: Number of standard deviations above the mean.

    Returns:
        ``mean + k * sd``.
    """
    s = check_scores(normal_scores, "normal_scores")
    sd = float(np.std(s, ddof=1)) if s.size > 1 else 0.0
    return float(np.mean(s)) + float(k) * sd


def percentile_threshold(normal_scores: ArrayLike, q: float = 95.0) -> float:
    """The q-th percentile of held-out normal scores (linear interpolation).

    About ``(100 - q)`` % of these normal scores lie above the cut-off.

    Args:
        normal_scores: Scores of held-out normal cases.
        q: Percentile in [0, 100].

    Returns:
        The percentile as a float.

    Raises:
        ValueError: If ``q`` is outside [0, 100].
    """
    s = check_scores(normal_scores, "normal_scores")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must lie in [0, 100], got {q}")
    return float(np.percentile(s, q))


def conformal_threshold(calibration_scores: ArrayLike, alpha: float = 0.05) -> float:
    """Split-conformal cut-off bounding the false-positive rate on fresh normals by ``alpha``.

    With ``n`` calibration scores of normal cases, the cut-off is the
    ``k = ceil((n + 1) * (1 - alpha))``-th smallest calibration score. For a fresh normal
    score exchangeable with the calibration scores, ``P(score > threshold) <= alpha``
    (averaged over calibration sets). Calling a case abnormal iff ``score > threshold`` is
    the same as calling it abnormal iff its :func:`conformal_pvalues` p-value is ``<= alpha``.

    If ``k > n`` (too few calibration scores for this ``alpha``, i.e. ``n < 1/alpha - 1``),
    no finite cut-off gives the guarantee: the function returns ``+inf`` (nothing is ever
    called abnormal) and logs a warning.

    Args:
        calibration_scores: Scores of held-out normal cases not used for training.
        alpha: Target false-positive rate, in (0, 1).

    Returns:
        The cut-off, or ``float('inf')`` when ``k > n``.

    Raises:
        ValueError: If ``alpha`` is outside (0, 1) or the scores are malformed.
    """
    cal = np.sort(check_scores(calibration_scores, "calibration_scores"))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n = cal.size
    k = math.ceil((n + 1) * (1.0 - alpha) - _CONFORMAL_EPS)
    if k > n:
        logger.warning(
            "conformal threshold: %d calibration scores are too few for alpha=%g "
            "(need at least %d); returning +inf, so no case will be called abnormal",
            n,
            alpha,
            math.ceil(1.0 / alpha - 1.0 - _CONFORMAL_EPS),
        )
        return float("inf")
    return float(cal[max(k, 1) - 1])


def conformal_pvalues(calibration_scores: ArrayLike, scores: ArrayLike) -> np.ndarray:
    """Conformal p-values of ``scores`` against normal calibration scores.

    ``p(s) = (1 + #{i : cal_i >= s}) / (n + 1)``, the finite-sample-valid form of "the
    fraction of calibration scores at or above the case's score": for a fresh normal case,
    ``P(p <= alpha) <= alpha`` for every ``alpha``. Small p-values mean abnormal.

    Args:
        calibration_scores: Scores of ``n`` held-out normal cases.
        scores: Scores to turn into p-values.

    Returns:
        A float64 array of p-values in ``[1 / (n + 1), 1]``, one per score.
    """
    cal = np.sort(check_scores(calibration_scores, "calibration_scores"))
    s = np.asarray(scores, dtype=np.float64)
    n_at_or_above = cal.size - np.searchsorted(cal, s, side="left")
    return (1.0 + n_at_or_above) / (cal.size + 1.0)


_LABELLED_RULES: dict[str, Callable[..., float]] = {
    "youden": youden_threshold,
    "f1": f1_threshold,
}
_NORMAL_RULES: dict[str, Callable[..., float]] = {
    "mean_sd": mean_sd_threshold,
    "percentile": percentile_threshold,
    "conformal": conformal_threshold,
}
THRESHOLD_RULES: tuple[str, ...] = (*_LABELLED_RULES, *_NORMAL_RULES)


def _normal_only(scores: ArrayLike, labels: ArrayLike | None) -> np.ndarray:
    """The scores of normal cases: all scores without labels, else those labelled 0."""
    if labels is None:
        return check_scores(scores)
    y, s = check_labels_scores(labels, scores)
    return s[y == 0]


def choose_threshold(
    rule: str, scores: ArrayLike, labels: ArrayLike | None = None, **params: Any
) -> float:
    """Compute a cut-off with the named rule.

    Args:
        rule: One of :data:`THRESHOLD_RULES` (``youden``, ``f1``, ``mean_sd``, ``percentile``,
            ``conformal``); case and ``-``/``_`` are ignored.
        scores: Validation scores, higher = more abnormal.
        labels: Validation labels (1 = abnormal). Required by ``youden`` and ``f1``. For the
            other rules they are optional; when given, only scores labelled 0 are used.
        **params: Rule parameters: ``k`` (mean_sd), ``q`` (percentile), ``alpha`` (conformal).

    Returns:
        The cut-off for the decision rule ``score > threshold``.

    Raises:
        ValueError: For an unknown rule (with a did-you-mean hint) or missing labels.
    """
    key = rule.strip().lower().replace("-", "_")
    if key in _LABELLED_RULES:
        if labels is None:
            raise ValueError(f"threshold rule {rule!r} needs labels")
        if params:
            raise ValueError(f"threshold rule {rule!r} takes no parameters, got {sorted(params)}")
        return _LABELLED_RULES[key](labels, scores)
    if key in _NORMAL_RULES:
        return _NORMAL_RULES[key](_normal_only(scores, labels), **params)
    raise ValueError(
        f"unknown threshold rule {rule!r}.{did_you_mean(key, THRESHOLD_RULES)} "
        f"Known: {', '.join(THRESHOLD_RULES)}."
    )


# -- rules as users spell them (evaluate, cv, screen, compare specs) --------------------------
LABELLED_RULES = ("youden", "f1")


def parse_rule(spec: str | None) -> tuple[str | None, dict[str, float]]:
    """Split a threshold spec such as ``"mean_sd:k=2"`` into a rule name and parameters.

    Args:
        spec: ``None`` or ``"run"`` (keep the run's own threshold), or a rule of
            :data:`~medanomaly.detectors.thresholds.THRESHOLD_RULES`, optionally followed by
            ``:name=value[,name=value]`` (``k`` for mean_sd, ``q`` for percentile, ``alpha``
            for conformal).

    Returns:
        ``(rule, params)``; ``rule`` is ``None`` for the run's own threshold.

    Raises:
        ConfigError: For an unknown rule or a malformed parameter.
    """
    if spec is None or spec.strip().lower() in ("", "run"):
        return None, {}
    name, _, raw = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in THRESHOLD_RULES:
        raise ConfigError(
            f"unknown threshold rule {spec!r}; use run or one of {', '.join(THRESHOLD_RULES)}"
        )
    params: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ConfigError(f"threshold {spec!r}: write parameters as name=number, e.g. k=3")
    return name, params


def rule_threshold(
    rule: str,
    params: dict[str, float],
    labels: np.ndarray,
    scores: np.ndarray,
    alpha: float,
) -> float:
    """Apply a threshold rule to validation scores.

    ``youden`` and ``f1`` use the labelled scores (falling back to mean + 3·SD of the normal
    ones when no abnormal case is present); the other rules use the normal scores only.

    Args:
        rule: Rule name.
        params: Rule parameters (``alpha`` defaults to ``alpha`` for ``conformal``).
        labels: Validation labels (1 = abnormal, 0 = normal).
        scores: Validation scores.
        alpha: Default false-positive bound of the conformal rule.

    Returns:
        The cut-off for ``score > threshold``.

    Raises:
        ConfigError: When the validation scores hold no normal case.
    """
    labels = np.asarray(labels)
    if not np.any(labels == 0):
        raise ConfigError(f"threshold rule {rule!r}: the validation part holds no normal case")
    if rule == "conformal":
        params = {"alpha": alpha, **params}
    if rule in LABELLED_RULES:
        return choose_threshold(rule, scores, labels, **params)
    return choose_threshold(rule, np.asarray(scores)[labels == 0], **params)


def describe_rule(rule: str | None, params: dict[str, float], alpha: float) -> str:
    """A readable name of a rule with its parameters, e.g. ``conformal(alpha=0.05)``."""
    if rule is None:
        return "run"
    if rule == "conformal":
        params = {"alpha": alpha, **params}
    args = ",".join(f"{k}={v:g}" for k, v in params.items())
    return f"{rule}({args})" if args else rule


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold, its rule, what it was computed from and how many scores it rests on."""

    value: float
    rule: str
    source: str
    n: int


def run_threshold(
    spec: str | None,
    own: float,
    own_rule: str,
    calibration: ArrayLike,
    alpha: float = 0.05,
) -> ThresholdChoice:
    """A threshold that needs no labels: the run's own, or a rule on its held-out normals.

    Args:
        spec: ``None`` or ``"run"`` for the run's own threshold, else a normal-only rule
            (``mean_sd[:k=..]``, ``percentile[:q=..]``, ``conformal[:alpha=..]``).
        own: The run's own threshold (``threshold_``).
        own_rule: How the run learnt it (``threshold_rule_``).
        calibration: The run's held-out normal validation scores (``val_scores_``).
        alpha: Default level of ``conformal``.

    Raises:
        ConfigError: A labelled rule (it needs labels), an unknown rule, or no held-out
            scores for a rule that needs them.
    """
    rule, params = parse_rule(spec)
    calibration = np.asarray(calibration, dtype=np.float64)
    if rule is None:
        source = (
            f"the run's own threshold ({own_rule}; {calibration.size} held-out normal "
            "validation scores kept)"
        )
        return ThresholdChoice(float(own), "run", source, calibration.size)
    name = describe_rule(rule, params, alpha)
    if rule in LABELLED_RULES:
        raise ConfigError(
            f"threshold {name} needs labelled cases; without labels use run, mean_sd[:k=..], "
            "percentile[:q=..] or conformal[:alpha=..]"
        )
    if calibration.size == 0:
        raise ConfigError(f"threshold {name}: the run holds no held-out normal validation scores")
    normal = np.zeros(calibration.size, dtype=np.int64)
    value = rule_threshold(rule, params, normal, calibration, alpha)
    source = f"the run's {calibration.size} held-out normal validation scores"
    return ThresholdChoice(value, name, source, calibration.size)
