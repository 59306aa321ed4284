import logging
import math

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_curve

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
from medanomaly.metrics import image_metrics, predict_abnormal


def _noisy_case(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    scores = np.round(rng.normal(size=n) + labels, 1)  # rounded: many ties
    return labels, scores


# ---------------------------------------------------------------- label-based rules


@pytest.mark.parametrize("rule", [youden_threshold, f1_threshold])
def test_separable_scores_are_split_exactly(rule) -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.9])
    t = rule(labels, scores)
    assert t == pytest.approx(0.5)
    assert predict_abnormal(scores, t).tolist() == labels.tolist()
    m = image_metrics(labels, scores, t)
    assert m["sensitivity"] == m["specificity"] == m["f1"] == 1.0


def test_youden_matches_best_roc_point_under_strict_rule() -> None:
    labels, scores = _noisy_case(0)
    fpr, tpr, _ = roc_curve(labels, scores)
    best_j = np.max(tpr - fpr)
    t = youden_threshold(labels, scores)
    m = image_metrics(labels, scores, t)
    assert m["sensitivity"] + m["specificity"] - 1.0 == pytest.approx(best_j)
    assert t not in set(scores.tolist())  # placed between two distinct scores
    below, above = scores[scores < t].max(), scores[scores > t].min()
    assert t == pytest.approx((below + above) / 2.0)


def test_f1_matches_best_f1_over_all_cutoffs() -> None:
    labels, scores = _noisy_case(1)
    best = max(
        f1_score(labels, (scores >= c).astype(int)) for c in np.unique(scores)[1:]
    )  # every non-trivial operating point
    t = f1_threshold(labels, scores)
    assert f1_score(labels, predict_abnormal(scores, t)) == pytest.approx(best)
    assert t > scores.min()


def test_ties_go_to_the_highest_cutoff() -> None:
    # Both cut-offs 0.15 and 0.35 give Youden J = 0.5; the higher one is chosen.
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4])
    assert youden_threshold(labels, scores) == pytest.approx(0.35)


def test_adjacent_floats_still_reproduce_the_operating_point() -> None:
    low = 1.0
    high = np.nextafter(low, 2.0)
    t = youden_threshold([0, 1], [low, high])
    assert predict_abnormal([low, high], t).tolist() == [0, 1]


@pytest.mark.parametrize("rule", ["youden", "f1"])
def test_no_abnormal_validation_falls_back_to_mean_3sd(rule, caplog) -> None:
    scores = np.random.default_rng(2).normal(10.0, 2.0, size=100)
    with caplog.at_level(logging.WARNING, logger="medanomaly.detectors.thresholds"):
        t = choose_threshold(rule, scores, labels=np.zeros(100, dtype=int))
    assert t == pytest.approx(scores.mean() + 3.0 * scores.std(ddof=1))
    assert t > scores.min()
    assert predict_abnormal(scores, t).mean() < 0.05  # sane: flags (almost) no normal
    assert "no abnormal case" in caplog.text


def test_no_normal_validation_is_an_error() -> None:
    with pytest.raises(ValueError, match="normal"):
        youden_threshold([1, 1, 1], [0.1, 0.2, 0.3])


def test_constant_scores_flag_nothing() -> None:
    t = f1_threshold([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
    assert predict_abnormal([0.5] * 4, t).sum() == 0


# ---------------------------------------------------------------- label-free rules


def test_mean_sd_threshold() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    assert mean_sd_threshold(scores, k=3.0) == pytest.approx(2.5 + 3.0 * np.std(scores, ddof=1))
    assert mean_sd_threshold(scores, k=0.0) == pytest.approx(2.5)
    assert mean_sd_threshold([7.0]) == 7.0


def test_percentile_threshold() -> None:
    scores = np.arange(101.0)
    assert percentile_threshold(scores, q=95) == pytest.approx(95.0)
    assert predict_abnormal(scores, percentile_threshold(scores, q=90)).sum() == 10
    with pytest.raises(ValueError):
        percentile_threshold(scores, q=101)


# ---------------------------------------------------------------- conformal


def test_conformal_threshold_order_statistic() -> None:
    cal = np.arange(1.0, 20.0)  # n = 19, alpha = 0.1 -> k = ceil(20 * 0.9) = 18
    assert conformal_threshold(cal[::-1], alpha=0.1) == 18.0
    assert conformal_threshold(cal, alpha=0.05) == 19.0  # k = ceil(19.0) = 19: float-safe


def test_conformal_threshold_too_few_scores_is_inf(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medanomaly.detectors.thresholds"):
        t = conformal_threshold(np.arange(10.0), alpha=0.05)
    assert t == math.inf
    assert "too few" in caplog.text


def test_conformal_bounds_false_positive_rate_over_many_draws() -> None:
    rng = np.random.default_rng(0)
    n_draws, n_cal, n_test, alpha = 2000, 50, 200, 0.1
    cal = np.sort(rng.normal(size=(n_draws, n_cal)), axis=1)
    k = math.ceil((n_cal + 1) * (1 - alpha))
    thresholds = cal[:, k - 1]
    # The function agrees with the vectorised order statistic on a few draws ...
    for i in range(5):
        assert conformal_threshold(cal[i], alpha) == thresholds[i]
    # ... and the average false-positive rate on fresh normals stays below alpha.
    fresh = rng.normal(size=(n_draws, n_test))
    fpr = np.mean(fresh > thresholds[:, None])
    assert fpr <= alpha + 0.005
    assert fpr > alpha - 0.03  # not vacuously conservative either: 1 - 46/51 = 0.098


def test_conformal_pvalue_formula() -> None:
    cal = np.array([1.0, 2.0, 2.0, 3.0])
    p = conformal_pvalues(cal, [0.5, 2.0, 2.5, 3.0, 9.0])
    np.testing.assert_allclose(p, [5 / 5, 4 / 5, 2 / 5, 2 / 5, 1 / 5])


def test_conformal_pvalues_agree_with_threshold() -> None:
    rng = np.random.default_rng(1)
    cal = rng.normal(size=39)
    scores = np.concatenate([rng.normal(size=500), cal])  # include exact ties
    for alpha in (0.05, 0.1, 0.25):
        t = conformal_threshold(cal, alpha)
        assert np.array_equal(conformal_pvalues(cal, scores) <= alpha, scores > t)


def test_conformal_pvalues_are_valid_for_normals() -> None:
    rng = np.random.default_rng(3)
    cal, fresh = rng.normal(size=(2000, 20)), rng.normal(size=(2000, 5))
    p = np.stack([conformal_pvalues(c, s) for c, s in zip(cal, fresh, strict=True)])
    assert np.all((p >= 1 / 21) & (p <= 1.0))
    for alpha in (0.1, 0.2, 0.5):
        assert np.mean(p <= alpha) <= alpha + 0.01


# ---------------------------------------------------------------- entry point


def test_choose_threshold_dispatches_each_rule() -> None:
    labels, scores = _noisy_case(4)
    normals = scores[labels == 0]
    assert choose_threshold("youden", scores, labels) == youden_threshold(labels, scores)
    assert choose_threshold("F1", scores, labels) == f1_threshold(labels, scores)
    assert choose_threshold("mean-sd", scores, labels, k=2) == mean_sd_threshold(normals, k=2)
    assert choose_threshold("percentile", normals, q=80) == percentile_threshold(normals, 80)
    assert choose_threshold("conformal", scores, labels, alpha=0.1) == conformal_threshold(
        normals, 0.1
    )
    assert set(THRESHOLD_RULES) == {"youden", "f1", "mean_sd", "percentile", "conformal"}


def test_unknown_rule_suggests_a_name() -> None:
    with pytest.raises(ValueError, match="Did you mean 'youden'"):
        choose_threshold("youdon", [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold("zzz", [0.1, 0.2])


def test_labelled_rule_without_labels_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs labels"):
        choose_threshold("youden", [0.1, 0.2])
