"""Evaluation figures: each writes a PNG atomically, or returns None when there is nothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medanomaly.reports import figures as figs
from medanomaly.reports.figures import _operating_point


def _scores(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    return labels, rng.normal(size=n) + 1.5 * labels


def _is_png(path) -> bool:
    with Image.open(path) as image:
        return image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


def _no_temporaries(folder) -> bool:
    return not list(folder.glob(".*.tmp"))


def test_roc_histogram_confusion_and_boxplot_write_pngs(tmp_path):
    labels, scores = _scores()
    written = [
        figs.plot_roc([(labels, scores, 0.5)], tmp_path / "roc.png"),
        figs.plot_roc(
            [(labels, scores, 0.5), (labels, -scores, None)], tmp_path / "rocs.png", ["a", "b"]
        ),
        figs.plot_score_histograms(labels, scores, 0.5, tmp_path / "hist.png"),
        figs.plot_confusion_matrix({"tn": 5, "fp": 1, "fn": 2, "tp": 7}, tmp_path / "cm.png"),
        figs.plot_fold_boxplot({"auroc": [0.7, 0.8, None], "f1": [0.6]}, tmp_path / "box.png"),
    ]
    for path in written:
        assert path is not None and _is_png(path), path
    assert _no_temporaries(tmp_path)


def test_nothing_to_draw_returns_none(tmp_path):
    assert figs.plot_roc([(np.zeros(5), np.arange(5.0), 1.0)], tmp_path / "r.png") is None
    assert figs.plot_training_curves([[]], tmp_path / "t.png") is None
    assert figs.plot_fold_boxplot({"auroc": [None]}, tmp_path / "b.png") is None
    assert not list(tmp_path.iterdir())


def test_roc_marker_is_the_operating_point_of_the_threshold():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.5, 0.9])
    assert _operating_point(labels, scores, 0.55) == pytest.approx((1 / 3, 1 / 2))
    assert _operating_point(labels, scores, 0.9) == (0.0, 0.0)  # strictly greater


def test_training_curves_single_and_many_runs(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_score_normal": 0.1}
        for e in range(1, 6)
    ]
    history[2]["val_score_abnormal"] = 0.4
    assert _is_png(figs.plot_training_curves([history], tmp_path / "one.png"))
    assert _is_png(figs.plot_training_curves([history, history[:3], []], tmp_path / "many.png"))


def test_gallery_indices_pick_four_groups_without_repeats():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.5, 0.8, 0.1, 0.3, 0.4])
    chosen = figs.gallery_indices(labels, scores, per_group=1)
    assert chosen == [0, 1, 3, 4]  # top abnormal, lowest abnormal, top normal, lowest normal
    everything = figs.gallery_indices(labels, scores, per_group=10)
    assert sorted(everything) == list(range(7)) and len(set(everything)) == 7


@pytest.mark.parametrize("shape", [(16, 16), (8, 8, 8)])
def test_gallery_writes_one_png_per_case(tmp_path, shape):
    rng = np.random.default_rng(0)
    images = rng.random((2, 1, *shape)).astype(np.float32)
    maps = rng.random((2, *shape)).astype(np.float32)
    paths = figs.save_gallery(tmp_path, images, images * 0.9, maps, ["a", "b"], ["c0", "c1"])
    assert [p.name for p in paths] == ["c0.png", "c1.png"]
    assert all(_is_png(p) for p in paths)
    assert figs.save_gallery(tmp_path / "none", images[:0], None, maps[:0], [], []) == []
