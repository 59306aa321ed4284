import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from medanomaly.metrics import bootstrap_auroc_ci, image_metrics, predict_abnormal
from medanomaly.metrics.image import _bootstrap_aurocs


def _random_case(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(int)
    scores = rng.normal(size=n) + 1.2 * labels
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_agree_with_sklearn(seed: int) -> None:
    labels, scores = _random_case(seed)
    threshold = float(np.median(scores))
    m = image_metrics(labels, scores, threshold)
    pred = (scores > threshold).astype(int)
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["auprc"] == pytest.approx(average_precision_score(labels, scores))
    assert m["sensitivity"] == pytest.approx(recall_score(labels, pred))
    assert m["specificity"] == pytest.approx(recall_score(labels, pred, pos_label=0))
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, pred))
    assert m["precision"] == pytest.approx(precision_score(labels, pred))
    assert m["f1"] == pytest.approx(f1_score(labels, pred))
    tn, fp, fn, tp = confusion_matrix(labels, pred).ravel()
    assert m["confusion_matrix"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert m["n_abnormal"] == int(labels.sum())
    assert m["n_normal"] == int((labels == 0).sum())
    assert m["threshold"] == threshold
    assert m["notes"] == []


def test_decision_rule_is_strictly_greater() -> None:
    scores = np.array([0.1, 0.5, 0.5, 0.9])
    assert predict_abnormal(scores, 0.5).tolist() == [0, 0, 0, 1]
    m = image_metrics([0, 0, 1, 1], scores, 0.5)
    assert m["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 1, "tp": 1}
    assert m["decision_rule"] == "score > threshold"


def test_result_is_json_serialisable_with_plain_types() -> None:
    labels, scores = _random_case(3, n=40)
    m = image_metrics(labels, scores, 0.0)
    json.dumps(m)
    for key in ("auroc", "auprc", "sensitivity", "specificity", "accuracy", "precision", "f1"):
        assert type(m[key]) is float
    assert all(type(v) is int for v in m["confusion_matrix"].values())


@pytest.mark.parametrize("label", [0, 1])
def test_one_class_labels_do_not_crash(label: int) -> None:
    scores = np.linspace(0.0, 1.0, 10)
    m = image_metrics([label] * 10, scores, 0.5)
    assert m["auroc"] is None
    assert any("auroc undefined" in note for note in m["notes"])
    json.dumps(m)
    if label == 0:
        assert m["sensitivity"] is None
        assert m["auprc"] is None
        assert m["specificity"] == pytest.approx(0.5)
    else:
        assert m["specificity"] is None
        assert m["sensitivity"] == pytest.approx(0.5)


def test_no_positive_calls_gives_undefined_precision() -> None:
    m = image_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=1.0)
    assert m["precision"] is None
    assert m["f1"] == 0.0
    assert any(note.startswith("precision undefined") for note in m["notes"])


@pytest.mark.parametrize(
    ("labels", "scores"),
    [
        ([0, 1], [0.1]),
        ([0, 2], [0.1, 0.2]),
        ([0, 1], [0.1, np.nan]),
        ([], []),
    ],
)
def test_malformed_input_is_rejected(labels: list, scores: list) -> None:
    with pytest.raises(ValueError):
        image_metrics(labels, scores, 0.0)


def test_bootstrap_ci_contains_point_estimate_and_is_deterministic() -> None:
    labels, scores = _random_case(4, n=200)
    point = roc_auc_score(labels, scores)
    low, high = bootstrap_auroc_ci(labels, scores, n_boot=1000, alpha=0.05, seed=7)
    assert low < point < high
    assert bootstrap_auroc_ci(labels, scores, n_boot=1000, alpha=0.05, seed=7) == (low, high)
    assert bootstrap_auroc_ci(labels, scores, n_boot=1000, alpha=0.05, seed=8) != (low, high)
    narrow = bootstrap_auroc_ci(labels, scores, n_boot=1000, alpha=0.5, seed=7)
    assert low <= narrow[0] <= narrow[1] <= high


class _IdentityRng:
    """Stands in for a Generator: every "resample" is the original sample."""

    def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
        return np.broadcast_to(np.arange(low, high), size)


def test_bootstrap_rank_formula_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1], [30, 20])
    scores = (rng.integers(0, 4, size=50) + labels).astype(float)
    aucs = _bootstrap_aurocs(scores[labels == 1], scores[labels == 0], 3, _IdentityRng())
    np.testing.assert_allclose(aucs, roc_auc_score(labels, scores))


def test_bootstrap_is_stratified_and_handles_one_class() -> None:
    # Perfectly separated: every stratified resample keeps both classes, AUROC stays 1.
    labels = np.array([0] * 5 + [1] * 3)
    scores = np.arange(8.0)
    assert bootstrap_auroc_ci(labels, scores, n_boot=200) == (1.0, 1.0)
    assert bootstrap_auroc_ci([0, 0, 0], [1.0, 2.0, 3.0]) == (None, None)


def test_bootstrap_rejects_bad_parameters() -> None:
    labels, scores = _random_case(6, n=20)
    with pytest.raises(ValueError):
        bootstrap_auroc_ci(labels, scores, n_boot=0)
    with pytest.raises(ValueError):
        bootstrap_auroc_ci(labels, scores, alpha=1.5)


def test_bootstrap_chunking_keeps_results_close(monkeypatch) -> None:
    labels, scores = _random_case(9, n=150)
    full = bootstrap_auroc_ci(labels, scores, n_boot=2000, seed=1)
    monkeypatch.setattr("medanomaly.metrics.image._BOOT_CHUNK_ELEMENTS", 1000)
    chunked = bootstrap_auroc_ci(labels, scores, n_boot=2000, seed=1)
    assert chunked == bootstrap_auroc_ci(labels, scores, n_boot=2000, seed=1)
    np.testing.assert_allclose(chunked, full, atol=0.02)
