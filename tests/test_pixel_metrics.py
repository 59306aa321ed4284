import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medanomaly.metrics import PixelMetricAccumulator, pixel_metrics


def _random_volume(seed: int, shape=(16, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.random(shape) < 0.1
    scores = rng.random(shape) + 0.3 * gt  # overlapping classes in [0, 1.3)
    return scores.astype(np.float32), gt


def test_binned_auroc_and_ap_agree_with_sklearn() -> None:
    scores, gt = _random_volume(0)
    result = pixel_metrics([scores], [gt], n_bins=10_000)
    exact_auc = roc_auc_score(gt.ravel(), scores.ravel())
    exact_ap = average_precision_score(gt.ravel(), scores.ravel())
    assert result["auroc"] == pytest.approx(exact_auc, abs=1e-3)
    assert result["average_precision"] == pytest.approx(exact_ap, abs=1e-3)
    assert result["n_lesion"] == int(gt.sum())
    assert result["n_normal"] == int((~gt).sum())
    assert result["n_clipped"] == 0
    json.dumps(result)


def test_few_distinct_values_are_exact() -> None:
    # Every distinct score gets its own bin: binned AUROC/AP equal the exact ones.
    rng = np.random.default_rng(1)
    gt = rng.random((40, 40)) < 0.3
    scores = rng.integers(0, 5, size=(40, 40)) + gt
    result = pixel_metrics([scores.astype(float)], [gt], n_bins=600, range=(0.0, 6.0))
    assert result["auroc"] == pytest.approx(roc_auc_score(gt.ravel(), scores.ravel()), abs=1e-12)
    assert result["average_precision"] == pytest.approx(
        average_precision_score(gt.ravel(), scores.ravel()), abs=1e-12
    )


def _brain_with_background() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 'brain' in the centre of a zero background; lesion scores only mildly higher."""
    rng = np.random.default_rng(2)
    shape = (64, 64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    fg = (yy - 32) ** 2 + (xx - 32) ** 2 < 20**2
    gt = fg & ((yy - 28) ** 2 + (xx - 36) ** 2 < 6**2)
    scores = np.where(fg, rng.normal(1.0, 0.5, shape) + 0.5 * gt, 0.0)
    scores = np.clip(scores, 0.01, None) * fg  # background exactly 0, foreground > 0
    return scores, gt, fg


def test_background_inflates_auroc_and_foreground_matches_exact() -> None:
    scores, gt, fg = _brain_with_background()
    with_bg = pixel_metrics([scores], [gt])
    fg_only = pixel_metrics([scores], [gt], foreground=[fg])
    exact_fg = roc_auc_score(gt[fg], scores[fg])
    assert fg_only["auroc"] == pytest.approx(exact_fg, abs=1e-3)
    assert with_bg["auroc"] == pytest.approx(roc_auc_score(gt.ravel(), scores.ravel()), abs=1e-3)
    assert with_bg["auroc"] > fg_only["auroc"] + 0.1
    assert fg_only["n_normal"] == int((fg & ~gt).sum())


def test_lesion_outside_foreground_is_ignored() -> None:
    scores = np.array([[0.1, 0.9], [0.2, 0.8]])
    gt = np.array([[False, True], [False, True]])
    fg = np.array([[True, True], [True, False]])
    result = pixel_metrics([scores], [gt], foreground=[fg])
    assert result["n_lesion"] == 1
    assert result["n_normal"] == 2


def test_best_dice_on_constructed_case() -> None:
    # Lesion = 4 voxels with score 0.8; one normal voxel at 0.9, one at 0.7, rest 0.1.
    scores = np.full((10, 10), 0.1)
    gt = np.zeros((10, 10), dtype=bool)
    gt[2:4, 2:4] = True
    scores[gt] = 0.8
    scores[0, 0], scores[9, 9] = 0.9, 0.7
    result = pixel_metrics([scores], [gt], n_bins=1000, range=(0.0, 1.0))
    # best: flag 0.8 and 0.9 -> TP 4, FP 1, FN 0 -> Dice 8 / 9
    assert result["best_dice"] == pytest.approx(8 / 9)
    t = result["best_dice_threshold"]
    assert 0.7 <= t < 0.8
    pred = scores > t
    dice = 2 * np.sum(pred & gt) / (pred.sum() + gt.sum())
    assert dice == pytest.approx(result["best_dice"])


def test_perfect_map_gives_perfect_metrics() -> None:
    gt = np.zeros((8, 8, 8), dtype=bool)
    gt[2:5, 2:5, 2:5] = True
    scores = gt.astype(float)
    result = pixel_metrics([scores], [gt], n_bins=100)
    assert result["auroc"] == 1.0
    assert result["average_precision"] == 1.0
    assert result["best_dice"] == 1.0
    assert np.array_equal(scores > result["best_dice_threshold"], gt)


def test_streamed_3d_chunks_equal_one_shot() -> None:
    scores, gt = _random_volume(3, shape=(24, 20, 20))
    fg = np.zeros(scores.shape, dtype=bool)
    fg[:, 2:18, 2:18] = True
    one_shot = PixelMetricAccumulator(n_bins=2000, range=(0.0, 1.3))
    one_shot.update(scores, gt, fg)
    chunked = PixelMetricAccumulator(n_bins=2000, range=(0.0, 1.3))
    for z in range(0, 24, 5):  # uneven slabs
        chunked.update(scores[z : z + 5], gt[z : z + 5], fg[z : z + 5])
    assert np.array_equal(one_shot.pos_hist, chunked.pos_hist)
    assert np.array_equal(one_shot.neg_hist, chunked.neg_hist)
    assert one_shot.compute() == chunked.compute()


def test_internal_chunking_does_not_change_counts(monkeypatch) -> None:
    scores, gt = _random_volume(4, shape=(8, 16, 16))
    ref = PixelMetricAccumulator(n_bins=500, range=(0.0, 1.3))
    ref.update(scores, gt)
    monkeypatch.setattr("medanomaly.metrics.pixel._CHUNK", 100)
    small = PixelMetricAccumulator(n_bins=500, range=(0.0, 1.3))
    small.update(scores, gt)
    assert np.array_equal(ref.pos_hist, small.pos_hist)
    assert np.array_equal(ref.neg_hist, small.neg_hist)


def test_per_image_and_pooled_results() -> None:
    vols = [_random_volume(s, shape=(4, 16, 16)) for s in (5, 6, 7)]
    maps, masks = [v[0] for v in vols], [v[1] for v in vols]
    result = pixel_metrics(maps, masks, n_bins=5000, per_image=True)
    assert [r["name"] for r in result["per_image"]] == ["0", "1", "2"]
    for r, (s, g) in zip(result["per_image"], vols, strict=True):
        assert r["auroc"] == pytest.approx(roc_auc_score(g.ravel(), s.ravel()), abs=1e-3)
    pooled = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert result["auroc"] == pytest.approx(pooled, abs=1e-3)
    summary = result["per_image_summary"]["auroc"]
    assert summary["n"] == 3
    assert summary["mean"] == pytest.approx(np.mean([r["auroc"] for r in result["per_image"]]))
    json.dumps(result)


def test_stacked_array_with_channel_axis_is_accepted() -> None:
    scores, gt = _random_volume(8, shape=(3, 16, 16))
    stacked = scores[:, None]  # (N, 1, H, W) maps with (N, H, W) masks
    result = pixel_metrics(stacked, gt, per_image=False)
    assert "per_image" not in result
    assert result["n_lesion"] == int(gt.sum())


def test_range_none_first_update_fixes_range_and_clips_later(caplog) -> None:
    acc = PixelMetricAccumulator(n_bins=100)
    acc.update(np.array([0.0, 1.0, 0.5]), np.array([0, 1, 0]))
    assert acc.range == (0.0, 1.0)
    with caplog.at_level("WARNING", logger="medanomaly.metrics.pixel"):
        acc.update(np.array([2.0, -1.0]), np.array([1, 0]))
    result = acc.compute()
    assert result["n_clipped"] == 2
    assert result["auroc"] == 1.0  # clipped values still rank at the edges
    assert "clipped" in caplog.text


def test_one_class_and_empty_foreground_are_graceful() -> None:
    acc = PixelMetricAccumulator(n_bins=10, per_image=True)
    acc.update(np.ones((4, 4)), np.zeros((4, 4)), foreground=np.zeros((4, 4)))
    acc.update(np.arange(16.0).reshape(4, 4), np.zeros((4, 4)))
    result = acc.compute()
    assert result["auroc"] is None and result["best_dice"] is None
    assert result["n_normal"] == 16
    assert result["per_image"][0]["n_normal"] == 0
    assert result["notes"]
    json.dumps(result)


def test_invalid_input_is_rejected() -> None:
    acc = PixelMetricAccumulator(n_bins=10, range=(0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        PixelMetricAccumulator(n_bins=1)
    with pytest.raises(ValueError):
        pixel_metrics([np.zeros((2, 2))], [])


def test_extreme_scores_clip_into_edge_bins() -> None:
    acc = PixelMetricAccumulator(n_bins=10, range=(0.0, 1.0))
    acc.update(np.array([1e300, -1e300, 0.55]), np.array([1, 0, 0]))
    assert acc.pos_hist[-1] == 1 and acc.neg_hist[0] == 1 and acc.neg_hist[5] == 1
    assert acc.n_clipped == 2


def test_bins_are_right_closed_so_threshold_matches_strict_rule() -> None:
    acc = PixelMetricAccumulator(n_bins=10, range=(0.0, 1.0))
    edges = acc.edges
    acc.update(edges.copy(), np.zeros(edges.size))
    # e_0 and e_1 share bin 0; every other edge e_j sits at the top of bin j - 1.
    assert acc.neg_hist.tolist() == [2] + [1] * 9
